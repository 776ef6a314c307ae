"""The conditioning of a sample as a function of its seed (prompt or class label), and the conditioned forward
used to profile the sensitivity of conditional latent models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdq.utils.io import sha256_bytes

if TYPE_CHECKING:
    from tdq.sampling.prompts import PromptList
    from tdq.sampling.samplers import LatentDiffusionSampler


class Conditioning:
    r"""
    The conditioning of every sample, derived from its seed: class `seed % len(class_names)`, and for text models
    the prompt `prompt_template.format(class_names[class])`. With a prompt list (a benchmark's prompt file, see
    [`~tdq.sampling.prompts.load_prompts`]) seed `s` takes entry `s % len(prompts)` instead: a caption for text
    models (its judge class is the file's label, if any), a class name for class models.

    Text models are encoded as `StableDiffusionPipeline.encode_prompt` does (tokenizer padded to
    `model_max_length`, `text_encoder(ids)[0]`, the empty prompt as the unconditional input); the prompts of all
    classes and the empty prompt are encoded once, in one call, so a sample's embedding does not depend on its batch.

    Args:
        kind (`str`): `"t2i"` (text embeddings, `encoder_hidden_states`) or `"class"` (DiT `class_labels`).
        class_names (`Sequence[str]`): the class names.
        prompt_template (`str`, *optional*): text prompt, `{}` = class name (text models).
        text_encoder (`nn.Module`, *optional*): the text encoder (text models).
        tokenizer (*optional*): its tokenizer (text models).
        null_class (`int`, *optional*, defaults to `1000`): unconditional class label (DiT's `class_null`).
        prompt_list (`PromptList`, *optional*): prompts read from a file (replaces the class-name cycle).
    """

    def __init__(
        self,
        kind: str,
        class_names: Sequence[str],
        prompt_template: str | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        null_class: int = 1000,
        prompt_list: PromptList | None = None,
    ):
        if kind not in ("t2i", "class"):
            raise ValueError(f"conditioning kind={kind!r} is unknown; choose 't2i' or 'class'")
        if not class_names and (kind == "class" or prompt_list is None):
            raise ValueError(
                "conditioning needs class names (model.class_names) or, for text-to-image models, a prompt "
                "file (eval.prompts_file)"
            )
        if kind == "t2i" and (text_encoder is None or tokenizer is None or not prompt_template):
            raise ValueError("text conditioning needs a text_encoder, a tokenizer and a prompt_template")
        self.kind = kind
        self.class_names = list(class_names)
        self.prompt_template = prompt_template
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.null_class = int(null_class)
        self.prompt_list = prompt_list
        self._class_of_entry: list[int] | None = None
        if prompt_list is not None:
            self._class_of_entry = self._entry_classes(prompt_list)
        self._embeddings: torch.Tensor | None = None

    def _entry_classes(self, pl: PromptList) -> list[int] | None:
        """The judge/class label of every prompt-file entry (`None`: the file gives none)."""
        if self.kind == "class":
            index = {n: i for i, n in enumerate(self.class_names)}
            out = []
            for i, name in enumerate(pl.prompts):
                if name not in index:
                    raise ValueError(
                        f"{pl.path}: entry {i + 1} {name!r} is not a class name of this model "
                        f"(e.g. {self.class_names[:5]})"
                    )
                out.append(index[name])
            return out
        if pl.labels is None:
            return None
        bad = [
            (i + 1, lab) for i, lab in enumerate(pl.labels) if self.class_names and lab >= self.num_classes
        ]
        if bad:
            raise ValueError(
                f"{pl.path}: label {bad[0][1]} of entry {bad[0][0]} is outside the model's "
                f"{self.num_classes} classes"
            )
        return list(pl.labels)

    @property
    def num_entries(self) -> int:
        """Number of conditioning entries the seeds cycle through (prompt-file entries or classes)."""
        return len(self.prompt_list.prompts) if self.prompt_list is not None else self.num_classes

    def entries(self, seeds: Sequence[int]) -> list[int]:
        """The conditioning entry of every seed (`seed % num_entries`)."""
        return [int(s) % self.num_entries for s in seeds]

    @property
    def has_labels(self) -> bool:
        """Whether every sample has a known class (for class accuracy by the judge)."""
        return self.prompt_list is None or self._class_of_entry is not None

    @property
    def num_classes(self) -> int:
        """Number of classes the seeds cycle through."""
        return len(self.class_names)

    def labels(self, seeds: Sequence[int]) -> list[int]:
        """
        The class of every seed (`seed % num_classes`, or the prompt-file entry's class).

        Raises:
            `ValueError`: the prompt file gives no labels (check `has_labels` first).
        """
        if self.prompt_list is None:
            return [int(s) % self.num_classes for s in seeds]
        if self._class_of_entry is None:
            raise ValueError(f"{self.prompt_list.path}: the prompt file has no labels")
        return [self._class_of_entry[e] for e in self.entries(seeds)]

    def prompts(self, seeds: Sequence[int]) -> list[str]:
        """The text prompt of every seed (class name for class models)."""
        if self.prompt_list is not None:
            return [self.prompt_list.prompts[e] for e in self.entries(seeds)]
        if self.kind == "class":
            return [self.class_names[c] for c in self.labels(seeds)]
        return [self.prompt_template.format(self.class_names[c]) for c in self.labels(seeds)]

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """
        Text embeddings `[num_entries + 1, L, D]`: every class prompt (or prompt-file entry), then the empty
        (unconditional) prompt.
        """
        if self._embeddings is None:
            if self.prompt_list is not None:
                texts = [*self.prompt_list.prompts, ""]
            else:
                texts = [self.prompt_template.format(n) for n in self.class_names] + [""]
            ids = self.tokenizer(
                texts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(self.text_encoder.parameters()).device
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = (ids != self.tokenizer.pad_token_id).long().to(device)
            self._embeddings = self.text_encoder(ids.to(device), attention_mask=mask)[0].detach()
        return self._embeddings

    def cond(self, seeds: Sequence[int], device: str | torch.device) -> torch.Tensor:
        """The conditional input of the seeds: text embeddings `[N, L, D]` or class labels `[N]`."""
        if self.kind == "class":
            return torch.tensor(self.labels(seeds), dtype=torch.long).to(device)
        emb = self.class_embeddings()
        return emb[torch.tensor(self.entries(seeds), dtype=torch.long).to(emb.device)].to(device)

    def uncond(self, n: int, device: str | torch.device) -> torch.Tensor:
        """The unconditional input of `n` samples: empty-prompt embeddings or the null class."""
        if self.kind == "class":
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        emb = self.class_embeddings()
        return emb[-1:].expand(n, *emb.shape[1:]).to(device)

    def denoiser_kwargs(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of the denoiser call: `encoder_hidden_states` (UNet) or `class_labels` (DiT)."""
        return {"class_labels": cond} if self.kind == "class" else {"encoder_hidden_states": cond}

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (cache keys, reports)."""
        d: dict[str, Any] = {"kind": self.kind, "class_names": self.class_names}
        if self.kind == "t2i" and self.prompt_list is None:
            d["prompt_template"] = self.prompt_template
        if self.kind == "class":
            d["null_class"] = self.null_class
        if self.prompt_list is not None:
            pl = self.prompt_list
            d["prompts_file"] = {"path": pl.path, "sha256": pl.sha256, "entries": len(pl.prompts)}
        return d


def model_conditioning(
    model, prompt_template: str | None = None, prompt_list: PromptList | None = None
) -> Conditioning:
    r"""
    The [`Conditioning`] of a conditional [`~tdq.run.models.LoadedModel`] (cached on it, so text prompts are encoded
    once per run).

    Args:
        model (`LoadedModel`): a `"t2i"` or `"class"` model.
        prompt_template (`str`, *optional*): overrides the model's prompt template.
        prompt_list (`PromptList`, *optional*): prompts from a file (replaces the template and the class cycle).
    """
    template = prompt_template or model.prompt_template
    cache = model.__dict__.setdefault("_conditioning", {})
    key = (template, None if prompt_list is None else (prompt_list.path, prompt_list.sha256))
    if key not in cache:
        cache[key] = Conditioning(
            model.kind,
            model.class_names,
            prompt_template=template,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            null_class=model.null_class,
            prompt_list=prompt_list,
        )
    return cache[key]


class ConditionedForward:
    r"""
    A `forward_fn` for [`tdq.mixed_precision.fisher.profile_sensitivity`] on conditional latent models: calls the denoiser
    with each `x0` row's own conditioning (prompt embedding or class label of the seed the row was sampled from),
    without guidance, and returns the eps prediction (the first `C` channels of a learned-sigma DiT output).

    `profile_sensitivity` does not pass row indices to `forward_fn`; it cycles the rows of `x0` in order (the
    `i`-th sample of every bucket is row `i % N`, in batches of `batch_size`, buckets one after the other), and this
    callable follows that order by counting rows, restarting at every `samples_per_bucket` rows. A profile sharded
    across processes computes only some batches of each bucket; it calls `seek(row)` before each batch so that the
    count starts at that batch's first row (the rows one process would use for it).

    Args:
        sampler (`LatentDiffusionSampler`): gives the denoiser's conditioning and latent shape.
        seeds (`Sequence[int]`): the seed of every `x0` row, in row order.
        samples_per_bucket (`int`): the `samples_per_bucket` passed to `profile_sensitivity`.
    """

    def __init__(self, sampler: LatentDiffusionSampler, seeds: Sequence[int], samples_per_bucket: int):
        self.conditioning = sampler.conditioning
        self.channels = sampler.latent_shape[0]
        self.cond = self.conditioning.cond([int(s) for s in seeds], sampler.device)
        self.num_rows = len(seeds)
        self.samples_per_bucket = int(samples_per_bucket)
        self.position = 0

    def seek(self, row: int) -> None:
        """Make the next batch start at the bucket's sample `row` (`0 <= row < samples_per_bucket`)."""
        if not 0 <= int(row) < self.samples_per_bucket:
            raise ValueError(f"ConditionedForward.seek({row}): outside 0..{self.samples_per_bucket - 1}")
        self.position = int(row)

    def fingerprint(self) -> str:
        """What the profile's same-inputs check compares across processes: kind, rows and the conditioning."""
        cond = self.cond.detach().cpu().contiguous()
        raw = cond.reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = sha256_bytes(str((cond.dtype, tuple(cond.shape))).encode() + raw)
        return (
            f"ConditionedForward({self.conditioning.kind}, rows={self.num_rows}, "
            f"samples_per_bucket={self.samples_per_bucket}, cond=sha256:{digest[:16]})"
        )

    def rows(self, batch: int) -> torch.Tensor:
        """Indices of the `x0` rows of the next batch of `batch` samples (advances the counter)."""
        if self.position + batch > self.samples_per_bucket:
            raise RuntimeError(
                f"ConditionedForward: batch of {batch} past samples_per_bucket={self.samples_per_bucket}; pass "
                "the samples_per_bucket given to profile_sensitivity"
            )
        rows = torch.arange(self.position, self.position + batch) % self.num_rows
        self.position = (self.position + batch) % self.samples_per_bucket
        return rows

    def __call__(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional prediction of `denoiser` for `x_t` at integer train timesteps `t` (`[B]`)."""
        cond = self.cond[self.rows(x_t.shape[0]).to(self.cond.device)]
        kw = self.conditioning.denoiser_kwargs(cond)
        if self.conditioning.kind == "class":
            out = denoiser(x_t, timestep=t, **kw)
        else:
            out = denoiser(x_t, t, **kw)
        pred = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return pred[:, : self.channels]
