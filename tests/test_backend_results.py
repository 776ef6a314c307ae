"""The README's backend speed claims hold in the committed benchmark results (experiments/results/backends.json and
profile_big-unet_*.json): the quoted numbers are the measured ones, and their signs (x86 faster than FP32 and than
torchao, the channels-last model faster than NCHW outputs, the kernels' floor above 0.40x) are what the files say."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ZEN5 = "AMD EPYC Zen 5 (avx512_vnni) latency, channels-last model"
ZEN5_NCHW = "AMD EPYC Zen 5 (avx512_vnni) latency, NCHW outputs (TDQ_X86_CHANNELS_LAST=0)"
ZEN5_AVX2_CL = "AMD EPYC Zen 5 emulating AVX2, channels-last model (TDQ_X86_CHANNELS_LAST=1)"
ZEN5_AVX2 = "AMD EPYC Zen 5 emulating AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"


def _sets() -> dict:
    return json.loads((RESULTS / "backends.json").read_text())["row_sets"]


def _ratio(row_set: str, model: str, variant: str, key: str = "ratio_median") -> float:
    row = _sets()[row_set]["models"][model]["variants"][variant]
    return float(row["timing"][key])


def _readme_row(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    for line in text.splitlines():
        if line.startswith(f"| {title} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"README has no table row {title!r}")


def _first_x(cell: str) -> tuple[float, float | None]:
    nums = [float(v) for v in re.findall(r"(\d+\.\d+)x", cell)]
    return nums[0], (nums[1] if len(nums) > 1 else None)


def test_readme_zen5_table_quotes_the_measured_ratios():
    models = {"big UNet (38 M)": "big-unet", "mnist-ddpm": "mnist-ddpm", "half-width SD-1.5 UNet": "sd-half"}
    text = (ROOT / "README.md").read_text()
    start = text.index("**AMD EPYC Zen 5, AVX-512 VNNI, no AMX**")
    table = text[start : text.index("\n\n", text.index("| model |", start))]
    seen = 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in models:
            continue
        model = models[cells[0]]
        seen += 1
        for col, (variant, row_set) in enumerate(
            [("x86", ZEN5), ("x86", ZEN5_NCHW), ("x86_attention", ZEN5), ("torchao_int8_dyn", ZEN5)], start=1
        ):
            if not cells[col]:
                continue
            median, lo = _first_x(cells[col])
            assert median == round(_ratio(row_set, model, variant), 2), (model, variant)
            if lo is not None:
                assert lo == round(_ratio(row_set, model, variant, "ratio_min"), 2), (model, variant)
    assert seen == 3


def test_x86_is_faster_than_fp32_and_torchao_in_every_row_set():
    compared = 0
    for name, rs in _sets().items():
        for model, m in rs.get("models", {}).items():
            v = m.get("variants", {})
            x86 = v.get("x86", {}).get("timing", {}).get("ratio_median")
            if x86 is None:
                continue
            assert x86 < 1.0, (name, model)
            tao = v.get("torchao_int8_dyn", {}).get("timing", {}).get("ratio_median")
            if tao is not None:
                assert x86 < tao, (name, model)
                compared += 1
    assert compared >= 5


@pytest.mark.parametrize("cl, nchw", [(ZEN5, ZEN5_NCHW), (ZEN5_AVX2_CL, ZEN5_AVX2)])
def test_channels_last_model_is_faster_than_nchw_outputs(cl, nchw):
    assert _ratio(cl, "big-unet", "x86") < _ratio(nchw, "big-unet", "x86")


def test_avx2_emulation_meets_its_target_and_vnni_misses_its_own():
    assert _ratio(ZEN5_AVX2_CL, "big-unet", "x86") <= 0.70
    assert "**0.62x** (0.58x)" in (ROOT / "README.md").read_text()
    assert round(_ratio(ZEN5_AVX2_CL, "big-unet", "x86"), 2) == 0.62
    # the README says the <= 0.40x VNNI target is not met without AMX
    assert _ratio(ZEN5, "big-unet", "x86") > 0.40 and _ratio(ZEN5, "big-unet", "x86_attention") > 0.40


def test_profile_floor_with_fp32_attention_is_above_the_target():
    prof = json.loads((RESULTS / "profile_big-unet_x86.json").read_text())
    share = {r["group"]: r["int8_share_of_fp32_call"] for r in prof["rows"]}
    floor = (
        share["int8 GEMM kernels"]
        + share["FP32 fused attention (SDPA)"]
        + next(v for g, v in share.items() if g.startswith("float elementwise"))
    )
    # README: "with FP32 attention the kernels alone already sum past 0.40"
    assert floor > 0.40
    text = (ROOT / "README.md").read_text()
    assert f"int8 GEMM kernels {share['int8 GEMM kernels']:.2f}" in text
    assert f"FP32 flash attention {share['FP32 fused attention (SDPA)']:.2f}" in text
