"""Mid-slice pictures of a reconstruction: input | reconstruction | |error|, one row per plane."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..models.intensity import DEFAULT_HU_WINDOW
from ..utils.atomic import atomic_path

_LABEL_HEIGHT = 14
_MIN_WIDTH = 600


def _gray(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly to uint8 ``[0, 255]`` (clipped)."""
    scaled = (np.asarray(values, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _mid_planes(volume: np.ndarray) -> list[np.ndarray]:
    """Axial (H, W), coronal (D, W) and sagittal (D, H) mid-slices of a canonical RAS ``(D, H, W)``
    volume, flipped so that anterior (axial) and superior (coronal, sagittal) are at the top."""
    d, h, w = (n // 2 for n in volume.shape)
    return [volume[d, ::-1, :], volume[::-1, h, :], volume[::-1, :, w]]


def save_mid_slices(
    path: str | os.PathLike,
    input_hu: np.ndarray,
    reconstruction_hu: np.ndarray,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    spacing: Sequence[float] | None = None,
    error_range: float | None = None,
) -> Path:
    """Write a PNG of mid-slices: columns input | reconstruction | |error|, rows axial, coronal, sagittal.

    Args:
        path: the PNG to write (atomically: a temporary file in the same directory, then renamed).
        input_hu, reconstruction_hu: ``(D, H, W)`` HU volumes in canonical orientation.
        window: HU shown from black to white for input and reconstruction.
        spacing: voxel size ``(D, H, W)`` in mm; if given, panels are resampled to square mm.
        error_range: |error| in HU shown as white; default an eighth of the window width.
    """
    input_hu, reconstruction_hu = np.asarray(input_hu), np.asarray(reconstruction_hu)
    if input_hu.shape != reconstruction_hu.shape or input_hu.ndim != 3:
        raise ValueError(f"need two (D, H, W) volumes of one shape, got {input_hu.shape} and {reconstruction_hu.shape}")
    low, high = float(window[0]), float(window[1])
    error_range = error_range or (high - low) / 8
    error = np.abs(reconstruction_hu.astype(np.float32) - input_hu.astype(np.float32))

    rows = []
    plane_axes = [(1, 2), (0, 2), (0, 1)]  # the (row, column) volume axes of each plane
    for planes in zip(_mid_planes(input_hu), _mid_planes(reconstruction_hu), _mid_planes(error), plane_axes):
        *images, (row_axis, col_axis) = planes
        panels = [_gray(images[0], low, high), _gray(images[1], low, high), _gray(images[2], 0.0, error_range)]
        panels = [Image.fromarray(np.ascontiguousarray(p)) for p in panels]
        if spacing is not None:
            size = (round(panels[0].width * spacing[col_axis]), round(panels[0].height * spacing[row_axis]))
            scale = max(panels[0].size) / max(size)
            size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            panels = [p.resize(size, Image.Resampling.BILINEAR) for p in panels]
        rows.append(panels)

    panel_width = max(p.width for row in rows for p in row)
    panels = Image.new("L", (3 * panel_width, sum(row[0].height for row in rows)), color=0)
    top = 0
    for row in rows:
        for column, panel in enumerate(row):
            panels.paste(panel, (column * panel_width, top))
        top += row[0].height
    zoom = max(1, math.ceil(_MIN_WIDTH / panels.width))  # small volumes: enlarge, keep voxels sharp
    panels = panels.resize((panels.width * zoom, panels.height * zoom), Image.Resampling.NEAREST)

    canvas = Image.new("L", (panels.width, _LABEL_HEIGHT + panels.height), color=0)
    canvas.paste(panels, (0, _LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(["input", "reconstruction", f"|error| 0..{error_range:g} HU"]):
        draw.text((column * panel_width * zoom + 2, 1), label, fill=255)

    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        canvas.save(tmp, format="PNG")
    return path
