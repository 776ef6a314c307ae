"""Every `quant=` preset composes with `tdq run`'s config and validates, says what it is, and its bits match its name."""

import re
from pathlib import Path

import pytest
import yaml

import tdq

PRESETS = Path(tdq.__file__).parent / "configs" / "quant"
NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))

#: The presets the experiment suite and the README rely on (issue #13).
REQUIRED = [
    "w8a8",
    "w8a8-static",
    "w8a6",
    "w8a6-static",
    "w6a6",
    "w6a6-static",
    "w4a8",
    "w4a8-static",
    "w4a6",
    "w8a4",
]


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tdq.run.cli import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PRESETS.parent), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_required_presets_exist():
    assert not set(REQUIRED) - set(NAMES), sorted(set(REQUIRED) - set(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_preset_composes_and_validates(name):
    from tdq.run.config import to_run_config

    cfg = to_run_config(_compose([f"quant={name}"]))
    cfg.validate()
    m = re.match(r"w(\d+)a(\d+)", name)
    assert m, f"preset name {name!r} does not start with w<bits>a<bits>"
    assert cfg.quant.weight.bits == int(m.group(1)), name
    assert cfg.quant.activation.bits == int(m.group(2)), name
    assert cfg.quant.grid.num_buckets == (1 if name.endswith("-static") else 10), name
    first = (PRESETS / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, f"{name}.yaml must open with a one-line comment"


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-static")])
def test_static_preset_is_its_aware_preset_with_one_bucket(name):
    aware = yaml.safe_load((PRESETS / f"{name[: -len('-static')]}.yaml").read_text())
    static = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    assert static.pop("grid") == {"num_buckets": 1}
    assert aware.pop("grid") == {"num_buckets": 10}
    assert static == aware
