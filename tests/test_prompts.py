"""Benchmark prompt files (`eval.prompts_file`): reading, conditioning by seed, `tdq run` with captions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tdq.errors import ConfigError
from tdq.run.evaluate import compose_run_config
from tdq.run.job import run_experiment
from tdq.run.models import ModelConfig, load_model
from tdq.sampling.conditioning import Conditioning, model_conditioning
from tdq.sampling.prompts import PromptFileError, load_prompts
from tdq.testing.runs import TINY_RUN

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_formats_read_the_same_prompts(tmp_path):
    txt = load_prompts(_write(tmp_path, "p.txt", "a cat\n\n  a dog  \n"))
    assert txt.prompts == ("a cat", "a dog") and txt.labels is None
    js = load_prompts(_write(tmp_path, "p.json", json.dumps(["a cat", "a dog"])))
    assert js.prompts == txt.prompts and js.labels is None
    rows = load_prompts(
        _write(
            tmp_path,
            "r.json",
            json.dumps([{"prompt": "a cat", "label": 3}, {"caption": "a dog", "label": "5"}]),
        )
    )
    assert rows.prompts == ("a cat", "a dog") and rows.labels == (3, 5)
    csv = load_prompts(_write(tmp_path, "p.csv", "caption,label\na cat,3\na dog,5\n"))
    assert csv.prompts == rows.prompts and csv.labels == (3, 5)
    assert len(csv.sha256) == 64 and csv.sha256 != rows.sha256


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("empty.txt", "\n \n", "holds no prompts"),
        ("p.yaml", "a: 1", "unknown prompt file type '.yaml'"),
        ("bad.json", "[1, 2", "invalid JSON"),
        ("obj.json", json.dumps({"a": 1}), "expected a JSON list"),
        ("col.csv", "text2,label\nx,1\n", r"entry 1: has none of the columns"),
        ("lab.csv", "prompt,label\nx,1\ny,seven\n", "entry 2: label 'seven' is not an integer"),
        ("neg.csv", "prompt,label\nx,-1\n", "entry 1: label '-1' must be an integer >= 0"),
        (
            "some.csv",
            "prompt,label\nx,1\ny,\n",
            r"some entries have a label and some do not \(no label: entries \[2\]\)",
        ),
        ("blank.json", json.dumps(["x", " "]), "entry 2 is not a non-empty string"),
    ],
)
def test_bad_prompt_files_are_named(tmp_path, name, text, match):
    path = _write(tmp_path, name, text)
    with pytest.raises(PromptFileError, match=match) as e:
        load_prompts(path)
    assert name in str(e.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="nope.txt' does not exist"):
        load_prompts(tmp_path / "nope.txt")


@pytest.fixture(scope="module")
def t2i():
    return load_model(ModelConfig(name="mnist-t2i", source="zoo", class_names=DIGITS))


def test_prompt_file_conditions_seeds_in_order(tmp_path, t2i):
    default = model_conditioning(t2i)
    # the class prompts written out as a file give exactly the default conditioning
    same = load_prompts(_write(tmp_path, "same.txt", "\n".join(f"a handwritten digit {d}" for d in DIGITS)))
    cond = model_conditioning(t2i, prompt_list=same)
    seeds = [0, 3, 11, 27]
    assert cond.prompts(seeds) == default.prompts(seeds)
    assert torch.equal(cond.cond(seeds, "cpu"), default.cond(seeds, "cpu"))
    # two captions cycle by seed; their labels are the judge classes
    two = load_prompts(
        _write(tmp_path, "two.csv", "prompt,label\na handwritten digit seven,7\nthe number two,2\n")
    )
    cond = model_conditioning(t2i, prompt_list=two)
    assert cond.prompts(seeds) == ["a handwritten digit seven"] + ["the number two"] * 3  # seed % 2
    assert cond.labels(seeds) == [7, 2, 2, 2]
    emb = cond.cond(seeds, "cpu")
    assert torch.equal(emb[0], default.cond([7], "cpu")[0])  # "a handwritten digit seven" is class 7's prompt
    assert not torch.equal(emb[1], default.cond([2], "cpu")[0])  # another wording of "two"
    assert cond.describe()["prompts_file"]["sha256"] == two.sha256
    unlabelled = model_conditioning(t2i, prompt_list=load_prompts(_write(tmp_path, "u.txt", "a b\n")))
    assert not unlabelled.has_labels
    with pytest.raises(ValueError, match="has no labels"):
        unlabelled.labels([0])
    with pytest.raises(ValueError, match="label 12 of entry 1 is outside the model's 10 classes"):
        model_conditioning(t2i, prompt_list=load_prompts(_write(tmp_path, "big.csv", "prompt,label\nx,12\n")))


def test_class_model_prompt_file_lists_class_names(tmp_path):
    names = ["zero", "one", "two", "three"]
    pl = load_prompts(_write(tmp_path, "classes.txt", "three\none\n"))
    cond = Conditioning("class", names, prompt_list=pl)
    assert cond.labels([0, 1, 2]) == [3, 1, 3]
    assert cond.cond([0, 1], "cpu").tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"classes.txt: entry 2 'eleven' is not a class name"):
        Conditioning(
            "class", names, prompt_list=load_prompts(_write(tmp_path, "classes.txt", "three\neleven\n"))
        )


TINY = [*TINY_RUN, "schedule.planner=none"]


def test_pixel_model_refuses_a_prompt_file(tmp_path):
    p = _write(tmp_path, "p.txt", "a cat\n")
    cfg = compose_run_config(["model=mnist-ddpm", *TINY, f"eval.prompts_file={p}"])
    with pytest.raises(ConfigError, match=r"eval.prompts_file=.*is unconditional"):
        run_experiment(cfg, tmp_path / "run")


def test_bad_clip_folder_fails_before_sampling(tmp_path):
    cfg = compose_run_config(["model=mnist-t2i", *TINY, f"eval.clip={tmp_path / 'noclip'}"])
    with pytest.raises(ConfigError, match=r"eval.clip=.*noclip.*config.json missing"):
        run_experiment(cfg, tmp_path / "run")


@pytest.mark.timeout(300)
def test_tdq_run_t2i_with_a_captions_file(tmp_path):
    captions = _write(
        tmp_path, "captions.csv", "caption,label\na handwritten digit seven,7\na handwritten digit two,2\n"
    )
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "tdq", "run", "model=mnist-t2i", *TINY,
        f"eval.prompts_file={captions}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cond = json.loads((run_dir / "report.json").read_text())["conditioning"]
    assert cond["prompts_file"]["entries"] == 2 and cond["prompts_histogram"] == [2, 2]
    hist = cond["labels_histogram"]
    assert hist[7] == 2 and hist[2] == 2 and sum(hist) == 4
    assert "prompt_template" not in cond
    # the judge reads the captioned digits (not seed % 10: seeds 0..3 would be digits 0..3)
    assert cond["judge"]["fp"]["accuracy"] >= 0.75, cond["judge"]
    assert cond["clip_score"]["fp"] > 0
    assert "of the prompts file" in (run_dir / "report.md").read_text()


def test_sd_layout_model_runs_from_a_prompt_file_alone(tmp_path):
    """A Stable Diffusion-layout pipeline folder with no class names: captions from the file, no judge labels."""
    from tdq.testing.pipelines import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "sd")
    prompts = _write(tmp_path, "prompts.txt", "a red square\na blue circle\na green line\n")
    base = ["model=path", f"model.path={folder}", "model.name=tiny-sd", *TINY, "eval.clip=none"]
    with pytest.raises(ConfigError, match="needs eval.prompts_file"):
        run_experiment(compose_run_config(base), tmp_path / "no_prompts")
    report = run_experiment(compose_run_config([*base, f"eval.prompts_file={prompts}"]), tmp_path / "run")
    cond = report["conditioning"]
    assert cond["prompts_file"]["entries"] == 3 and cond["prompts_histogram"] == [2, 1, 1]  # seeds 0..3
    assert "labels_histogram" not in cond and cond["judge"] is None
    assert "no labels" in cond["judge_skipped"]
    assert report["psnr"] > 0
