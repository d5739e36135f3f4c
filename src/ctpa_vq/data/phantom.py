"""Synthetic CTPA phantoms: chest-shaped HU volumes with a contrast-filled pulmonary arterial tree.

The embedded default data for the demo and the tests. A phantom is built in normalised chest
coordinates: ``z`` in [0, 1] from the upper abdomen (0) to the lung apices (1), ``y`` in
[-1, 1] posterior to anterior, ``x`` in [-1, 1] patient left to right (RAS: +x is the patient's
right, so the heart sits at -x). The z range spans :data:`Z_EXTENT` units of x and y (about
360 mm against 2 x 180 mm), so shapes and tubes are round in millimetres whatever the voxel
shape. The array is ``(D, H, W) = (z, y, x)``, canonical RAS like every volume in this package.

What it draws, in painting order (every boundary a smooth implicit surface, thresholded per voxel):

* body (a superellipse perturbed by a smooth random field) with a fat layer and muscle;
* liver and spleen under the diaphragm;
* lungs: the thoracic cavity cut by two lobes, domed diaphragm, tapering apices, parenchyma at
  about -850 HU with a gravity gradient and correlated texture;
* heart in pericardial fat: myocardium, contrast-filled chambers (right heart as bright as the
  pulmonary arteries, left heart and aorta less, as in a CTPA bolus), aorta, superior vena cava
  (dense inflowing contrast), trachea and main bronchi;
* bone: vertebral bodies (cortical shell, cancellous core, discs), posterior arches, sternum,
  12 pairs of ribs descending anteriorly, costal cartilage;
* the pulmonary arterial tree: trunk from the right ventricle, left and right arteries to the
  hila, then a random recursive tree in each lung (radii shrinking by Murray's law, ends kept
  inside the lung), with partial-volume edges;
* CT noise, correlated in-plane (like a reconstruction kernel's) and independent across slices;
* the scanner's circular field of view, outside which the volume holds a padding value (-2048 or
  -3024 HU), as scanners write.

:func:`make_labelled_phantom` also returns a :class:`Structure` label map. Everything is
vectorised NumPy over z-chunks (bounded memory) and bounding boxes; 48 x 96 x 96 takes about
0.3 s and 128 x 256 x 256 about 2 s on one core. Deterministic by seed for a given shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..utils.atomic import atomic_path

Z_EXTENT = 2.0  # the z range [0, 1] spans 2 units of x and y

HU_AIR = -1000
HU_FAT = -100
HU_MUSCLE = 45
HU_LIVER = 60
HU_MYOCARDIUM = 50
HU_DISC = 90
HU_CSF = 10
HU_CARTILAGE = 140
HU_CANCELLOUS_BONE = 300
HU_CORTICAL_BONE = 1000
HU_MIN, HU_MAX = -1024, 3071  # what a scanner writes inside its field of view


class Structure(IntEnum):
    """Labels of :func:`make_labelled_phantom`'s label map."""

    OUTSIDE_FOV = 0  # the scanner's padding
    AIR = 1  # around the patient, trachea and main bronchi
    FAT = 2
    SOFT_TISSUE = 3  # muscle, mediastinum, myocardium, liver, spleen, discs, spinal canal, cartilage
    LUNG = 4
    BLOOD = 5  # contrast-enhanced: heart chambers, aorta, superior vena cava
    PULMONARY_ARTERY = 6  # trunk and tree, the voxels fully inside a vessel (no partial volume)
    BONE = 7


