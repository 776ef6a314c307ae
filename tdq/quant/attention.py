"""Quantized attention matmuls: timestep-aware quantizers on Q, K, V and the softmax probabilities.

With `TDQConfig(attention=True)`, `tdq.quantize_` sets a `QuantAttnProcessor` on every selected attention module
of a registered class (diffusers' `Attention`, found along the MRO: subclasses are included). The processor keeps
the module's own projections (`to_q`/`to_k`/`to_v`/`to_out`, quantized as Linear layers) and quantizes the inputs
of the two attention matmuls:

- `query`, `key`, `value` (after the head split and any `norm_q`/`norm_k`): symmetric per-tensor codes, one scale
  per timestep bucket (signed codes feed an int8 x int8 GEMM without zero-point corrections);
- the softmax probabilities `P`: unsigned codes on `[0, max P]` (zero-point 0, `max P <= 1`), one scale per bucket.

Q, K, V and P take the activation spec's bit-width and observer. The simulated path (`kernel = "simulate"`)
fake-quantizes them and computes `softmax(Q K^T * scale + mask) V` in floating point; the x86 backend may set
`kernel = "aten._int_mm"`, which runs both matmuls on integer codes (int32 sums, see `int8_attention`). Without
the timestep hook (`tdq.disabled`) the module's original processor runs, so the float model is unchanged.

Quantizer state lives in the processor's buffers (`<attention>.processor.query_quantizer.scale`, ...), so
`state_dict()` and saved states hold it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from tdq.config import QuantSpec
from tdq.quant.functional import integer_codes
from tdq.quant.quantizers import TimestepActQuantizer, TimestepContext

logger = logging.getLogger(__name__)

ATTENTION_PROCESSORS: dict[type, type] = {}
QUANTIZER_NAMES = ("query_quantizer", "key_quantizer", "value_quantizer", "prob_quantizer")
QUANTIZER_BUFFERS = {
    "scale": torch.float32,
    "zero_point": torch.float32,
    "bits": torch.int64,
    "min_val": torch.float32,
    "max_val": torch.float32,
    "calibrated": torch.bool,
}

# Attention calls with fewer query x key scores per head than this run the simulator's float arithmetic even where
# the int8 kernel is enabled: each head is one `torch._int_mm` call, whose per-call overhead then dominates.
MIN_INT8_SCORES = 64 * 64
# Heads per chunk of the int8 path: the chunk's int32 score block is kept near this many bytes (cache resident).
CHUNK_BYTES = 1 << 20


def register_attention_processor(attn_cls: type) -> Callable[[type], type]:
    """
    Class decorator: register a quantized attention processor class for `attn_cls` and its subclasses (the most
    derived registration wins, MRO lookup). The class provides `unsupported(module) -> str` (empty when it can
    quantize that module) and `attach(module, name, act_spec, context)` (sets itself on the module).
    """

    def wrap(cls: type) -> type:
        ATTENTION_PROCESSORS[attn_cls] = cls
        return cls

    return wrap


def _register_diffusers() -> None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    ATTENTION_PROCESSORS.setdefault(Attention, QuantAttnProcessor)


def attention_processor_class(module: nn.Module) -> type | None:
    """The quantized processor class registered for `module`'s class or its nearest registered base, or `None`."""
    _register_diffusers()
    for cls in type(module).__mro__:
        if cls in ATTENTION_PROCESSORS:
            return ATTENTION_PROCESSORS[cls]
    return None


def attention_specs(act_spec: QuantSpec) -> tuple[QuantSpec, QuantSpec]:
    """`(qkv_spec, prob_spec)` derived from the activation spec: symmetric Q/K/V, unsigned P (both per tensor)."""
    bits = act_spec.bits
    common = dict(bits=bits, granularity="per_tensor", rounding="nearest", enabled=True)
    qkv = QuantSpec(symmetric=True, observer=act_spec.observer, percentile=act_spec.percentile, **common)
    prob = QuantSpec(symmetric=False, observer="minmax", **common)
    return qkv, prob


def _supported_processor(proc) -> str:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if type(proc) in (AttnProcessor, AttnProcessor2_0):
        return ""
    return f"processor {type(proc).__name__} (only AttnProcessor/AttnProcessor2_0 are reproduced)"


