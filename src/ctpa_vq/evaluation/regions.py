"""Anatomical regions of a CT volume from HU thresholds inside a body mask (scipy.ndimage).

The **body** is the largest 6-connected component of voxels above ``-500`` HU, with its holes
filled in every axial slice. That drops the air around the patient, the out-of-field padding
(-2048 / -3024 HU) and the scanner table (a separate component), and keeps the lungs and
airways: in an axial slice they are enclosed by the chest wall, while in 3D they reach the
outside through the trachea or the cut ends of the volume, so a 3D fill would miss them.

Inside the body, each voxel of the *reference* volume falls in one region by its HU value:

=============== ================ =====================================================
region          HU               what it holds
=============== ================ =====================================================
``lung``        < -400           lung parenchyma, airways (and gas in the bowel)
``soft_tissue`` -400 .. < 150    mediastinum, muscle, fat, organs, unenhanced blood
``vessel``      150 .. < 500     contrast-enhanced vessels (CTPA: pulmonary arteries
                                 250-500 HU); also trabecular bone and calcifications
``bone``        >= 500           cortical bone (and dense contrast inflow, metal)
=============== ================ =====================================================

Thresholds cannot separate enhanced blood from trabecular bone (both 150-500 HU); on a
non-contrast scan the ``vessel`` region is mostly trabecular bone and partial-volume edges.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0
REGIONS: dict[str, tuple[float, float]] = {
    "lung": (-np.inf, -400.0),
    "soft_tissue": (-400.0, 150.0),
    "vessel": (150.0, 500.0),
    "bone": (500.0, np.inf),
}
OUTSIDE = 0  # label of voxels outside the body; region i of REGIONS has label i + 1


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean ``(D, H, W)`` body mask: largest connected component above ``threshold`` HU,
    holes filled per axial slice (axis 0). All False when no voxel exceeds ``threshold``."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {hu.shape}")
    labels, count = ndimage.label(hu > threshold)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    del labels
    for axial in body:  # views: fill in place, one slice at a time
        ndimage.binary_fill_holes(axial, output=axial)
    return body


def region_labels(hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """``uint8`` ``(D, H, W)`` map: :data:`OUTSIDE` (0) outside ``body`` (default
    :func:`body_mask` of ``hu``), else ``i + 1`` for the ``i``-th region of :data:`REGIONS`."""
    hu = np.asarray(hu)
    body = body_mask(hu) if body is None else np.asarray(body, dtype=bool)
    if body.shape != hu.shape:
        raise ValueError(f"body mask shape {body.shape} != volume shape {hu.shape}")
    upper = np.array([high for _, high in REGIONS.values()][:-1], dtype=np.float32)
    labels = np.empty(hu.shape, dtype=np.uint8)
    for axial, (values, inside) in enumerate(zip(hu, body)):  # per slice: digitize's int64 stays small
        labels[axial] = np.digitize(values, upper) + 1  # bins are [low, high): -400 HU is soft tissue
        labels[axial][~inside] = OUTSIDE
    return labels
