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


SURVEY = ["survey_pixel_unet", "survey_latent_unet", "survey_dit"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", SURVEY)
def test_survey_notebook_executes(name, tmp_path):
    # one per model family (mnist-ddpm, mnist-t2i, mnist-dit): ablation, Fisher/Hutchinson vs P_l(b), propagation,
    # schedule objective vs drift, all at a tiny size
    nb = nbformat.read(NOTEBOOK.parent / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    for png in ("ablation.png", "hutchinson_vs_ablation.png", "propagation.png"):
        assert (tmp_path / png).is_file(), png
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "Fisher     vs P_l(4): Spearman" in outputs and "Hutchinson vs P_l(4): Spearman" in outputs
    assert "Fisher objective vs drift: Spearman" in outputs