class QuantAttnProcessor(nn.Module):
    r"""
    A diffusers attention processor with timestep-aware quantizers on the attention matmul inputs.

    Computes what `AttnProcessor2_0` computes (spatial/group norm, projections, head split, `norm_q`/`norm_k`,
    attention, output projection, residual, rescale), with `query`, `key`, `value` and the softmax
    probabilities quantized per timestep bucket. The original processor runs when the model's context is inactive.

    Args:
        float_processor: the module's original processor (run without the hook).
        name (`str`): the attention module's full name (for messages).
        act_spec (`QuantSpec`): the activation spec the quantizers' bit-width and observer come from.
        context (`TimestepContext`): the model's timestep context.
    """

    def __init__(self, float_processor, name: str, act_spec: QuantSpec, context: TimestepContext):
        super().__init__()
        self.__dict__["float_processor"] = float_processor  # not a submodule: it holds no state of ours
        self.layer_name = name
        self.context = context
        self.kernel = "simulate"
        qkv, prob = attention_specs(act_spec)
        k = context.num_buckets
        for qname in QUANTIZER_NAMES:
            spec = prob if qname == "prob_quantizer" else qkv
            q = TimestepActQuantizer(spec, k, context, name=f"{name}.{qname.removesuffix('_quantizer')}")
            q.channel_dim = -1
            setattr(self, qname, q)

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        """Why this processor cannot stand in for `module`'s current one (empty when it can)."""
        proc = getattr(module, "processor", None)
        if isinstance(proc, QuantAttnProcessor):
            return "already quantized"
        why = _supported_processor(proc)
        if not why and getattr(module, "fused_projections", False):
            why = "fused QKV projections"
        return why

    @classmethod
    def attach(cls, module: nn.Module, name: str, act_spec: QuantSpec, context: TimestepContext):
        """Build the processor around `module`'s current one and set it (`module.set_processor`)."""
        new = cls(module.processor, name, act_spec, context)
        module.set_processor(new)
        return new

    def quantizers(self) -> Iterator[tuple[str, TimestepActQuantizer]]:
        """`(name, quantizer)` of Q, K, V and P."""
        for qname in QUANTIZER_NAMES:
            yield qname, getattr(self, qname)

    # diffusers filters call kwargs by the signature of `processor.__call__`: spell it out (nn.Module's is *args).
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.context.active:
            return self.float_processor(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        """The quantized attention (see the class docstring); called through `__call__`."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        group_norm = attn.group_norm
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if group_norm is not None and self.kernel != "simulate" and not hidden_states.is_contiguous():
                # int8 kernels on a channels-last input (the x86 backend's layout): the group norm of the 4-D tensor
                # (the statistics of diffusers' group norm of the [B, C, HW] view, summed in another order) keeps
                # the layout, so the projections below read contiguous tokens (no transposing copies). The
                # simulator keeps diffusers' order, bit for bit.
                hidden_states, group_norm = group_norm(hidden_states), None
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if group_norm is not None:
            hidden_states = group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # SDPA's default scale, as AttnProcessor2_0 (which does not pass attn.scale)
        scale = head_dim**-0.5
        hidden_states = self.attend(query, key, value, attention_mask, scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, q, k, v, mask, scale: float) -> torch.Tensor:
        """`softmax(Q K^T * scale + mask) V` on `[B, heads, tokens, head_dim]` with quantized Q, K, V and P."""
        if self.kernel != "simulate" and mask is None:
            out = self._int8(q, k, v, scale)
            if out is not None:
                return out
        q = self.query_quantizer(q)
        k = self.key_quantizer(k)
        v = self.value_quantizer(v)
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = self.prob_quantizer(scores.softmax(dim=-1))
        return torch.matmul(p, v)

    def _int8(self, q, k, v, scale: float) -> torch.Tensor | None:
        ctx = self.context
        qs = [q_ for _, q_ in self.quantizers()]
        if (
            ctx.bucket is None
            or q.dtype != torch.float32
            or q.shape[-2] * k.shape[-2] < MIN_INT8_SCORES
            or any(x.mode != "quant" or not x._calibrated_all() for x in qs)
        ):
            return None
        params = [x._bucket_params()[ctx.bucket] for x in qs]
        # (scale, zp, qmin, qmax, scale_f, zp_i) per quantizer; int8 codes need <= 8 bits (P: 0..255 shifted)
        if any(p[3] - p[2] > 255 for p in params):
            return None
        return int8_attention(q, k, v, scale, *[(p[4], p[2], p[3]) for p in params])


def _codes_i8(
    x: torch.Tensor, scale: float, zp: int, lo: int, hi: int, guard: bool = True
) -> torch.Tensor | None:
    """The `int8` codes of `x` in its layout (`integer_codes(..., signed=True)`), `None` for NaN/+-inf."""
    return integer_codes(x, scale, zp, lo, hi, signed=True, guard=guard)


def int8_attention(q, k, v, scale: float, qp, kp, vp, pp) -> torch.Tensor | None:
    r"""
    `softmax(Q K^T * scale) V` with both matmuls on integer codes (`torch._int_mm`, int32 sums).

    `qp`, `kp`, `vp` are `(scale, qmin, qmax)` of symmetric codes; `pp` is `(scale, 0, qmax)` of the unsigned
    probability codes, which are stored shifted by -128 as `int8` (`P V = (P - 128) V + 128 * colsum(V)`, exact in
    int32). The codes equal the simulator's, so only the float epilogues differ from it (accumulation order); huge
    inputs saturate as there. Returns `None` when Q, K or V hold NaN or +-inf (the caller then runs the simulator's
    attention, which keeps them).
    """
    b, h, n, d = q.shape
    m = k.shape[-2]
    codes = [_codes_i8(x, p[0], 0, p[1], p[2]) for x, p in ((q, qp), (k, kp), (v, vp))]
    if any(c is None for c in codes):
        return None  # NaN/inf in Q, K or V: the caller runs the simulator's attention, which keeps them
    qi, ki, vi = codes  # [B, heads, tokens, head_dim] in the inputs' layouts (head views of the projections)
    vsum = vi.sum(2, dtype=torch.int32).mul_(128)  # [B, heads, d]
    a = qp[0] * kp[0] * scale
    ps, p_hi = pp[0], pp[2]
    # written as [B, tokens, heads, head_dim]: the layout the processor's transpose(1, 2).reshape reads without a copy
    out = torch.empty(b, n, h, d, dtype=torch.float32)
    chunk = max(1, min(h, CHUNK_BYTES // (4 * n * m)))
    s = torch.empty(chunk, n, m, dtype=torch.int32)
    sf = torch.empty(chunk, n, m, dtype=torch.float32)
    o = torch.empty(chunk, n, d, dtype=torch.int32)
    s_h, o_h = s.unbind(0), o.unbind(0)
    for bi in range(b):
        # per-head 2-D views made once per sample (one C++ call each, no copy: _int_mm takes strided operands)
        q_h, kt_h, v_h = qi[bi].unbind(0), ki[bi].transpose(1, 2).unbind(0), vi[bi].unbind(0)
        for h0 in range(0, h, chunk):
            c = min(chunk, h - h0)
            for j in range(c):
                torch._int_mm(q_h[h0 + j], kt_h[h0 + j], out=s_h[j])
            p = torch.mul(s[:c], a, out=sf[:c])
            torch._softmax(p, -1, False, out=p)  # in place: the chunk stays in cache, no new buffer per chunk
            # softmax of finite int32 sums times a finite scale: probabilities in [0, 1], no guard pass needed
            pi = _codes_i8(p, ps, -128, -128, p_hi - 128, guard=False)
            for j, p_j in enumerate(pi.unbind(0)):
                torch._int_mm(p_j, v_h[h0 + j], out=o_h[j])
            torch.add(o[:c], vsum[bi, h0 : h0 + c, None], out=o[:c])
            torch.mul(o[:c], ps * vp[0], out=out[bi, :, h0 : h0 + c].transpose(0, 1))
    return out.transpose(1, 2)


def iter_attention_processors(model: nn.Module) -> Iterator[tuple[str, QuantAttnProcessor]]:
    """Yield `(name, processor)` for every `QuantAttnProcessor` of `model` (name: the processor's module name)."""
    for name, m in model.named_modules():
        if isinstance(m, QuantAttnProcessor):
            yield name, m


def iter_attention_quantizers(model: nn.Module) -> Iterator[tuple[str, TimestepActQuantizer]]:
    """Yield `(name, quantizer)` for the Q/K/V/P quantizers of every `QuantAttnProcessor` of `model`."""
    for name, proc in iter_attention_processors(model):
        for qname, q in proc.quantizers():
            yield f"{name}.{qname}", q


def attention_layers(model: nn.Module, selects: Callable[[str], bool]) -> list[tuple[str, nn.Module, type]]:
    """`(name, module, processor class)` of the attention modules `quantize_attention_` would quantize."""
    out = []
    for name, m in model.named_modules():
        if not name or not selects(name):
            continue
        cls = attention_processor_class(m)
        if cls is None:
            continue
        why = cls.unsupported(m)
        if why:
            logger.info("attention %r: not quantized: %s", name, why)
            continue
        out.append((name, m, cls))
    return out


def quantize_attention_(
    model: nn.Module, act_spec: QuantSpec, context: TimestepContext, selects: Callable[[str], bool]
) -> list[str]:
    """
    Set a quantized processor on every attention module of a registered class that `selects(name)` accepts.

    Returns:
        `list[str]`: the names of the attention modules that got one.
    """
    done = []
    for name, m, cls in attention_layers(model, selects):
        cls.attach(m, name, act_spec, context)
        done.append(name)
    return done


def attention_state_keys(
    model: nn.Module, selects: Callable[[str], bool], num_buckets: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The `{key: (shape, dtype)}` state the attention quantizers add once `quantize_attention_` ran on `model`."""
    out = {}
    for name, _, _ in attention_layers(model, selects):
        for qname in QUANTIZER_NAMES:
            for buf, dtype in QUANTIZER_BUFFERS.items():
                out[f"{name}.processor.{qname}.{buf}"] = ((num_buckets,), dtype)
    return out


def is_attention_quantizer_key(key: str) -> bool:
    """Whether a state-dict key belongs to a quantized attention processor's Q/K/V/P quantizer."""
    parts = key.split(".")
    return len(parts) >= 3 and parts[-3] == "processor" and parts[-2] in QUANTIZER_NAMES