@dataclass(frozen=True)
class PhantomAnatomy:
    """The random per-patient parameters of a phantom (normalised chest coordinates, HU)."""

    body_half_width: float
    body_half_depth: float
    fat_fraction: float
    diaphragm_z: float
    heart_center_x: float
    rib_phase: float
    artery_hu: float  # pulmonary arteries and right heart
    blood_hu: float  # left heart and aorta
    vena_cava_hu: float
    lung_hu: float
    lung_texture_hu: float
    noise_hu: float
    padding_hu: int

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PhantomAnatomy:
        return cls(
            body_half_width=rng.uniform(0.84, 0.92),
            body_half_depth=rng.uniform(0.56, 0.66),
            fat_fraction=rng.uniform(0.04, 0.1),
            diaphragm_z=rng.uniform(0.1, 0.18),
            heart_center_x=rng.uniform(-0.2, -0.1),
            rib_phase=rng.uniform(0.0, 1.0),
            artery_hu=rng.uniform(320, 560),
            blood_hu=rng.uniform(150, 300),
            vena_cava_hu=rng.uniform(500, 900),
            lung_hu=rng.uniform(-870, -830),
            lung_texture_hu=rng.uniform(30, 60),
            noise_hu=rng.uniform(10, 20),
            padding_hu=int(rng.choice([-2048, -3024])),
        )

    @property
    def cavity(self) -> float:
        """Body radius (superellipse units) inside which the lungs may lie: within the ribs."""
        return 1.0 - self.fat_fraction - 0.13

    @property
    def heart_center(self) -> np.ndarray:
        return np.array([self.heart_center_x, 0.14, self.diaphragm_z + 0.2])

    @property
    def spine_y(self) -> float:
        """y of the vertebral bodies' axis."""
        return 0.3 - self.body_half_depth

    @property
    def carina(self) -> np.ndarray:
        return np.array([0.0, self.spine_y + 0.2, self.diaphragm_z + 0.55])

    def body_rho(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Superellipse radius of the body cross-section (1 on the skin), broadcasting."""
        return (np.abs(x / self.body_half_width) ** 2.4 + np.abs(y / self.body_half_depth) ** 2.4) ** (1 / 2.4)

    def lung_rho(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Implicit lung function (< 1 inside either lung, before the diaphragm cut), broadcasting.

        The thoracic cavity (within the ribs) intersected with one lobe per side; the lobes
        taper towards the apices above z = 0.75.
        """
        taper = np.sqrt(np.clip((0.98 - z) / 0.23, 1e-4, 1.0))
        lobes = [((x - side * 0.5 * self.body_half_width) / (0.42 * self.body_half_width)) ** 2
                 + ((y + 0.03) / (0.9 * self.body_half_depth)) ** 2 for side in (-1.0, 1.0)]  # fmt: skip
        lobe = np.sqrt(np.minimum(*lobes)) / taper
        return np.maximum(self.body_rho(y, x) / self.cavity / taper, lobe)

    def lung_base(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the diaphragm under each (y, x): a dome per side, the right one higher (the liver)."""
        side = np.sign(x)
        lateral = (np.abs(x) - 0.5 * self.body_half_width) / (0.45 * self.body_half_width)
        r2 = lateral**2 + (y / self.body_half_depth) ** 2
        return self.diaphragm_z + 0.03 * (side > 0) + 0.12 * np.clip(1.0 - r2, 0.0, 1.0)

    def in_lung(self, x: float, y: float, z: float, margin: float = 0.85) -> bool:
        """Whether a point lies inside a lung (shrunk by ``margin``) and outside the heart."""
        x, y, z = np.float64(x), np.float64(y), np.float64(z)
        heart = np.sum(((np.array([x, y, z]) - self.heart_center) / (HEART_RADII * 1.15)) ** 2)
        return bool(self.lung_rho(z, y, x) < margin and z > self.lung_base(y, x) + 0.03 and heart > 1.0)


HEART_RADII = np.array([0.3, 0.25, 0.15])  # x, y, z (z in z units)


@dataclass
class Phantom:
    """A phantom volume in HU ``(D, H, W)`` int16, its :class:`Structure` labels (uint8) and anatomy."""

    hu: np.ndarray
    labels: np.ndarray
    anatomy: PhantomAnatomy


def make_labelled_phantom(
    shape: Sequence[int] = (96, 128, 128), seed: int = 0, noise_hu: float | None = None
) -> Phantom:
    """A synthetic CTPA volume of ``shape`` = (D, H, W) with its label map; deterministic by seed.

    ``noise_hu`` is the standard deviation of the CT noise (default: drawn in [10, 20] HU
    per phantom; 0 gives the noise-free anatomy).
    """
    depth, height, width = (int(n) for n in shape)
    if min(depth, height, width) < 1:
        raise ValueError(f"phantom shape must be positive, got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    a = PhantomAnatomy.draw(rng)
    canvas = _Canvas((depth, height, width))
    shape_field = _SmoothField(rng, scale=0.3)
    lung_texture = _SmoothField(rng, scale=0.03)
    noise_rng = np.random.default_rng(rng.integers(2**63))

    _draw_body(canvas, a, shape_field)
    _draw_lungs(canvas, a, shape_field, lung_texture)
    _draw_mediastinum(canvas, a)
    _draw_bones(canvas, a)
    for start, end, radius in _artery_tree(a, rng, min_radius=0.7 * canvas.core_radius):
        canvas.tube(start, end, radius, a.artery_hu, Structure.PULMONARY_ARTERY)
    _finish(canvas, a, a.noise_hu if noise_hu is None else noise_hu, noise_rng)
    return Phantom(canvas.hu, canvas.labels, a)


def make_phantom(shape: Sequence[int] = (96, 128, 128), seed: int = 0, noise_hu: float | None = None) -> np.ndarray:
    """A synthetic CTPA volume in HU, ``int16`` of ``shape`` = (D, H, W); deterministic by seed."""
    return make_labelled_phantom(shape, seed, noise_hu).hu


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
    with atomic_path(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as temporary:
        nib.save(image, temporary)
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


class _Canvas:
    """The HU volume and label map being painted, with the voxel centres' normalised coordinates."""

    def __init__(self, shape: tuple[int, int, int], max_chunk_voxels: int = 1 << 22):
        depth, height, width = shape
        self.hu = np.full(shape, HU_AIR, dtype=np.int16)
        self.labels = np.full(shape, Structure.AIR, dtype=np.uint8)
        self.z = ((np.arange(depth) + 0.5) / depth).astype(np.float32)
        self.y = np.linspace(-1.0, 1.0, height, dtype=np.float32)
        self.x = np.linspace(-1.0, 1.0, width, dtype=np.float32)
        # voxel size (x, y, Z) in units of x; Z = Z_EXTENT * z
        self.voxel = np.array([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1), Z_EXTENT / depth])
        self.max_chunk_voxels = max_chunk_voxels
        self.core_radius = 0.5 * float(np.linalg.norm(self.voxel))  # half a voxel diagonal

    def boxes(
        self, low=(-1.0, -1.0, 0.0), high=(1.0, 1.0, 1.0)
    ) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]]:
        """``(index, z, y, x)`` over z-chunks of the voxels inside the box ``low``-``high`` (x, y, z).

        ``index`` is a tuple of slices into the volume, ``z`` is ``(n, 1, 1)``, ``y`` ``(1, h, 1)``,
        ``x`` ``(1, 1, w)``: broadcasting coordinates of the chunk's voxel centres.
        """
        bounds = [(np.searchsorted(axis, lo, "left"), np.searchsorted(axis, hi, "right"))
                  for axis, lo, hi in zip((self.z, self.y, self.x), low[::-1], high[::-1])]  # fmt: skip
        (d0, d1), (h0, h1), (w0, w1) = bounds
        if d1 <= d0 or h1 <= h0 or w1 <= w0:
            return
        step = max(1, self.max_chunk_voxels // ((h1 - h0) * (w1 - w0)))
        for start in range(d0, d1, step):
            stop = min(start + step, d1)
            index = (slice(start, stop), slice(h0, h1), slice(w0, w1))
            yield index, self.z[start:stop, None, None], self.y[None, h0:h1, None], self.x[None, None, w0:w1]

    def paint(self, index: tuple[slice, ...], mask: np.ndarray, hu: float | np.ndarray, structure: Structure) -> None:
        """Set the voxels of ``mask`` in the chunk ``index`` to ``hu`` (a value or an array); both broadcast."""
        box = self.hu[index]
        mask = np.broadcast_to(mask, box.shape)
        box[mask] = np.rint(np.broadcast_to(hu, box.shape)[mask] if isinstance(hu, np.ndarray) else hu)
        self.labels[index][mask] = structure

    def ellipsoid(self, center, radii, hu: float, structure: Structure, where: Structure | None = None) -> None:
        """Paint an ellipsoid (normalised center and radii, x y z); only over ``where`` voxels if given."""
        center, radii = np.asarray(center), np.asarray(radii)
        for index, z, y, x in self.boxes(center - radii, center + radii):
            mask = sum(((t - c) / r) ** 2 for t, c, r in zip((x, y, z), center, radii)) < 1
            if where is not None:
                mask &= self.labels[index] == where
            self.paint(index, mask, hu, structure)

    def tube(self, p0: np.ndarray, p1: np.ndarray, radius: float, hu: float, structure: Structure) -> None:
        """Paint the segment ``p0``-``p1`` (normalised x, y, z) as a tube of ``radius`` (units of x).

        Voxels whose centre lies within the core radius (at least half a voxel diagonal, so the
        voxels the axis crosses are all in and a tree of tubes stays connected) get ``hu`` and
        ``structure``; a one-voxel shell outside it is blended towards ``hu`` (partial volume).
        """
        scale = np.array([1.0, 1.0, Z_EXTENT])
        q0, q1 = np.asarray(p0) * scale, np.asarray(p1) * scale  # physical (x, y, Z)
        core = max(radius, self.core_radius)
        reach = core + float(self.voxel.max())
        low = (np.minimum(q0, q1) - reach) / scale
        high = (np.maximum(q0, q1) + reach) / scale
        axis = q1 - q0
        length2 = max(float(axis @ axis), 1e-12)
        shell = float(self.voxel.mean())
        for index, z, y, x in self.boxes(low, high):
            rel = (x - q0[0], y - q0[1], z * Z_EXTENT - q0[2])
            t = np.clip((rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / length2, 0.0, 1.0)
            distance = np.sqrt(sum((r - t * c) ** 2 for r, c in zip(rel, axis)))
            weight = np.clip(1.0 - (distance - core) / shell, 0.0, 1.0)
            partial = (weight > 0) & (weight < 1)
            box = self.hu[index]
            box[partial] = np.rint(box[partial] + weight[partial] * (hu - box[partial]))
            self.paint(index, weight >= 1, hu, structure)


class _SmoothField:
    """A random field of unit variance with correlation length ``scale`` (units of x).

    Standard normal weights on a lattice of Gaussian bumps spaced ``scale`` apart, each axis'
    bumps normalised so the variance is 1 everywhere; evaluated separably (three small matrix
    products), only over the bumps that reach the requested box.
    """

    def __init__(self, rng: np.random.Generator, scale: float):
        self.scale = scale
        extents = ((0.0, Z_EXTENT), (-1.0, 1.0), (-1.0, 1.0))  # z, y, x
        self.centers = [np.arange(lo - 3 * scale, hi + 3 * scale, scale) for lo, hi in extents]
        self.weights = rng.standard_normal([len(c) for c in self.centers]).astype(np.float32)

    def _basis(self, t: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, slice]:
        reach = 4 * self.scale
        near = slice(np.searchsorted(centers, t.min() - reach), np.searchsorted(centers, t.max() + reach))
        basis = np.exp(-0.5 * ((t[:, None] - centers[None, near]) / self.scale) ** 2)
        return (basis / np.sqrt((basis**2).sum(1, keepdims=True))).astype(np.float32), near

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The field at the broadcasting grid ``z (n, 1, 1)``, ``y (1, h, 1)``, ``x (1, 1, w)``: ``(n, h, w)``."""
        coordinates = (z.ravel() * Z_EXTENT, y.ravel(), x.ravel())
        (bz, nz), (by, ny), (bx, nx) = (self._basis(t, c) for t, c in zip(coordinates, self.centers))
        field = self.weights[nz, ny, nx] @ bx.T  # (a, b, w)
        field = by @ field  # (a, h, w)
        return (bz @ field.reshape(field.shape[0], -1)).reshape(len(bz), len(by), len(bx))


def _draw_body(canvas: _Canvas, a: PhantomAnatomy, shape_field: _SmoothField) -> None:
    """Skin-to-muscle: fat layer, muscle, then liver and spleen under the diaphragm."""
    for index, z, y, x in canvas.boxes():
        rho = a.body_rho(y, x) + 0.015 * shape_field(z, y, x)
        canvas.paint(index, rho < 1.0, HU_FAT, Structure.FAT)
        canvas.paint(index, rho < 1.0 - a.fat_fraction, HU_MUSCLE, Structure.SOFT_TISSUE)
    w, d, top = a.body_half_width, a.body_half_depth, a.diaphragm_z + 0.1
    soft = Structure.SOFT_TISSUE
    canvas.ellipsoid((0.3 * w, 0.0, top - 0.25), (0.55 * w, 0.75 * d, 0.3), HU_LIVER, soft, where=soft)  # liver
    canvas.ellipsoid((-0.55 * w, -0.4 * d, top - 0.15), (0.2 * w, 0.3 * d, 0.12), HU_MUSCLE, soft, where=soft)  # spleen


def _draw_lungs(canvas: _Canvas, a: PhantomAnatomy, shape_field: _SmoothField, texture: _SmoothField) -> None:
    """Lung parenchyma: a gravity gradient (denser posteriorly) plus correlated texture."""
    for index, z, y, x in canvas.boxes(low=(-1.0, -1.0, a.diaphragm_z)):
        inside = (a.lung_rho(z, y, x) + 0.02 * shape_field(z, y, x) < 1.0) & (z > a.lung_base(y, x))
        inside &= canvas.labels[index] != Structure.AIR
        if inside.any():
            hu = a.lung_hu - 15.0 * y / a.body_half_depth + a.lung_texture_hu * texture(z, y, x)
            np.maximum(hu, HU_AIR, out=hu)
            canvas.paint(index, inside, hu, Structure.LUNG)


def _draw_mediastinum(canvas: _Canvas, a: PhantomAnatomy) -> None:
    """Heart (pericardial fat, myocardium, chambers), great vessels and airways."""
    heart = a.heart_center
    canvas.ellipsoid(heart, HEART_RADII * 1.12, HU_FAT, Structure.FAT)
    canvas.ellipsoid(heart, HEART_RADII, HU_MYOCARDIUM, Structure.SOFT_TISSUE)
    chambers = (  # offset from the heart's center, radii, HU
        ((0.12, 0.08, 0.0), (0.13, 0.1, 0.09), a.artery_hu),  # right ventricle
        ((0.2, -0.06, 0.05), (0.09, 0.09, 0.07), a.artery_hu),  # right atrium
        ((-0.1, -0.02, -0.01), (0.11, 0.1, 0.09), a.blood_hu),  # left ventricle
        ((-0.02, -0.15, 0.06), (0.1, 0.07, 0.06), a.blood_hu),  # left atrium
    )
    for offset, radii, hu in chambers:
        canvas.ellipsoid(heart + np.array(offset), radii, hu, Structure.BLOOD)

    spine, carina = a.spine_y, a.carina
    aorta = [heart + (-0.02, 0.0, 0.08), (0.04, 0.02, carina[2] + 0.06), (0.0, spine + 0.22, carina[2] + 0.16),
             (-0.1, spine + 0.12, carina[2] + 0.12), (-0.12, spine + 0.1, carina[2] - 0.05),
             (-0.1, spine + 0.1, 0.0)]  # fmt: skip
    for start, end in zip(aorta[:-1], aorta[1:]):
        canvas.tube(np.array(start), np.array(end), 0.065, a.blood_hu, Structure.BLOOD)
    right_atrium = heart + (0.2, -0.06, 0.05)
    canvas.tube(np.array((0.16, 0.02, 1.0)), right_atrium, 0.045, a.vena_cava_hu, Structure.BLOOD)

    airways = [((0.0, carina[1], 1.0), carina, 0.05)]
    for side in (-1.0, 1.0):
        airways.append((carina, carina + (side * 0.28 * a.body_half_width, -0.02, -0.06), 0.035))
    for start, end, radius in airways:
        canvas.tube(np.array(start), np.array(end), radius, HU_AIR, Structure.AIR)


def _draw_bones(canvas: _Canvas, a: PhantomAnatomy) -> None:
    """Spine (vertebrae every 0.07 in z with discs between), sternum, ribs and costal cartilage."""
    spine = a.spine_y
    period = 0.07
    for index, z, y, x in canvas.boxes((-0.15, spine - 0.3, 0.0), (0.15, spine + 0.1, 1.0)):
        level = ((z - a.rib_phase * period) / period) % 1.0 - 0.5  # -0.5..0.5 within one vertebra
        body2 = (x / 0.1) ** 2 + ((y - spine) / 0.085) ** 2
        vertebra = body2 + (level / 0.4) ** 4 < 1.0
        canvas.paint(index, body2 < 1.0, HU_DISC, Structure.SOFT_TISSUE)
        canvas.paint(index, vertebra, HU_CORTICAL_BONE, Structure.BONE)
        canvas.paint(index, vertebra & (body2 + (level / 0.4) ** 4 < 0.6), HU_CANCELLOUS_BONE, Structure.BONE)
        canal2 = (x / 0.05) ** 2 + ((y - spine + 0.14) / 0.045) ** 2
        spinous_process = (x / 0.025) ** 2 + ((y - spine + 0.22) / 0.06) ** 2 < 1.0
        arch = ((canal2 > 1.0) & (canal2 < 2.6) & (y < spine - 0.1)) | spinous_process
        canvas.paint(index, arch & (np.abs(level) < 0.35), HU_CORTICAL_BONE, Structure.BONE)
        canvas.paint(index, canal2 < 1.0, HU_CSF, Structure.SOFT_TISSUE)

    front = a.body_half_depth * (1.0 - a.fat_fraction) - 0.06
    canvas.ellipsoid((0.0, front, a.diaphragm_z + 0.45), (0.08, 0.035, 0.3), HU_CORTICAL_BONE, Structure.BONE)
    canvas.ellipsoid((0.0, front, a.diaphragm_z + 0.45), (0.06, 0.02, 0.28), HU_CANCELLOUS_BONE, Structure.BONE)

    # Ribs: bands of the chest wall between the cavity and the muscle surface; each rib runs
    # from the spine (higher) round to the front (lower), the front part costal cartilage.
    inner, outer = a.cavity + 0.015, a.cavity + 0.075
    spacing, drop = 0.065, 0.12
    for index, z, y, x in canvas.boxes(low=(-1.0, -1.0, a.diaphragm_z - 0.05)):
        rho = a.body_rho(y, x)
        band = (rho > inner) & (rho < outer)
        if not band.any():
            continue
        front_fraction = 0.5 * (1.0 + y / (a.body_half_depth * rho + 1e-6))  # 0 at the back, 1 at the front
        u = (z - a.diaphragm_z + drop * front_fraction) / spacing - a.rib_phase
        rib = np.rint(u)
        radial = (rho - 0.5 * (inner + outer)) / (0.5 * (outer - inner))
        section = ((u - rib) * spacing / 0.018) ** 2 + radial**2 < 1.0
        section &= band & (rib >= 1) & (rib <= 12) & (np.abs(x) > 0.12)
        cartilage = section & (front_fraction > 0.85)
        canvas.paint(index, section & ~cartilage, 0.6 * HU_CORTICAL_BONE + 0.4 * HU_CANCELLOUS_BONE, Structure.BONE)
        canvas.paint(index, cartilage, HU_CARTILAGE, Structure.SOFT_TISSUE)


def _artery_tree(
    a: PhantomAnatomy, rng: np.random.Generator, min_radius: float, generations: int = 6
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Pulmonary artery segments ``(start, end, radius)``, normalised (x, y, z) ends, radius in x units.

    Trunk from the right ventricle up and back to the bifurcation under the carina, left and
    right arteries to the hila, then a random binary tree in each lung: each child turns by a
    random angle either side of its parent's direction, is 0.8 times as long and 2^(-1/3) as
    wide (Murray's law), and its end must lie inside the lung (else it is drawn again, up to
    8 times, or dropped). Branches thinner than ``min_radius`` are left out (below the
    resolution they would be drawn far too wide).
    """
    scale = np.array([1.0, 1.0, Z_EXTENT])
    carina = a.carina
    outflow = a.heart_center + (0.1, 0.14, 0.08)
    bifurcation = carina + (-0.04, 0.1, -0.05)
    segments = [(a.heart_center + (0.12, 0.08, 0.0), outflow, 0.07), (outflow, bifurcation, 0.07)]
    murray = 2.0 ** (-1.0 / 3.0)
    for side in (-1.0, 1.0):
        hilum = carina + (side * 0.3 * a.body_half_width, -0.02, -0.06)
        segments.append((bifurcation, hilum, 0.05))
        lobar = ((0.4 * side, 0.1, 1.0), (side, 0.4, -0.2), (0.5 * side, -0.5, -1.0))  # upper, middle, lower
        stack = [(hilum, np.array(d) / np.linalg.norm(d), 0.05 * murray, 0.16, 0) for d in lobar]
        while stack:
            start, direction, radius, length, generation = stack.pop()
            if generation == generations or radius < min_radius:
                continue
            for branch in (1.0, -1.0):
                for _attempt in range(8):
                    perpendicular = np.cross(direction, rng.standard_normal(3))
                    perpendicular /= np.linalg.norm(perpendicular) + 1e-12
                    child = direction + branch * rng.uniform(0.4, 1.0) * perpendicular
                    child /= np.linalg.norm(child)
                    end = start + length * rng.uniform(0.8, 1.2) * child / scale
                    if a.in_lung(*end):
                        segments.append((start, end, radius))
                        stack.append((end, child, radius * murray, length * 0.8, generation + 1))
                        break
    return segments


def _finish(canvas: _Canvas, a: PhantomAnatomy, noise_hu: float, rng: np.random.Generator, sigma: float = 0.8) -> None:
    """Add CT noise (std ``noise_hu``; Gaussian-correlated in-plane, ``sigma`` voxels), clip to the
    scanner's range, and write the padding outside its circular field of view."""
    radius = int(4.0 * sigma + 0.5)  # scipy's kernel, truncate=4
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    gain = noise_hu / float((kernel**2).sum())  # 2D separable: std of the filtered unit noise is sum(k^2)
    for index, z, y, x in canvas.boxes():
        box = canvas.hu[index]
        if noise_hu > 0:
            noise = rng.standard_normal(box.shape, dtype=np.float32)
            ndimage.gaussian_filter(noise, sigma=(0.0, sigma, sigma), output=noise, truncate=4.0)
            box[...] = np.clip(box + gain * noise, HU_MIN, HU_MAX).round()
        outside = np.broadcast_to(x**2 + y**2 > 1.0, box.shape)
        box[outside] = a.padding_hu
        canvas.labels[index][outside] = Structure.OUTSIDE_FOV
