"""`TDQPipeline`: a drop-in `StableDiffusionPipeline` whose UNet runs with timestep-aware quantization.

```python
pipe = TDQPipeline.from_pretrained("path/to/sd", tdq_config=TDQConfig(), calibration_prompts=prompts)
image = pipe("a photo of a cat", num_inference_steps=30).images[0]
pipe.save_pretrained("sd-tdq")                      # UNet stored as integer codes
pipe = TDQPipeline.from_pretrained("sd-tdq")        # restored, no calibration
```

Folder layout written by `save_pretrained`: the standard diffusers folders, except that `unet/` holds only its
`config.json` (the quantized UNet is stored once, as integer codes, in `tdq/unet/`), plus

```
tdq/tdq_pipeline.json         index: which components are quantized and where their states are
tdq/unet/                     tdq_state.safetensors + tdq_config.json (self-contained: codes and all float params)
tdq/text_encoder/             only with a quantized text encoder: overlay state (quantized layers only)
tdq/vae_decoder/              only with a quantized VAE decoder: overlay state (quantized layers only)
```

The text encoder and the VAE are small next to the UNet and keep their float weights in their standard folders; their
quantized layers are restored on top from the overlay states. Such a folder needs tdq to load (plain diffusers finds
no UNet weights in it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from tdq.api import QUANTIZATION_ATTR, calibration, quantize_, quantize_static_, static_config
from tdq.config import TDQConfig
from tdq.serialization import (
    SavedQuantizationError,
    check_saveable,
    has_saved_quantization,
    load_quantization,
    save_quantization,
)
from tdq.utils.io import atomic_write, remove_temporaries

logger = logging.getLogger(__name__)

TDQ_DIRNAME = "tdq"
INDEX_FILE = "tdq_pipeline.json"
INDEX_SCHEMA_VERSION = 1

# Generic prompts used when `calibration_prompts` is not given: a spread of subjects, styles and scenes.
DEFAULT_CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red apple on a wooden table, studio lighting",
    "a watercolor painting of a mountain lake at sunrise",
    "a portrait of an old man with a beard, oil on canvas",
    "a busy city street at night with neon signs",
    "a cute corgi puppy sitting in the grass",
    "an isometric 3d render of a small house",
    "a bowl of ramen, food photography",
)

# component name -> (submodule quantized inside it, state folder under tdq/)
_COMPONENTS = {"unet": ("", "unet"), "text_encoder": ("", "text_encoder"), "vae": ("decoder", "vae_decoder")}


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """One dtype from the `dtype` / `torch_dtype` pair (both accepted; they must agree when both are given)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
    return dtype if dtype is not None else torch_dtype


def _load_schedule(schedule: Any, profile: Any, budget: Any):
    """A `PrecisionSchedule` from a schedule (object, dict or JSON path) or from a profile plus a budget."""
    from tdq.mixed_precision.fisher import SensitivityProfile
    from tdq.mixed_precision.planners import PrecisionBudget, PrecisionSchedule, plan_precision

    if profile is not None:
        if schedule is not None:
            raise ValueError("pass either schedule or profile (with budget), not both")
        if budget is None:
            raise ValueError("profile needs a budget: pass budget=PrecisionBudget(avg_act_bits=..., ...)")
        if not isinstance(profile, SensitivityProfile):
            profile = SensitivityProfile.load(profile)
        if isinstance(budget, dict):
            budget = PrecisionBudget(**budget)
        return plan_precision(profile, budget)
    if schedule is None or isinstance(schedule, PrecisionSchedule):
        return schedule
    if isinstance(schedule, dict):
        return PrecisionSchedule.from_dict(schedule)
    return PrecisionSchedule.load(schedule)


def _check_schedule_grid(schedule, model: nn.Module) -> None:
    grid = getattr(model, QUANTIZATION_ATTR).grid
    units = schedule.grid.get("units")
    if units not in (None, "auto") and units != grid.units:
        raise ValueError(
            f"the precision schedule is on a {units!r} grid but the UNet's grid is in {grid.units!r}"
        )


