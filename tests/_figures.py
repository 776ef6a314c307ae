"""Test helper: record what matplotlib figures are saved, so tests can check their size, titles and labels."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

_ATOMIC_TMP = re.compile(r"\.(.+)\.[0-9a-f]{8}\..*\.tmp")


@contextlib.contextmanager
def record_figures():
    """
    Within the block, every `Figure.savefig` call is recorded as a dict: `path`, `size_px` (the figure's own size in
    pixels at the save dpi), and `axes` (per axes: `title`, `xlabel`, `ylabel`, `xticklabels`, `yticklabels`, the
    number of plotted `lines`, and the `ydata` of the first line). Yields the list of records.
    """
    records = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        dpi = kwargs.get("dpi") or self.dpi
        w, h = self.get_size_inches()
        axes = []
        for ax in self.axes:
            lines = ax.get_lines()
            axes.append(
                {
                    "title": ax.get_title(),
                    "xlabel": ax.get_xlabel(),
                    "ylabel": ax.get_ylabel(),
                    "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
                    "yticklabels": [t.get_text() for t in ax.get_yticklabels()],
                    "lines": len(lines),
                    "ydata": list(lines[0].get_ydata()) if lines else [],
                    "patches": len(ax.patches),
                }
            )
        # matplotlib truncates the pixel size (Agg canvas)
        size = (int(w * dpi + 1e-6), int(h * dpi + 1e-6))
        path = Path(fname)
        m = _ATOMIC_TMP.fullmatch(path.name)
        if m:  # tdq writes figures through `tdq.utils.io.atomic_write`: record the name they are renamed to
            path = path.with_name(m.group(1))
        records.append({"path": path, "size_px": size, "axes": axes})
        return original(self, fname, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield records
    finally:
        Figure.savefig = original


def png_size(path) -> tuple[int, int]:
    """`(width, height)` of an image file in pixels."""
    with Image.open(path) as im:
        return im.size
