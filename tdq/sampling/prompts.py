"""Benchmark prompt files: the captions (text-to-image) or class names (class-conditional) that a run samples."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PromptFileError", "PromptList", "load_prompts"]

PROMPT_COLUMNS = ("prompt", "caption", "text", "class")
LABEL_COLUMNS = ("label", "class_id")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a prompt list; the message names the file and the line or entry."""


@dataclass(frozen=True)
class PromptList:
    r"""
    The prompts of a benchmark, in file order: the sample of seed `s` takes prompt `s % len(prompts)`
    (see [`~tdq.sampling.conditioning.Conditioning`]).

    Args:
        prompts (`tuple[str, ...]`): the prompts (text models) or class names (class models).
        labels (`tuple[int, ...]`, *optional*): the judge class of every prompt (for class accuracy), when the
            file gives one.
        path (`str`): the file they came from.
        sha256 (`str`): the file's sha256 (part of the reference-cache key).
    """

    prompts: tuple[str, ...]
    labels: tuple[int, ...] | None
    path: str
    sha256: str


def _label(value, where: str) -> int:
    try:
        out = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise PromptFileError(f"{where}: label {value!r} is not an integer") from None
    if isinstance(value, bool) or out < 0:
        raise PromptFileError(f"{where}: label {value!r} must be an integer >= 0")
    return out


def _from_rows(rows: list[dict], name: str) -> tuple[list[str], list[int] | None]:
    prompts, labels = [], []
    for i, row in enumerate(rows):
        where = f"{name}: entry {i + 1}"
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: expected a string or an object with a 'prompt', got {row!r}")
        key = next((k for k in PROMPT_COLUMNS if k in row), None)
        if key is None:
            raise PromptFileError(f"{where}: has none of the columns {list(PROMPT_COLUMNS)} ({sorted(row)})")
        prompts.append(row[key])
        lab = next((k for k in LABEL_COLUMNS if k in row and row[k] not in (None, "")), None)
        labels.append(None if lab is None else _label(row[lab], where))
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        missing = [i + 1 for i, lab in enumerate(labels) if lab is None][:5]
        raise PromptFileError(
            f"{name}: some entries have a label and some do not (no label: entries {missing})"
        )
    return prompts, None if labels and labels[0] is None else labels


def load_prompts(path: str | os.PathLike) -> PromptList:
    r"""
    Read a prompt file.

    Formats, chosen by extension:
    - `.txt`: one prompt per line (blank lines skipped, surrounding whitespace stripped);
    - `.json`: a list of strings, or of objects with `prompt` (or `caption`, `text`, `class`) and optionally `label`;
    - `.csv`: a header row with a `prompt` (or `caption`, `text`, `class`) column and optionally `label`.

    Args:
        path (`str` or `os.PathLike`): the file.

    Returns:
        [`PromptList`].

    Raises:
        `PromptFileError`: a missing or empty file, an unknown extension, an empty prompt, a row without a prompt
            column, a label that is not an integer >= 0, or labels on only some rows; the message names the file
            and the entry.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file {str(p)!r} does not exist")
    raw = p.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e})") from None
    ext = p.suffix.lower()
    labels = None
    if ext == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}: invalid JSON ({e})") from None
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise PromptFileError(f"{p}: expected a JSON list of prompts, got {type(data).__name__}")
        if all(isinstance(d, str) for d in data):
            prompts = list(data)
        else:
            prompts, labels = _from_rows(data, str(p))
    elif ext == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        prompts, labels = _from_rows(rows, str(p))
    else:
        raise PromptFileError(f"{p}: unknown prompt file type {ext!r}; use .txt, .json or .csv")
    if not prompts:
        raise PromptFileError(f"{p}: holds no prompts")
    for i, s in enumerate(prompts):
        if not isinstance(s, str) or not s.strip():
            raise PromptFileError(f"{p}: entry {i + 1} is not a non-empty string ({s!r})")
    return PromptList(
        prompts=tuple(s.strip() for s in prompts),
        labels=None if labels is None else tuple(labels),
        path=str(p),
        sha256=digest,
    )
