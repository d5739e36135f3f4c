"""What a model was trained on, and how a volume compares with it.

At export a model's config holds `training_data`, the input specification of its (last) training
data, built by `describe_training_data`: the voxel spacing seen (min, median and max in mm per axis
D, H, W), the HU window, the fraction of voxels the window clipped, the orientation, the patch size
and the number of volumes. Counts and ranges only: no identifiers.

`check_volume` compares one volume with that record and, where it lies outside what the model saw,
issues one `InputSpecWarning` naming the volume and the figures: a spacing more than
`SPACING_TOLERANCE` outside the range seen, or a clipped fraction more than `CLIPPED_MARGIN` above
the largest seen. It never raises. A model without the record (an older export) is not checked.
`training_spacing` is the median spacing the record names: the spacing to resample a volume to
(`ctpa_vq.pipelines.spacing`, `ctpa-vq reconstruct --spacing training`).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import torch

from .intensity import clipped_fraction

ORIENTATION = "RAS (nibabel.as_closest_canonical); arrays (D, H, W) = (Z, Y, X)"
SPACING_TOLERANCE = 0.1
"""Relative: a spacing within 10% beyond the range seen does not warn (0.7 mm seen, 0.75 mm given)."""
CLIPPED_MARGIN = 0.01
"""A volume whose window clips one percentage point more of its voxels than any measured training volume warns."""
SPACING_AXES = ("slice spacing", "row spacing (H)", "column spacing (W)")
CLIPPED_STRIDE = 4
"""The clipped fraction of a training volume is measured on every 4th slice (a quarter of its pages read)."""


class InputSpecWarning(UserWarning):
    """A volume lies outside what the model was trained on (spacing, intensities)."""


def describe_training_data(
    spacings: Sequence[Sequence[float]],
    measured: Iterable[np.ndarray],
    hu_window: Sequence[float],
    patch_size: Sequence[int],
) -> dict:
    """The `training_data` record of a model trained on volumes with `spacings` (mm, (D, H, W) each).

    `measured` are some of those volumes (HU `(D, H, W)`; e.g. a spread of up to 16), on whose every
    `CLIPPED_STRIDE`-th slice the fraction of voxels outside `hu_window` is measured.
    """
    low, high = (float(v) for v in hu_window)
    spacing = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    clipped = [sum(clipped_fraction(volume[::CLIPPED_STRIDE], hu_window)) for volume in measured]
    rounded = lambda values: [round(float(v), 4) for v in values]  # noqa: E731
    return {
        "volumes": int(spacing.shape[0]),
        "spacing_mm": {
            "min": rounded(spacing.min(0)), "median": rounded(np.median(spacing, 0)), "max": rounded(spacing.max(0)),
        },  # fmt: skip
        "hu_window": [low, high],
        "clipped_fraction": {
            "mean": round(float(np.mean(clipped)), 6) if clipped else None,
            "max": round(float(np.max(clipped)), 6) if clipped else None,
            "volumes_measured": len(clipped),
        },
        "orientation": ORIENTATION,
        "patch_size": [int(p) for p in patch_size],
    }


def training_spacing(record: dict | None) -> tuple[float, float, float]:
    """The median training spacing (mm, (D, H, W)) of a `training_data` record; an error without one."""
    if not record or "spacing_mm" not in record:
        raise ValueError("this model records no training data spacing (exported before ctpa-vq recorded it): "
                         "give the spacing in mm instead")
    return tuple(float(s) for s in record["spacing_mm"]["median"])


def _mm(value: float) -> str:
    return f"{value:.3g}"


def volume_mismatches(
    record: dict, hu: np.ndarray | torch.Tensor, spacing: Sequence[float] | None, hu_window: Sequence[float]
) -> list[str]:
    """What of a volume (HU `(D, H, W)`, spacing in mm or None) lies outside the `training_data` record."""
    found = []
    if spacing is not None and "spacing_mm" in record:
        seen = record["spacing_mm"]
        for axis, given, low, high in zip(SPACING_AXES, spacing, seen["min"], seen["max"]):
            if not low * (1 - SPACING_TOLERANCE) <= float(given) <= high * (1 + SPACING_TOLERANCE):
                range_seen = _mm(low) if low == high else f"{_mm(low)}-{_mm(high)}"
                found.append(f"{axis} {_mm(float(given))} mm; this model saw {range_seen} mm")
        if found:
            found[-1] += ": resample with --spacing training"
    most = (record.get("clipped_fraction") or {}).get("max")
    if most is not None:
        low, high = (float(v) for v in hu_window)
        clipped = sum(clipped_fraction(hu, hu_window))
        if clipped > most + CLIPPED_MARGIN:
            found.append(f"{clipped:.1%} of voxels lie outside the HU window [{low:g}, {high:g}]; "
                         f"the training volumes had at most {most:.1%} (is it CT in Hounsfield units?)")
    return found


def check_volume(
    record: dict | None, name: str, hu: np.ndarray | torch.Tensor, spacing: Sequence[float] | None, hu_window: Sequence[float]
) -> list[str]:
    """One `InputSpecWarning` naming `name` and every figure outside the record (nothing without a
    record); returns the findings."""
    if not record:
        return []
    found = volume_mismatches(record, hu, spacing, hu_window)
    if found:
        warnings.warn(f"{name}: {'; '.join(found)}", InputSpecWarning, stacklevel=3)
    return found
