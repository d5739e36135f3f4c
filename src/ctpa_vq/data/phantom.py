"""Synthetic CTPA phantoms: chest-shaped HU volumes with contrast-filled pulmonary arteries.

The embedded default data for the demo and the tests. A phantom is built in normalised
chest coordinates: ``z`` in [0, 1] from the upper abdomen (0) to the lung apices (1), ``y``
in [-1, 1] posterior to anterior, ``x`` in [-1, 1] patient left to right (RAS: +x is the
patient's right, so the heart sits at -x). The array is ``(D, H, W) = (z, y, x)``, canonical
RAS like every volume in this package.

Built for speed at full size (604 x 512 x 512 in a few seconds on 2 cores):

* the smooth anatomy (body, fat, lungs with texture, heart, aorta, spine, ribs, sternum) is
  drawn as 2D axial slices at full in-plane resolution on at most ``z_levels`` heights, and
  every slice takes the nearest height;
* the pulmonary artery tree is a random branching tree of tubes, rasterised at full
  resolution inside each segment's bounding box;
* noise is the sum of two uniform integer fields (roughly Gaussian), added in ``int16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

HU_AIR = -1000
HU_FAT = -100
HU_SOFT_TISSUE = 40
HU_LUNG = -850
HU_HEART_WALL = 50
HU_AORTA = 180
HU_CANCELLOUS_BONE = 250
HU_CORTICAL_BONE = 900
HU_RIB = 700
HU_DISC = 90


@dataclass(frozen=True)
class PhantomAnatomy:
    """The random per-patient parameters of a phantom (normalised chest coordinates)."""

    body_half_width: float
    body_half_depth: float
    fat_fraction: float
    lung_half_width: float
    lung_half_depth: float
    heart_center_x: float
    rib_phase: float
    artery_hu: float
    lung_texture_hu: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PhantomAnatomy:
        return cls(
            body_half_width=rng.uniform(0.86, 0.95),
            body_half_depth=rng.uniform(0.56, 0.66),
            fat_fraction=rng.uniform(0.05, 0.12),
            lung_half_width=rng.uniform(0.28, 0.33),
            lung_half_depth=rng.uniform(0.36, 0.42),
            heart_center_x=rng.uniform(-0.2, -0.1),
            rib_phase=rng.uniform(0, 2 * math.pi),
            artery_hu=rng.uniform(330, 470),
            lung_texture_hu=rng.uniform(25, 45),
        )

    def lung_scale(self, z: float | np.ndarray) -> float | np.ndarray:
        """Lung cross-section scale along z: 0 below the diaphragm and above the apex."""
        t = np.clip((np.asarray(z) - 0.12) / 0.83, 0.0, 1.0)
        return np.sqrt(np.sin(np.pi * t))

    def heart_scale(self, z: float) -> float:
        return math.sqrt(max(0.0, 1.0 - ((z - 0.3) / 0.22) ** 2))

    def in_lung(self, x: float, y: float, z: float, margin: float = 0.85) -> bool:
        """Whether a point lies inside either lung (shrunk by ``margin``), away from the heart."""
        s = float(self.lung_scale(z)) * margin
        if s <= 0.05:
            return False
        for center_x in (-0.42, 0.42):
            if ((x - center_x) / (self.lung_half_width * s)) ** 2 + (y / (self.lung_half_depth * s)) ** 2 < 1:
                return True
        return False


def make_phantom(
    shape: Sequence[int] = (96, 128, 128),
    seed: int = 0,
    noise_hu: float = 15.0,
    z_levels: int = 96,
) -> np.ndarray:
    """A synthetic CTPA volume in HU, ``int16`` of ``shape`` = (D, H, W); deterministic by seed.

    ``z_levels`` caps how many distinct axial heights the smooth anatomy is drawn at (the
    pulmonary arteries and the noise are always full resolution).
    """
    depth, height, width = (int(n) for n in shape)
    if min(depth, height, width) < 1:
        raise ValueError(f"phantom shape must be positive, got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    anatomy = PhantomAnatomy.draw(rng)

    n_levels = min(depth, z_levels)
    level_z = (np.arange(n_levels) + 0.5) / n_levels
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    texture = _smooth_noise(rng, (n_levels, height, width))
    levels = np.stack([_axial_slice(z, y, x, anatomy, texture[i]) for i, z in enumerate(level_z)])
    volume = levels[(np.arange(depth) * n_levels) // depth]

    for start, end, radius in _artery_tree(anatomy, rng):
        _draw_tube(volume, _to_voxels(start, volume.shape), _to_voxels(end, volume.shape),
                   radius * min(height, width) / 2, int(anatomy.artery_hu))

    if noise_hu > 0:
        half_range = max(1, round(noise_hu * math.sqrt(1.5)))  # sum of two U(-a, a): std a*sqrt(2/3)
        for noise_seed in rng.integers(0, 2**31, 2):
            volume += np.random.default_rng(noise_seed).integers(-half_range, half_range + 1,
                                                                 volume.shape, dtype=np.int16)
    np.clip(volume, -1024, 3071, out=volume)
    return volume


def write_phantom_nifti(
    path: str | Path,
    shape: Sequence[int] = (96, 128, 128),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 0.7, 0.7),
    affine: np.ndarray | None = None,
) -> Path:
    """Write a phantom as an int16 NIfTI file in RAS orientation.

    ``spacing`` is (D, H, W) in mm. A given ``affine`` (nibabel convention, for the
    file's (i, j, k) = (x, y, z) axes of the canonical array) overrides it; a non-canonical
    affine therefore stores the same voxel array with a different orientation.
    """
    path = Path(path)
    hu = make_phantom(shape, seed=seed)
    if affine is None:
        affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def write_phantom_dir(
    directory: str | Path, n: int, shape: Sequence[int] = (96, 128, 128), seed: int = 0, compressed: bool = True
) -> list[Path]:
    """Write ``n`` phantoms ``phantom_000.nii.gz`` ... (seeds ``seed``, ``seed + 1``, ...).

    ``compressed=False`` writes ``.nii`` (gzip costs about 10 s per full-size volume).
    """
    directory = Path(directory)
    suffix = ".nii.gz" if compressed else ".nii"
    return [write_phantom_nifti(directory / f"phantom_{i:03d}{suffix}", shape, seed=seed + i) for i in range(n)]


def _axial_slice(z: float, y: np.ndarray, x: np.ndarray, a: PhantomAnatomy, texture: np.ndarray) -> np.ndarray:
    """One axial (H, W) slice of the smooth anatomy at height ``z``, in HU (int16)."""
    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1

    body_rho = np.sqrt((x / a.body_half_width) ** 2 + (y / a.body_half_depth) ** 2)
    body_theta = np.arctan2(y / a.body_half_depth, x / a.body_half_width)
    hu = np.full(body_rho.shape, HU_AIR, dtype=np.int16)
    hu[body_rho < 1] = HU_FAT
    hu[body_rho < 1 - a.fat_fraction] = HU_SOFT_TISSUE

    lung_scale = float(a.lung_scale(z))
    if lung_scale > 0:
        lungs = (ellipse(-0.42, 0.0, a.lung_half_width * lung_scale, a.lung_half_depth * lung_scale)
                 | ellipse(0.42, 0.0, a.lung_half_width * lung_scale, a.lung_half_depth * lung_scale))
        hu[lungs] = (HU_LUNG + a.lung_texture_hu * texture[lungs]).astype(np.int16)
    elif z < 0.12:  # below the diaphragm: liver on the patient's right
        hu[ellipse(0.3, 0.0, 0.45, 0.42)] = 60

    heart_scale = a.heart_scale(z)
    if heart_scale > 0:
        hu[ellipse(a.heart_center_x, 0.15, 0.32 * heart_scale, 0.28 * heart_scale)] = HU_HEART_WALL
        hu[ellipse(a.heart_center_x + 0.12, 0.25, 0.12 * heart_scale, 0.1 * heart_scale)] = int(a.artery_hu)
        hu[ellipse(a.heart_center_x - 0.1, 0.1, 0.12 * heart_scale, 0.1 * heart_scale)] = HU_AORTA
    if z < 0.75:
        hu[ellipse(-0.12, -0.3, 0.07, 0.07)] = HU_AORTA  # descending aorta
    if 0.45 < z < 0.72:
        hu[ellipse(0.05, 0.08, 0.08, 0.08)] = HU_AORTA  # ascending aorta

    vertebra = ellipse(0.0, -0.42, 0.12, 0.1)
    in_disc = (z * 12) % 1.0 < 0.2
    hu[vertebra] = HU_DISC if in_disc else HU_CORTICAL_BONE
    if not in_disc:
        hu[ellipse(0.0, -0.42, 0.1, 0.08)] = HU_CANCELLOUS_BONE
    hu[ellipse(0.0, -0.56, 0.04, 0.035)] = 10  # spinal canal

    if z > 0.1:
        rib_band = (body_rho > 0.83 - a.fat_fraction) & (body_rho < 0.9 - a.fat_fraction)
        rib_arc = np.cos(9 * body_theta + 6 * math.pi * z + a.rib_phase) > 0.5
        not_spine_or_sternum = np.abs(np.abs(body_theta) - math.pi / 2) > 0.35
        hu[rib_band & rib_arc & not_spine_or_sternum] = HU_RIB
    if 0.3 < z < 0.85:
        hu[ellipse(0.0, 0.9 * a.body_half_depth, 0.08, 0.04)] = 400  # sternum
    return hu


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: int = 12) -> np.ndarray:
    """(L, H, W) smooth 2D random fields in about [-1, 1]: coarse noise, bilinear upsampled."""
    levels, height, width = shape
    coarse = rng.standard_normal((levels, 1, max(2, height // cell), max(2, width // cell))).astype(np.float32)
    fine = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(height, width), mode="bilinear",
                                           align_corners=True)
    return fine[:, 0].numpy()


def _artery_tree(a: PhantomAnatomy, rng: np.random.Generator, generations: int = 6) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Pulmonary artery segments ``(start, end, radius)`` in normalised (x, y, z) coordinates.

    Main trunk from the right ventricle up to the bifurcation, left and right arteries to the
    hila, then a random binary tree in each lung whose branches stay inside the lung.
    """
    right_ventricle = np.array([a.heart_center_x + 0.12, 0.25, 0.36])
    bifurcation = np.array([-0.02, 0.05, 0.58])
    segments = [(right_ventricle, bifurcation, 0.055)]
    for side in (-1.0, 1.0):
        hilum = np.array([0.33 * side, -0.02, 0.55])
        segments.append((bifurcation, hilum, 0.042))
        stack = [(hilum, np.array([side, 0.0, 0.0]), 0.04, 0)]
        while stack:
            start, direction, radius, generation = stack.pop()
            if generation == generations:
                continue
            length = 0.22 * 0.8**generation
            for _ in range(2):
                for _attempt in range(6):
                    child_dir = direction + rng.normal(0.0, 0.9, 3) * np.array([1.0, 1.0, 0.6])
                    child_dir /= np.linalg.norm(child_dir)
                    end = start + length * child_dir * np.array([1.0, 1.0, 0.5])
                    if a.in_lung(*end):
                        segments.append((start, end, radius))
                        stack.append((end, child_dir, radius * 0.8, generation + 1))
                        break
    return segments


def _to_voxels(point: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Normalised (x, y, z) -> voxel (d, h, w) coordinates."""
    depth, height, width = shape
    x, y, z = point
    return np.array([z * depth - 0.5, (y + 1) / 2 * (height - 1), (x + 1) / 2 * (width - 1)])


def _draw_tube(volume: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float, value: int) -> None:
    """Set voxels within ``radius`` (voxels, at least 0.75) of segment p0-p1 to ``value``, in place."""
    radius = max(radius, 0.75)
    low = np.maximum(np.floor(np.minimum(p0, p1) - radius), 0).astype(int)
    high = np.minimum(np.ceil(np.maximum(p0, p1) + radius) + 1, volume.shape).astype(int)
    if (high <= low).any():
        return
    d, h, w = np.ogrid[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    axis = p1 - p0
    rel = [d - p0[0], h - p0[1], w - p0[2]]
    t = np.clip((rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / max(axis @ axis, 1e-9), 0, 1)
    dist2 = sum((r - t * c) ** 2 for r, c in zip(rel, axis))
    box = volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    box[dist2 <= radius**2] = value
