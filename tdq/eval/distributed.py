"""Multi-process sampling and feature extraction with 🤗 Accelerate.

Seeds are sharded across processes in whole batches: the global seed list is cut into batches of `batch_size`
consecutive seeds exactly as a single process would cut it, and every process takes a contiguous run of those
batches (`split_between_processes`). Each sample therefore runs in the same batch, with the same per-seed initial
and step noise, as in a single-process run, and the gathered results (concatenated in process order, which is seed
order) are bit-identical to the single-process results for the same seeds and batch size, provided every process
uses the same number of CPU threads as the single-process run (thread count changes float32 summation order, ~1e-5).

Launch with e.g. ``accelerate launch --cpu --num_processes 2 -m tdq run ...``. Without a launcher (one process)
every function here reduces to the plain single-process call.

Every function is collective: all processes must call it, in the same order, with the same arguments (except
where an argument is documented as main-process only).

[`Distributed`] bundles these functions behind one object for code that should not branch on the process count
(the stages of `tdq run`): [`get_distributed`] returns a plain [`Distributed`] in a single process (every method is
the plain call) and a [`MultiProcess`] under a launcher (every method shards, gathers or broadcasts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tdq.sampling import DiffusionSampler, SampleResult

__all__ = [
    "Distributed",
    "MultiProcess",
    "broadcast_flag",
    "broadcast_tensor",
    "distributed_extract_features",
    "distributed_sample",
    "gather_rows",
    "get_distributed",
    "get_process_state",
    "shard_batches",
    "sync_buffers",
]


def get_process_state(cpu: bool = False) -> Any:
    r"""
    The process group of this run as an `accelerate.Accelerator`.

    Works unchanged under ``accelerate launch`` (N processes, gloo on CPU / NCCL on GPUs) and in a plain
    ``python`` process (one process).

    Args:
        cpu (`bool`, *optional*, defaults to `False`): force CPU processes (gloo) even when GPUs are visible.

    Returns:
        `accelerate.Accelerator`: with `num_processes`, `process_index`, `is_main_process`, `device`.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=cpu)


def _num(state: Any) -> int:
    return 1 if state is None else int(state.num_processes)


def _comm_device(state: Any) -> torch.device:
    # gloo moves CPU tensors; NCCL needs tensors on this process's GPU.
    dev = torch.device(state.device)
    return dev if dev.type == "cuda" else torch.device("cpu")


