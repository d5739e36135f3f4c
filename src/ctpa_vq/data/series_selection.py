"""Which DICOM series of a study ``prepare`` keeps, when a study holds several.

A CTPA study folder typically holds a localizer, the thin axial CTPA series, and often a thick
axial recon, reformats (coronal, sagittal) and MIPs. Localizers, secondary captures and DERIVED
series (most reformats and MIPs) are never volumes (:func:`~ctpa_vq.data.dicom.find_series`
already gives them a skip reason). Among the remaining series of one study (same
StudyInstanceUID; series without one form a study per folder) one is kept, the first by:

1. axial: slice normal within 30 degrees of the patient's foot-head axis;
2. the most slices;
3. the thinnest SliceThickness (unknown counts as thickest);
4. the name (folder, ``#k`` by SeriesNumber), so the choice is deterministic.

Every other series of the study is skipped with a reason naming the kept one. With
``all_series`` every series is kept (each becomes its own row).
"""

from __future__ import annotations

import math
from typing import Sequence

from .dicom import DicomSeries
from .volume_io import VolumeSource

AXIAL_MAX_DEGREES = 30.0


def is_axial(series: DicomSeries) -> bool:
    """True when the slice normal is within :data:`AXIAL_MAX_DEGREES` of the foot-head axis."""
    if series.normal is None:
        return False
    length = math.sqrt(sum(v * v for v in series.normal)) or 1.0
    return abs(series.normal[2]) / length >= math.cos(math.radians(AXIAL_MAX_DEGREES))


def _preference(source: VolumeSource) -> tuple:
    series = source.series
    thickness = series.slice_thickness if series.slice_thickness is not None else math.inf
    return (not is_axial(series), -len(series.files), thickness, source.name)


def _describe(series: DicomSeries) -> str:
    orientation = "axial" if is_axial(series) else "non-axial"
    thickness = f" of {series.slice_thickness:g} mm" if series.slice_thickness is not None else ""
    return f"{len(series.files)} {orientation} slices{thickness}"


def select_series(sources: Sequence[VolumeSource]) -> tuple[list[VolumeSource], list[tuple[VolumeSource, str]]]:
    """(kept, [(skipped, reason)]): one series per study by the rule of the module docstring.

    Files and series with a skip reason or an error pass through (their ``load`` reports them).
    """
    studies: dict[tuple[str, str], list[VolumeSource]] = {}
    kept, skipped = [], []
    for source in sources:
        series = source.series
        if series is None or series.skip_reason or series.error:
            kept.append(source)
            continue
        study = (series.study, "") if series.study else ("", str(source.path))
        studies.setdefault(study, []).append(source)
    for candidates in studies.values():
        best, *others = sorted(candidates, key=_preference)
        kept.append(best)
        for other in others:
            skipped.append((other, f"another series of the study was chosen: {best.name} "
                                   f"({_describe(best.series)}) over this one ({_describe(other.series)}); "
                                   "--all-series keeps every series"))
    order = {id(source): k for k, source in enumerate(sources)}
    return sorted(kept, key=lambda s: order[id(s)]), sorted(skipped, key=lambda s: order[id(s[0])])
