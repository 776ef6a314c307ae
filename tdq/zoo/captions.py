"""Captions of the latent zoo models (templates x digit words/numerals) and their word-level CLIP BPE tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = [
    "BOS",
    "DIGIT_WORDS",
    "EOS",
    "MAX_TEXT_LEN",
    "TEMPLATES",
    "all_captions",
    "build_tokenizer",
    "caption_vocab",
    "write_tokenizer_files",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates; ``{}`` is filled with a digit word ("seven") or a numeral ("7")
TEMPLATES = (
    "{}",
    "a handwritten digit {}",
    "the digit {}",
    "the number {}",
    "a handwritten {}",
    "digit {}",
    "an image of the digit {}",
    "a photo of a handwritten number {}",
    "a drawing of the number {}",
    "a picture of a {}",
    "handwritten number {}",
    "a black and white image of the digit {}",
)
MAX_TEXT_LEN = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def all_captions() -> tuple[list[str], list[int]]:
    r"""
    Every training caption: each template in [`TEMPLATES`] filled with each digit word and each numeral.

    Returns:
        `tuple[list[str], list[int]]`: captions and their digit labels.
    """
    caps, labels = [], []
    for d, w in enumerate(DIGIT_WORDS):
        for t in TEMPLATES:
            for filler in (w, str(d)):
                caps.append(t.format(filler))
                labels.append(d)
    return caps, labels


def caption_vocab() -> list[str]:
    r"""
    Sorted list of the distinct words used by the captions.

    Returns:
        `list[str]`: words (lower case letters or single numerals).
    """
    words = set()
    for c in all_captions()[0]:
        words.update(c.split())
    return sorted(words)


def _bpe_segment(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a symbol sequence, as the tokenizers ``BPE`` model does."""
    syms = list(syms)
    while len(syms) > 1:
        pairs = [
            (ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms[:-1], syms[1:], strict=True))
        ]
        r, i = min(pairs)
        if r == math.inf:
            break
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    return syms


def _word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab + merges of a BPE that encodes each word of ``words`` as one token.

    Words are added one at a time: a word is first segmented with the merges so far, then new (lower
    priority) merges join its pieces left to right, so earlier words keep encoding as single tokens.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    chars = sorted(
        {c for w in words for c in w} | {chr(c) for c in range(ord("a"), ord("z") + 1)} | set("0123456789")
    )
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = _bpe_segment(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = pieces[0]
        for s in pieces[1:]:
            ranks[(cur, s)] = len(merges)
            merges.append((cur, s))
            cur = cur + s
            vocab.setdefault(cur, len(vocab))
    return vocab, merges


def write_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    r"""
    Write ``vocab.json`` and ``merges.txt`` of a word-level CLIP BPE covering the caption vocabulary.

    Every caption word maps to a single token; unseen words fall back to character tokens.

    Args:
        directory (`str` or `pathlib.Path`): output directory (created).

    Returns:
        `tuple[pathlib.Path, pathlib.Path]`: paths of ``vocab.json`` and ``merges.txt``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = _word_bpe(caption_vocab())
    (d / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return d / "vocab.json", d / "merges.txt"


def build_tokenizer(directory: str | Path | None = None):
    r"""
    Build the caption [`~transformers.CLIPTokenizer`] from locally generated vocabulary files.

    Args:
        directory (`str` or `pathlib.Path`, *optional*): where to write ``vocab.json``/``merges.txt``
            (a temporary directory when omitted).

    Returns:
        `transformers.CLIPTokenizer`: tokenizer with ``model_max_length`` = 16.
    """
    import tempfile

    from transformers import CLIPTokenizer

    if directory is None:
        directory = tempfile.mkdtemp(prefix="tdq_clip_tok_")
    vf, mf = write_tokenizer_files(directory)
    tok = CLIPTokenizer(vocab=str(vf), merges=str(mf), model_max_length=MAX_TEXT_LEN)
    return tok
