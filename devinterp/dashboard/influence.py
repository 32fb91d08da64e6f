"""The influence and susceptibility panels.

Influence (:attr:`Run.influence`, written by ``LLCCallback(probes=...)``): for a chosen
checkpoint and query (probe) sample, its most influential training samples as a table, and as
an image grid when the run keeps image inputs (``influence/*.npy`` of shape (N, H, W),
(N, 1|3, H, W) or (N, H, W, 1|3)): thumbnails are PNG ``data:`` URIs built here, so the page
needs no file access and the browser only lays them out.

Susceptibilities (:attr:`Run.susceptibilities`, ``susceptibilities.csv``): a component × probe
heatmap per checkpoint, drawn as a table whose cells carry their colour (the bundled plotly.js
has no heatmap trace). Colours run blue (negative) through white to red (positive), on a scale
symmetric about zero set by the checkpoint's largest |susceptibility|.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from devinterp.run.store import Run

__all__ = ["DEFAULT_TOP", "MAX_QUERIES", "diverging_color", "image_rows", "influence_panel",
           "png_data_uri", "susceptibility_panel", "top_influences"]

#: Training samples listed per query sample.
DEFAULT_TOP = 10
#: Query samples shown (the first ones of the probe set).
MAX_QUERIES = 64
#: Thumbnails are scaled up to at least this many pixels on their long side.
_THUMB = 56


def top_influences(table: pd.DataFrame, step: int, query: int, k: int = DEFAULT_TOP
                   ) -> pd.DataFrame:
    """The ``k`` training samples with the largest influence on query sample ``query`` at
    checkpoint ``step`` (rows of :attr:`Run.influence` with status ok), largest first, with
    their ``rank`` (1 = most influential)."""
    rows = table[(table["step"] == step) & (table["query_index"] == query)
                 & (table["status"] == "ok")]
    top = rows.nlargest(k, "influence").reset_index(drop=True)
    top.insert(0, "rank", np.arange(1, len(top) + 1))
    return top


def image_rows(inputs: np.ndarray | None) -> np.ndarray | None:
    """``inputs`` as (N, H, W) grey or (N, H, W, 3) colour images, or None when they are not
    images (fewer than three axes, or no channel axis of size 1 or 3)."""
    if inputs is None or inputs.ndim not in (3, 4) or not np.issubdtype(inputs.dtype, np.number):
        return None
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim == 3:
        return x
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 1, -1)
    if x.shape[-1] == 1:
        return x[..., 0]
    return x if x.shape[-1] == 3 else None


def png_data_uri(image: np.ndarray) -> str:
    """A ``data:image/png`` URI of one (H, W) or (H, W, 3) image, scaled to 0-255 by its own
    range (a constant image is mid-grey) and enlarged by pixel repetition to about
    ``_THUMB`` pixels."""
    x = np.nan_to_num(np.asarray(image, dtype=np.float64))
    lo, hi = float(x.min()), float(x.max())
    x = np.full_like(x, 0.5) if hi <= lo else (x - lo) / (hi - lo)
    pixels = np.round(x * 255).astype(np.uint8)
    scale = max(1, math.ceil(_THUMB / max(pixels.shape[:2])))
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    return "data:image/png;base64," + base64.b64encode(_png(pixels)).decode("ascii")


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grey or (H, W, 3) RGB image (8 bits, no filter)."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _finite(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def influence_panel(runs: Sequence[Run], names: Sequence[str], k: int = DEFAULT_TOP
                    ) -> dict | None:
    """The influence panel of the first run with probe influence (JSON-able), or None.

    ``steps``: checkpoints with influence; ``queries``: the query samples (index, thumbnail or
    None); ``top[str(step)][str(query)]``: rows ``[rank, train_index, influence, se]``;
    ``train_images``: thumbnails of the training samples listed (when the inputs are images);
    ``failed``: ``{step, reason}`` of checkpoints without influence.
    """
    found = [i for i, run in enumerate(runs) if len(run.influence)]
    if not found:
        return None
    run, name = runs[found[0]], names[found[0]]
    table = run.influence
    ok = table[table["status"] == "ok"]
    failed = table[table["status"] != "ok"]
    steps = sorted(int(s) for s in ok["step"].unique())
    queries = sorted(int(q) for q in ok["query_index"].dropna().unique())[:MAX_QUERIES]
    inputs = run.influence_inputs() if steps else {}
    query_images = image_rows(inputs.get("query_inputs"))
    train_images = image_rows(inputs.get("train_inputs"))
    train_row = {int(t): r for r, t in enumerate(inputs.get("train_index", []))}
    top: dict[str, dict[str, list]] = {}
    listed: set[int] = set()
    for step in steps:
        at_step = ok[ok["step"] == step]
        top[str(step)] = {}
        for q in queries:
            best = top_influences(at_step, step, q, k)
            listed.update(int(t) for t in best["train_index"])
            top[str(step)][str(q)] = [[int(r.rank), int(r.train_index), _finite(r.influence),
                                       _finite(r.se)] for r in best.itertuples()]
    thumbs = {}
    if train_images is not None:
        thumbs = {str(t): png_data_uri(train_images[train_row[t]]) for t in sorted(listed)
                  if t in train_row and train_row[t] < len(train_images)}
    return {
        "run": name,
        "kind": str(ok["kind"].iloc[0]) if len(ok) else "covariance",
        "steps": steps,
        "queries": [{"index": q, "image": png_data_uri(query_images[q])
                     if query_images is not None and q < len(query_images) else None}
                    for q in queries],
        "more_queries": max(int(ok["query_index"].nunique()) - len(queries), 0),
        "top": top,
        "train_images": thumbs,
        "failed": [{"step": int(r.step), "reason": str(r.reason)}
                   for r in failed.itertuples()],
    }


def diverging_color(value: float | None, scale: float) -> str:
    """The colour of ``value`` on a blue-white-red scale running over ``[-scale, scale]``
    (grey for a missing value)."""
    if value is None or not math.isfinite(value):
        return "rgb(221,221,221)"
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    r, g, b = (round(255 + abs(t) * (c - 255)) for c in end)
    return f"rgb({r},{g},{b})"


def susceptibility_panel(runs: Sequence[Run], names: Sequence[str]) -> dict | None:
    """The component × probe heatmap of the first run with susceptibilities (JSON-able), or
    None: ``components`` and ``probes`` in table order, and per checkpoint
    ``cells[str(step)][i][j] = [value, se, colour]`` for component i and probe j."""
    found = [i for i, run in enumerate(runs) if len(run.susceptibilities)]
    if not found:
        return None
    run, name = runs[found[0]], names[found[0]]
    table = run.susceptibilities
    components = list(dict.fromkeys(table["component"]))
    probes = list(dict.fromkeys(table["probe"]))
    cells: dict[str, list] = {}
    for step, part in table.groupby("step", sort=True):
        values = part.set_index(["component", "probe"])
        finite = part["susceptibility"][np.isfinite(part["susceptibility"])]
        scale = float(finite.abs().max()) if len(finite) else 0.0
        grid = []
        for comp in components:
            row = []
            for probe in probes:
                if (comp, probe) in values.index:
                    cell = values.loc[(comp, probe)]
                    v, se = _finite(cell["susceptibility"]), _finite(cell["se"])
                else:
                    v = se = None
                row.append([v, se, diverging_color(v, scale)])
            grid.append(row)
        cells[str(int(step))] = grid
    return {"run": name, "components": components, "probes": probes,
            "steps": [int(s) for s in cells], "cells": cells}