def shard_batches(items: Sequence[Any], batch_size: int, state: Any = None) -> list[Any]:
    r"""
    This process's share of `items`, cut into batches of `batch_size` as a single process would cut them.

    Process `p` gets a contiguous run of whole batches (`split_between_processes` over the batch list), so the
    shares, concatenated in process order, are `items` again, and every item sits in the same batch as in a
    single-process loop. With fewer batches than processes some processes get nothing.

    Args:
        items (`Sequence`): e.g. seeds.
        batch_size (`int`): items per batch.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).

    Returns:
        `list`: the local items (flattened).
    """
    items = list(items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if _num(state) == 1:
        return items
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with state.split_between_processes(batches) as local:
        return [x for batch in local for x in batch]


def gather_rows(tensor: torch.Tensor, state: Any = None) -> torch.Tensor:
    r"""
    Concatenate every process's `tensor` along dim 0, in process order, on every process.

    Row counts may differ between processes (including zero); trailing shapes and dtypes must agree. Rows are
    padded to the largest count, all-gathered as tensors (no pickling) and trimmed.

    Args:
        tensor (`torch.Tensor`): local rows `[n_p, ...]`.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).

    Returns:
        `torch.Tensor`: `[sum_p n_p, ...]` on the CPU.
    """
    if _num(state) == 1:
        return tensor.detach().cpu()
    from accelerate.utils import gather

    dev = _comm_device(state)
    counts = gather(torch.tensor([tensor.shape[0]], dtype=torch.long, device=dev)).cpu().tolist()
    most = max(counts)
    local = tensor.detach().to(dev).contiguous()
    if local.shape[0] < most:
        pad = torch.zeros((most - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=dev)
        local = torch.cat([local, pad])
    if most == 0:
        return local.cpu()
    full = gather(local).cpu()
    return torch.cat([full[p * most : p * most + n] for p, n in enumerate(counts)])


def broadcast_tensor(
    tensor: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, state: Any = None
) -> torch.Tensor:
    r"""
    The main process's `tensor` on every process.

    Args:
        tensor (`torch.Tensor`, *optional*): the value (main process only; ignored elsewhere).
        shape (`Sequence[int]`): its shape, known on every process.
        dtype (`torch.dtype`): its dtype.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).

    Returns:
        `torch.Tensor`: on the CPU.
    """
    if _num(state) == 1:
        if tensor is None:
            raise ValueError("tensor is required on the main process")
        return tensor.detach().cpu()
    from accelerate.utils import broadcast

    dev = _comm_device(state)
    if state.is_main_process:
        if tensor is None:
            raise ValueError("tensor is required on the main process")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor has shape {tuple(tensor.shape)}, announced {tuple(shape)}")
        buf = tensor.detach().to(dev, dtype).contiguous()
    else:
        buf = torch.zeros(tuple(shape), dtype=dtype, device=dev)
    return broadcast(buf, from_process=0).cpu()


def broadcast_flag(flag: bool, state: Any = None) -> bool:
    r"""
    The main process's boolean, on every process (one process: `flag` itself).

    Args:
        flag (`bool`): the value (only the main process's value matters).
        state (`Accelerator` or `PartialState`, *optional*): the process group.

    Returns:
        `bool`
    """
    if _num(state) == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.long)
    return bool(broadcast_tensor(value, (1,), torch.long, state).item())


def sync_buffers(module: nn.Module, state: Any = None, contains: str = "_quantizer.") -> int:
    r"""
    Overwrite, on every process, the state-dict tensors of `module` whose names contain `contains` with the main
    process's values (e.g. calibrated quantizer scales), so all processes sample the same quantized model.

    Args:
        module (`nn.Module`): the model.
        state (`Accelerator` or `PartialState`, *optional*): the process group.
        contains (`str`, *optional*, defaults to `"_quantizer."`): name filter.

    Returns:
        `int`: number of tensors synchronized.
    """
    if _num(state) == 1:
        return 0
    count = 0
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if contains not in name:
                continue
            value = broadcast_tensor(t.detach(), tuple(t.shape), t.dtype, state)
            t.data.copy_(value.to(t.device))
            count += 1
    return count


def distributed_sample(
    sampler: DiffusionSampler, seeds: Sequence[int], state: Any = None, desc: str = "sampling"
) -> SampleResult:
    r"""
    Sample one image per seed with the seeds sharded across processes; every process gets the full result.

    Args:
        sampler (`DiffusionSampler`): the sampler (same configuration on every process).
        seeds (`Sequence[int]`): all seeds (the same list on every process).
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).
        desc (`str`, *optional*, defaults to `"sampling"`): progress-bar label.

    Returns:
        `SampleResult`: images and trajectory of all seeds, in the order of `seeds`, on the CPU; bit-identical to
        `sampler(seeds)` in one process with the same `batch_size` and thread count.
    """
    seeds = [int(s) for s in seeds]
    if _num(state) == 1:
        return sampler(seeds, desc=desc)
    local = shard_batches(seeds, sampler.batch_size, state)
    timesteps = sampler.timesteps()
    steps = len(timesteps) if sampler.record_trajectory else 0
    # Latent samplers keep the trajectory and final latents in latent space; pixel samplers in image space.
    latent = sampler.keeps_latents
    tshape = tuple(sampler.model_shape)
    if local:
        part = sampler(local, desc=f"{desc} [{state.process_index}]")
        images, latents = part.images, part.latents
        traj = torch.stack(part.trajectory, dim=1) if steps else torch.zeros(len(local), 0)
    else:  # an empty shard still takes part in every gather, with correctly shaped empty tensors
        images = torch.zeros((0, *sampler.sample_shape))
        latents = torch.zeros((0, *tshape))
        traj = torch.zeros((0, steps, *tshape)) if steps else torch.zeros(0, 0)
    return SampleResult(
        images=gather_rows(images, state),
        trajectory=list(gather_rows(traj, state).unbind(1)) if steps else [],
        timesteps=timesteps,
        seeds=seeds,
        latents=gather_rows(latents, state) if latent else None,
    )


def distributed_extract_features(
    images: torch.Tensor, feature: nn.Module, state: Any = None, *, batch_size: int = 32
) -> torch.Tensor:
    r"""
    `tdq.eval.extract_features` with the rows sharded across processes in whole batches; every process gets all
    features.

    Args:
        images (`torch.Tensor` of shape `[N, C, H, W]`): all images in `[0, 1]` (the same on every process).
        feature (`nn.Module`): maps images to `[n, D]` features.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).
        batch_size (`int`, *optional*, defaults to `32`): images per forward.

    Returns:
        `torch.Tensor` of shape `[N, D]`: float64 features on the CPU, in row order.
    """
    from tdq.eval.metrics import extract_features

    if _num(state) == 1:
        return extract_features(images, feature, batch_size=batch_size)
    rows = shard_batches(range(images.shape[0]), batch_size, state)
    if rows:
        local = extract_features(images[rows[0] : rows[-1] + 1], feature, batch_size=batch_size)
    else:
        dim = getattr(feature, "num_features", None)
        if dim is None:  # learn D from a one-image forward
            dim = extract_features(images[:1], feature, batch_size=1).shape[1]
        local = torch.zeros((0, int(dim)), dtype=torch.float64)
    return gather_rows(local, state)


class Distributed:
    r"""
    The process group of a run, as one object whose methods are collective operations.

    This class is the single-process implementation: every method is the plain single-process call (`sample` is
    `sampler(seeds)`, `broadcast` returns its argument, `sync_buffers` does nothing). [`MultiProcess`] overrides
    the methods with their sharded or broadcasting versions, so calling code is the same for one process and many.
    Get the right one with [`get_distributed`].

    Args:
        state (`Accelerator` or `PartialState`, *optional*): the process state (only its `device` is used here);
            `None` means one CPU process.
    """

    def __init__(self, state: Any = None):
        self.state = state

    @property
    def num_processes(self) -> int:
        """`int`: number of processes."""
        return 1

    @property
    def process_index(self) -> int:
        """`int`: index of this process (0 is the main process)."""
        return 0

    @property
    def is_main(self) -> bool:
        """`bool`: whether this is the main process (the one that computes metrics and writes files)."""
        return True

    def resolve_device(self, name: str) -> torch.device:
        r"""
        The torch device for a config value.

        Args:
            name (`str`): `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (the process state's device).

        Returns:
            `torch.device`
        """
        if name == "auto":
            return torch.device(self.state.device if self.state is not None else "cpu")
        return torch.device(name)

    def sample(self, sampler: DiffusionSampler, seeds: Sequence[int], desc: str = "sampling") -> SampleResult:
        r"""
        One sample per seed (see [`distributed_sample`]).

        Args:
            sampler (`DiffusionSampler`): the sampler (same configuration on every process).
            seeds (`Sequence[int]`): all seeds (the same list on every process).
            desc (`str`, *optional*, defaults to `"sampling"`): progress-bar label.

        Returns:
            `SampleResult`: all seeds, in the order of `seeds`, on every process.
        """
        return sampler([int(s) for s in seeds], desc=desc)

    def extract_features(
        self, images: torch.Tensor, feature: nn.Module, *, batch_size: int = 32
    ) -> torch.Tensor:
        r"""
        Features of all images (see [`distributed_extract_features`]).

        Args:
            images (`torch.Tensor` of shape `[N, C, H, W]`): all images in `[0, 1]` (the same on every process).
            feature (`nn.Module`): maps images to `[n, D]` features.
            batch_size (`int`, *optional*, defaults to `32`): images per forward.

        Returns:
            `torch.Tensor` of shape `[N, D]`: float64 features on the CPU, on every process.
        """
        from tdq.eval.metrics import extract_features

        return extract_features(images, feature, batch_size=batch_size)

    def broadcast(
        self,
        tensor: torch.Tensor | None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        r"""
        The main process's `tensor` on every process (one process: `tensor` itself, unchanged).

        Args:
            tensor (`torch.Tensor`, *optional*): the value (required on the main process; elsewhere only used for
                `shape` and `dtype` when they are not given).
            shape (`Sequence[int]`, *optional*): its shape (default: `tensor.shape`).
            dtype (`torch.dtype`, *optional*): its dtype (default: `tensor.dtype`).

        Returns:
            `torch.Tensor`
        """
        if tensor is None:
            raise ValueError("tensor is required on the main process")
        return tensor

    def broadcast_flag(self, flag: bool) -> bool:
        r"""
        The main process's boolean on every process (see [`broadcast_flag`]).

        Args:
            flag (`bool`): the value (only the main process's value matters).

        Returns:
            `bool`
        """
        return bool(flag)

    def sync_buffers(self, module: nn.Module, contains: str = "_quantizer.") -> int:
        r"""
        Give every process the main process's quantizer buffers (see [`sync_buffers`]); one process: nothing.

        Args:
            module (`nn.Module`): the model.
            contains (`str`, *optional*, defaults to `"_quantizer."`): name filter.

        Returns:
            `int`: number of tensors synchronized.
        """
        return 0

    def wait_for_everyone(self) -> None:
        """Block until every process gets here (one process: return at once)."""


class MultiProcess(Distributed):
    r"""
    [`Distributed`] for N processes under ``accelerate launch``: seeds and feature rows are sharded in whole
    batches and gathered on every process, tensors are broadcast from the main process.

    Args:
        state (`Accelerator` or `PartialState`): the process state, with `num_processes > 1`.
    """

    def __init__(self, state: Any):
        super().__init__(state)

    @property
    def num_processes(self) -> int:
        """`int`: number of processes."""
        return int(self.state.num_processes)

    @property
    def process_index(self) -> int:
        """`int`: index of this process (0 is the main process)."""
        return int(self.state.process_index)

    @property
    def is_main(self) -> bool:
        """`bool`: whether this is the main process."""
        return bool(self.state.is_main_process)

    def resolve_device(self, name: str) -> torch.device:
        r"""
        The torch device for a config value; `"cuda"` and `"auto"` are this process's own device.

        Args:
            name (`str`): `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"`.

        Returns:
            `torch.device`
        """
        if name in ("auto", "cuda"):
            return torch.device(self.state.device)
        return torch.device(name)

    def sample(self, sampler: DiffusionSampler, seeds: Sequence[int], desc: str = "sampling") -> SampleResult:
        return distributed_sample(sampler, seeds, self.state, desc=desc)

    def extract_features(
        self, images: torch.Tensor, feature: nn.Module, *, batch_size: int = 32
    ) -> torch.Tensor:
        return distributed_extract_features(images, feature, self.state, batch_size=batch_size)

    def broadcast(
        self,
        tensor: torch.Tensor | None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if shape is None or dtype is None:
            if tensor is None:
                raise ValueError("shape and dtype are required where tensor is None")
            shape = tuple(tensor.shape) if shape is None else shape
            dtype = tensor.dtype if dtype is None else dtype
        return broadcast_tensor(tensor, shape, dtype, self.state)

    def broadcast_flag(self, flag: bool) -> bool:
        return broadcast_flag(flag, self.state)

    def sync_buffers(self, module: nn.Module, contains: str = "_quantizer.") -> int:
        return sync_buffers(module, self.state, contains=contains)

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()


def get_distributed(cpu: bool = False) -> Distributed:
    r"""
    The process group of this run: [`MultiProcess`] under a launcher with several processes, else [`Distributed`].

    Args:
        cpu (`bool`, *optional*, defaults to `False`): force CPU processes (gloo) even when GPUs are visible.

    Returns:
        `Distributed`
    """
    state = get_process_state(cpu=cpu)
    return MultiProcess(state) if int(state.num_processes) > 1 else Distributed(state)
