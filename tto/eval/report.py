"""Results of a run: one JSON file, PNG plots (matplotlib, Agg backend), a compact printed table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: resolution of every saved plot
PLOT_DPI = 110


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` (tight bounding box) and release it."""
    fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def safe_name(name: str) -> str:
    """A model name usable in a file name."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def write_json(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    return path


def table(rows: dict[str, dict[str, float | None]]) -> str:
    """``{model: {column: value}}`` as aligned text; missing values print as '-'."""
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"

    cells = [["model", *columns]] + [[name, *(fmt(r.get(c)) for c in columns)] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