@contextlib.contextmanager
def _config_only_save(model: nn.Module) -> Iterator[None]:
    """While active, `model.save_pretrained(dir)` writes only the model's config (its weights live in tdq/)."""

    def save_pretrained(save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        for name in os.listdir(save_directory):  # stale float weights of an earlier save
            if name.startswith("diffusion_pytorch_model") and name.endswith(
                (".safetensors", ".bin", ".json")
            ):
                os.remove(os.path.join(save_directory, name))
        model.save_config(save_directory)

    model.save_pretrained = save_pretrained
    try:
        yield
    finally:
        del model.save_pretrained


@contextlib.contextmanager
def _float_state_dict(model: nn.Module) -> Iterator[None]:
    """While active, `model.state_dict()` omits tdq's quantizer buffers, so standard saving writes a float model."""
    original = model.state_dict

    def state_dict(*args, **kwargs):
        sd = original(*args, **kwargs)
        for key in [k for k in sd if ".weight_quantizer." in k or ".act_quantizer." in k]:
            del sd[key]
        return sd

    model.state_dict = state_dict
    try:
        yield
    finally:
        del model.state_dict


def _read_index(tdq_dir: Path) -> dict[str, Any]:
    path = tdq_dir / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tdq pipeline index {str(path)!r} is corrupted: not valid JSON ({e})") from e
    version = index.get("schema_version") if isinstance(index, dict) else None
    if version != INDEX_SCHEMA_VERSION:
        raise ValueError(
            f"tdq pipeline index {str(path)!r} has schema_version={version!r}; readable versions: "
            f"[{INDEX_SCHEMA_VERSION}]"
        )
    return index


def _has_saved_state(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and (Path(path) / TDQ_DIRNAME / INDEX_FILE).is_file()


def _unet_skeleton(path: Path, dtype: torch.dtype | None) -> nn.Module:
    """The UNet of `path` built from its config with uninitialised weights (the tdq state fills all of them)."""
    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    library, cls_name = index.get("unet", ["diffusers", "UNet2DConditionModel"])
    cls = getattr(diffusers, cls_name, None) if library == "diffusers" else None
    if cls is None:
        raise ValueError(f"cannot rebuild the UNet class {library}.{cls_name} from {str(path)!r}")
    config = cls.load_config(path, subfolder="unet")
    try:
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older diffusers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        unet = cls.from_config(config)
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.eval()


class TDQPipeline(StableDiffusionPipeline):
    r"""
    `StableDiffusionPipeline` with a timestep-aware quantized UNet (and optionally text encoder and VAE decoder).

    Components, `__call__` and its features (prompt, negative prompt, guidance scale, steps, images per prompt,
    generator, `callback_on_step_end`, output type, progress bar) are those of `StableDiffusionPipeline`; the
    quantized UNet reads the timestep of every call through tdq's sampler hook, so any scheduler and step count works
    with one calibration.

    Build it with `TDQPipeline.from_pretrained` (a folder saved by `save_pretrained` is restored without
    calibration) or `TDQPipeline.from_pipe`.
    """

    _tdq_components: dict[str, str] | None = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def tdq_components(self) -> dict[str, nn.Module]:
        """The quantized modules, keyed by component name (`"unet"`, `"text_encoder"`, `"vae"`)."""
        out = {}
        for comp, sub in (self._tdq_components or {}).items():
            module = getattr(self, comp)
            out[comp] = module.get_submodule(sub) if sub else module
        return out

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        tdq_config: TDQConfig | None = None,
        calibration_prompts: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        schedule: Any = None,
        profile: Any = None,
        budget: Any = None,
        calibration_steps: int = 20,
        calibration_kwargs: dict[str, Any] | None = None,
        quantize_text_encoder: bool | TDQConfig = False,
        quantize_vae_decoder: bool | TDQConfig = False,
        backend: str | None = None,
        **kwargs,
    ) -> TDQPipeline:
        r"""
        Load a Stable Diffusion folder and quantize it, or restore a folder saved by `TDQPipeline.save_pretrained`.

        A local folder holding `tdq/tdq_pipeline.json` is restored as saved, with no calibration; the quantization
        arguments are then ignored. Any other folder (or hub id) is loaded with diffusers, its UNet quantized with
        `tdq_config` and calibrated by running this pipeline on `calibration_prompts` inside `tdq.calibration`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A Stable Diffusion folder or hub id (as for `StableDiffusionPipeline.from_pretrained`).
            tdq_config (`TDQConfig`, *optional*):
                Quantization of the UNet; defaults to `TDQConfig()` (W8A8, 10 timestep buckets).
            calibration_prompts (`Sequence[str]`, *optional*):
                Prompts of the calibration run; defaults to `DEFAULT_CALIBRATION_PROMPTS` (8 generic prompts).
            dtype (`torch.dtype`, *optional*):
                dtype of the components (as diffusers' `dtype`).
            torch_dtype (`torch.dtype`, *optional*):
                Same as `dtype` (the older diffusers name); both are accepted and must agree when both are given.
            schedule (`PrecisionSchedule`, `dict` or path, *optional*):
                Mixed-precision schedule applied to the UNet before calibration.
            profile (`SensitivityProfile` or path, *optional*):
                With `budget`, planned into a schedule by `tdq.mixed_precision.planners.plan_precision`.
            budget (`PrecisionBudget` or `dict`, *optional*):
                The bit budget for `profile`.
            calibration_steps (`int`, *optional*, defaults to `20`):
                `num_inference_steps` of the calibration run.
            calibration_kwargs (`dict`, *optional*):
                More arguments for `calibrate` (e.g. `guidance_scale`, `batch_size`, `seed`, `height`, `width`).
            quantize_text_encoder (`bool` or `TDQConfig`, *optional*, defaults to `False`):
                Also quantize the text encoder. It has no timestep: it gets static quantization (one activation
                bucket) with the weight/activation specs of `tdq_config`, or of the `TDQConfig` passed here (set
                `activation.enabled=False` for weight-only).
            quantize_vae_decoder (`bool` or `TDQConfig`, *optional*, defaults to `False`):
                Also quantize `vae.decoder`, in the same static way.
            backend (`str`, *optional*):
                Lower the quantized UNet onto a real backend (`tdq.to_backend`: `"auto"`, `"x86"`, ...). A saved
                state's integer codes go straight into the kernels.
            **kwargs:
                Passed to `StableDiffusionPipeline.from_pretrained`.

        Returns:
            `TDQPipeline`.
        """
        dtype = resolve_dtype(dtype, torch_dtype)
        if dtype is not None:
            kwargs["dtype"] = dtype
        path = pretrained_model_name_or_path
        if _has_saved_state(path):
            ignored = {
                "tdq_config": tdq_config,
                "calibration_prompts": calibration_prompts,
                "schedule": schedule,
                "profile": profile,
            }
            if any(v is not None for v in ignored.values()) or quantize_text_encoder or quantize_vae_decoder:
                logger.warning(
                    "%s holds a saved tdq state: it is restored as saved and the quantization arguments are ignored",
                    path,
                )
            return cls._from_saved(Path(path), dtype, backend=backend, **kwargs)
        if os.path.isdir(Path(path) / TDQ_DIRNAME):
            raise SavedQuantizationError(
                f"{str(path)!r} holds an incomplete tdq save: {TDQ_DIRNAME}/ exists but {TDQ_DIRNAME}/{INDEX_FILE} "
                "does not (TDQPipeline.save_pretrained was interrupted or failed); save the pipeline again"
            )
        pipe = super().from_pretrained(path, **kwargs)
        pipe.quantize(
            tdq_config=tdq_config,
            calibration_prompts=calibration_prompts,
            schedule=schedule,
            profile=profile,
            budget=budget,
            calibration_steps=calibration_steps,
            calibration_kwargs=calibration_kwargs,
            quantize_text_encoder=quantize_text_encoder,
            quantize_vae_decoder=quantize_vae_decoder,
        )
        if backend is not None:
            from tdq.quant.backends import to_backend

            to_backend(pipe.unet, backend)
        return pipe

    @classmethod
    def _from_saved(
        cls, path: Path, dtype: torch.dtype | None, backend: str | None = None, **kwargs
    ) -> TDQPipeline:
        tdq_dir = path / TDQ_DIRNAME
        index = _read_index(tdq_dir)
        components = index.get("components", {})
        for comp in components:
            if comp not in _COMPONENTS:
                raise ValueError(f"tdq pipeline index names an unknown component {comp!r}")
            if comp in kwargs:
                raise ValueError(f"{comp}= cannot be passed: {str(path)!r} holds its saved tdq state")
        if "unet" in components:
            if not has_saved_quantization(tdq_dir / "unet"):
                raise FileNotFoundError(f"{str(path)!r}: the quantized UNet's state tdq/unet/ is missing")
            unet = _unet_skeleton(path, dtype)
            load_quantization(unet, tdq_dir / "unet", backend=backend)
            kwargs["unet"] = unet
        pipe = super().from_pretrained(path, **kwargs)
        for comp, entry in components.items():
            if comp == "unet":
                continue
            sub = entry.get("module", "")
            module = getattr(pipe, comp)
            load_quantization(module.get_submodule(sub) if sub else module, tdq_dir / entry["state"])
        pipe._tdq_components = {comp: entry.get("module", "") for comp, entry in components.items()}
        return pipe

    @classmethod
    def from_pipe(
        cls,
        pipeline,
        tdq_config: TDQConfig | None = None,
        calibration_prompts: Sequence[str] | None = None,
        schedule: Any = None,
        profile: Any = None,
        budget: Any = None,
        calibration_steps: int = 20,
        calibration_kwargs: dict[str, Any] | None = None,
        quantize_text_encoder: bool | TDQConfig = False,
        quantize_vae_decoder: bool | TDQConfig = False,
        **kwargs,
    ) -> TDQPipeline:
        r"""
        Build a `TDQPipeline` from a loaded Stable Diffusion pipeline without reloading weights, then quantize and
        calibrate it (the arguments are those of `from_pretrained`).

        As with diffusers' `from_pipe`, the components are shared: the UNet is quantized in place, so `pipeline`
        runs quantized too (use `tdq.disabled(pipe.unet)` for floating point). A UNet that is already quantized is
        kept as it is. Unlike diffusers' `from_pipe`, the dtype of `pipeline` is kept unless `dtype` is passed.

        Args:
            pipeline (`StableDiffusionPipeline`): the source pipeline.
            **kwargs: components or config values to override, and `dtype` / `torch_dtype`.

        Returns:
            `TDQPipeline`.
        """
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        pipe = super().from_pipe(pipeline, dtype=dtype or pipeline.dtype, **kwargs)
        source = getattr(pipeline, "_tdq_components", None)
        if hasattr(pipe.unet, QUANTIZATION_ATTR):
            pipe._tdq_components = dict(source or {"unet": ""})
            return pipe
        pipe.quantize(
            tdq_config=tdq_config,
            calibration_prompts=calibration_prompts,
            schedule=schedule,
            profile=profile,
            budget=budget,
            calibration_steps=calibration_steps,
            calibration_kwargs=calibration_kwargs,
            quantize_text_encoder=quantize_text_encoder,
            quantize_vae_decoder=quantize_vae_decoder,
        )
        return pipe

    # ------------------------------------------------------------------------------------------------ quantization
    def quantize(
        self,
        tdq_config: TDQConfig | None = None,
        calibration_prompts: Sequence[str] | None = None,
        schedule: Any = None,
        profile: Any = None,
        budget: Any = None,
        calibration_steps: int = 20,
        calibration_kwargs: dict[str, Any] | None = None,
        quantize_text_encoder: bool | TDQConfig = False,
        quantize_vae_decoder: bool | TDQConfig = False,
    ) -> TDQPipeline:
        r"""
        Quantize the UNet (and optionally the text encoder and VAE decoder) in place and calibrate.

        The schedule (if any) is applied before calibration, so range estimators see the final bit-widths. The
        arguments are those of `from_pretrained`.

        Returns:
            `self`.
        """
        if self._tdq_components:
            raise RuntimeError("this pipeline is already quantized")
        if calibration_prompts is not None and (
            isinstance(calibration_prompts, str) or not calibration_prompts
        ):
            raise ValueError(
                f"calibration_prompts={calibration_prompts!r:.60} must be a non-empty list of prompts (or None for "
                "the default prompts)"
            )
        tdq_config = tdq_config or TDQConfig()
        schedule = _load_schedule(schedule, profile, budget)
        num_train = int(self.scheduler.config.get("num_train_timesteps", 1000))
        quantize_(self.unet, tdq_config, num_train_timesteps=num_train)
        components = {"unet": ""}
        if schedule is not None:
            _check_schedule_grid(schedule, self.unet)
            schedule.apply_(self.unet, attention_bits=tdq_config.activation.bits)
        if quantize_text_encoder:
            base = quantize_text_encoder if isinstance(quantize_text_encoder, TDQConfig) else tdq_config
            quantize_static_(self.text_encoder, static_config(base))
            components["text_encoder"] = ""
        if quantize_vae_decoder:
            base = quantize_vae_decoder if isinstance(quantize_vae_decoder, TDQConfig) else tdq_config
            quantize_static_(self.vae.decoder, static_config(base))
            components["vae"] = "decoder"
        self._tdq_components = components
        self.calibrate(
            calibration_prompts or list(DEFAULT_CALIBRATION_PROMPTS),
            num_inference_steps=calibration_steps,
            **(calibration_kwargs or {}),
        )
        return self

    @torch.no_grad()
    def calibrate(
        self,
        prompts: Sequence[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        batch_size: int = 4,
        seed: int = 0,
        run: Callable[[TDQPipeline, list[str]], Any] | None = None,
        **call_kwargs,
    ) -> None:
        r"""
        (Re-)calibrate every quantized component by running this pipeline on `prompts`.

        All quantized modules observe at once, inside `tdq.calibration`: the UNet's observers collect per-bucket
        ranges from the timesteps the scheduler actually passes, the text encoder and VAE decoder (if quantized)
        their single bucket.

        Args:
            prompts (`Sequence[str]`): calibration prompts.
            num_inference_steps (`int`, *optional*, defaults to `20`): sampler steps.
            guidance_scale (`float`, *optional*, defaults to `7.5`): classifier-free guidance scale.
            batch_size (`int`, *optional*, defaults to `4`): prompts per pipeline call.
            seed (`int`, *optional*, defaults to `0`): seed of the calibration noise (batch `i` uses `seed + i`).
            run (`Callable`, *optional*): `run(pipe, prompt_batch)` replaces the default pipeline call.
            **call_kwargs: more arguments for the pipeline call (e.g. `height`, `width`, `negative_prompt`).
        """
        modules = list(self.tdq_components.values())
        if not modules:
            raise RuntimeError("nothing to calibrate: call quantize() first")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("calibration needs at least one prompt")
        output_type = call_kwargs.pop("output_type", "np" if "vae" in self.tdq_components else "latent")
        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(calibration(module, seed=seed))
            for i in range(0, len(prompts), batch_size):
                batch = prompts[i : i + batch_size]
                if run is not None:
                    run(self, batch)
                    continue
                self(
                    prompt=batch,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(seed + i),
                    output_type=output_type,
                    **call_kwargs,
                )

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs
    ) -> None:
        r"""
        Save the standard diffusers folders plus the tdq state in `save_directory/tdq/`.

        The UNet is stored once, as integer codes (and its float non-quantized parameters) in `tdq/unet/`; `unet/`
        holds only its config, so the saved UNet is smaller than the float one by about the ratio of the bit-widths.

        Args:
            save_directory (`str` or `os.PathLike`): output folder.
            safe_serialization (`bool`, *optional*, defaults to `True`): must be `True` (tdq writes no pickle).
            **kwargs: passed to `StableDiffusionPipeline.save_pretrained` (e.g. `variant`, `max_shard_size`).
        """
        if not safe_serialization:
            raise ValueError(
                "TDQPipeline saves safetensors only (safe_serialization=False would write pickle)"
            )
        quantized = self.tdq_components
        for module in quantized.values():  # refuse before anything of an existing save is replaced
            check_saveable(module)
        save_directory = Path(save_directory)
        index_path = save_directory / TDQ_DIRNAME / INDEX_FILE
        # The index is the commit: it is removed first and written last (atomically), and tdq/ exists throughout,
        # so an interrupted save leaves a folder that `from_pretrained` refuses as incomplete, never a mix.
        index_path.unlink(missing_ok=True)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if "unet" in quantized:
                stack.enter_context(_config_only_save(self.unet))
            for comp in quantized:
                if comp != "unet":
                    stack.enter_context(_float_state_dict(getattr(self, comp)))
            super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        if not quantized:
            shutil.rmtree(index_path.parent)  # a plain save: states of an earlier tdq save no longer apply
            return
        source = self.config.get("_name_or_path")
        entries = {}
        for comp, module in quantized.items():
            sub, state_dir = _COMPONENTS[comp]
            save_quantization(
                module,
                save_directory / TDQ_DIRNAME / state_dir,
                source_model=f"{source}/{comp}" if source else None,
                include_float=comp == "unet",
            )
            entries[comp] = {
                "module": sub,
                "state": state_dir,
                "storage": "full" if comp == "unet" else "overlay",
            }
        index = {"schema_version": INDEX_SCHEMA_VERSION, "components": entries}
        text = json.dumps(index, indent=2) + "\n"
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(text))
        remove_temporaries(index_path.parent, f".{INDEX_FILE}.*.tmp")  # left by killed saves; never read
