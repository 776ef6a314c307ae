"""The sensitivity-profile notebook runs top to bottom (FAST mode: tiny model)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sensitivity_profile.ipynb"


@pytest.mark.timeout(600)
def test_sensitivity_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    flag = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("FAST =")]
    assert flag, "the notebook's first code cell sets FAST"
    flag[0].source = "FAST = True"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / "sensitivity_act.png").is_file()
    assert (tmp_path / "schedule.png").is_file()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "MILP objective" in outputs
