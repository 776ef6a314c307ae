"""The public surface: top-level imports, docstrings on every public name, and the README's Python snippets."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import torch

import tdq

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_imports():
    from tdq import TDQConfig, TDQPipeline, calibration, disabled, quantize_, wrap  # noqa: F401

    assert TDQPipeline.__name__ == "TDQPipeline"
    for name in tdq.__all__:
        assert getattr(tdq, name) is not None


def _public_names():
    for info in pkgutil.walk_packages(tdq.__path__, "tdq."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        yield info.name, mod, None
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{info.name}.{name}", obj, None
                if inspect.isclass(obj):
                    for mname, m in vars(obj).items():
                        if not mname.startswith("_") and inspect.isfunction(m):
                            yield f"{info.name}.{name}.{mname}", getattr(obj, mname), obj


def test_every_public_name_has_a_docstring():
    missing = []
    for qualname, obj, owner in _public_names():
        if owner is not None and qualname.rsplit(".", 1)[1] in ("forward", "extra_repr"):
            continue  # nn.Module protocol methods: the class docstring says what the module computes
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(qualname)
    assert not missing, f"public names without a docstring: {missing}"


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_snippets():
    assert len(_readme_blocks()) >= 3


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    """The README's Python blocks, executed in order in one namespace (they build on each other)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, code in enumerate(_readme_blocks()):
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    # what the blocks claim: quantized images differ from FP but stay close; the reload is exact
    import numpy as np

    images, reference = namespace["images"], namespace["reference"]
    assert images.shape == reference.shape == (4, 28, 28, 1)
    mse = float(np.mean((images - reference) ** 2))
    assert 0 < mse < 1e-2, mse
    unet, fresh = namespace["unet"], namespace["fresh"]
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 500).sample, unet(x, 500).sample, rtol=0, atol=0)
    assert (tmp_path / "sd-tdq" / "model_index.json").is_file()
