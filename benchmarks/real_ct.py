"""Two real chest CT volumes for benchmarks: the ones the ``pyradiomics-bhklab`` sdist ships.

``pyradiomics-bhklab==3.1.4`` (an sdist on PyPI) holds ``data/lung1_image.nrrd``
(512x512x48, 0.57x0.57x5 mm) and ``data/lung2_image.nrrd`` (512x512x61, 0.63x0.63x5 mm):
two non-contrast chest CTs with lung tumours. On first use the sdist is fetched with
``pip download --no-deps`` into a cache folder outside the repository (``$CTPA_VQ_CACHE``,
else ``$XDG_CACHE_HOME/ctpa-vq``, else ``~/.cache/ctpa-vq``), checked against its SHA-256,
and the two images are extracted next to it. Nothing from it is committed.

The NRRD files are read with pynrrd (the ``bench`` extra) and brought to the project's
canonical layout, ``(D, H, W) = (Z, Y, X)`` in RAS, by the same code that reads NIfTI
(:func:`ctpa_vq.data.nifti.ct_from_image`), so a volume here and the same scan read from a
NIfTI file are voxel for voxel the same array.

    from real_ct import load_real_ct, REAL_CT_NAMES      # with benchmarks/ on sys.path
    lung1 = load_real_ct("lung1")                          # a CTVolume; lung1.hu is int16 (48, 512, 512)
    folder = real_ct_nifti_folder()                        # both as .nii.gz, for `ctpa-vq evaluate`

    python benchmarks/real_ct.py                           # fetch (once) and describe both volumes
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ctpa_vq.data.nifti import CTVolume, ct_from_image, save_ct_like

SDIST = "pyradiomics-bhklab==3.1.4"
SDIST_FILE = "pyradiomics_bhklab-3.1.4.tar.gz"
SDIST_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
REAL_CT_NAMES = ("lung1", "lung2")
_MEMBER = "pyradiomics_bhklab-3.1.4/data/{name}_image.nrrd"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RealCTUnavailable(RuntimeError):
    """The real volumes are not cached and cannot be fetched; the message says what to do."""


def cache_dir() -> Path:
    """Where the sdist and the extracted volumes live (created on demand)."""
    if os.environ.get("CTPA_VQ_CACHE"):
        return Path(os.environ["CTPA_VQ_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ctpa-vq"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_sdist(cache: Path) -> Path:
    """The verified sdist in ``cache``, downloaded with pip if it is not there yet."""
    sdist = cache / SDIST_FILE
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise RealCTUnavailable(
                f"could not download {SDIST} (the real chest CT volumes) into {cache}:\n"
                f"{done.stderr.strip()[-600:]}\n"
                f"Offline? On a machine with PyPI access run `pip download --no-deps {SDIST} -d DIR`, copy "
                f"{SDIST_FILE} into {cache} (or point $CTPA_VQ_CACHE at the folder holding it) and rerun."
            )
    if _sha256(sdist) != SDIST_SHA256:
        raise RealCTUnavailable(
            f"{sdist}: SHA-256 differs from the published {SDIST} sdist ({SDIST_SHA256}); delete it and rerun"
        )
    return sdist


def real_ct_path(name: str) -> Path:
    """Path of the cached ``{name}_image.nrrd`` (``name`` in :data:`REAL_CT_NAMES`), fetched on first use."""
    if name not in REAL_CT_NAMES:
        raise ValueError(f"unknown real CT volume {name!r}; choose from {REAL_CT_NAMES}")
    cache = cache_dir()
    path = cache / f"{name}_image.nrrd"
    if path.is_file():
        return path
    sdist = _fetch_sdist(cache)
    with tarfile.open(sdist) as tar:
        member = tar.getmember(_MEMBER.format(name=name))
        source = tar.extractfile(member)
        tmp = path.with_suffix(".nrrd.part")
        with tmp.open("wb") as out:
            out.write(source.read())
        tmp.replace(path)  # atomic: a half-written file never looks cached
    return path


def read_nrrd_ct(path: str | os.PathLike, name: str | None = None) -> CTVolume:
    """A 3D scalar CT NRRD in LPS space -> canonical :class:`CTVolume` (``hu`` ``(D, H, W)``)."""
    try:
        import nrrd
    except ImportError as err:  # the bench extra
        raise ImportError("reading NRRD needs pynrrd: pip install 'ctpa-vq[bench]' (or pip install pynrrd)") from err
    path = Path(path)
    data, header = nrrd.read(str(path))
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D scalar NRRD, got shape {data.shape}")
    space = header.get("space", "left-posterior-superior")
    if space not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"{path}: NRRD space {space!r}; only left-posterior-superior is supported")
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T  # rows are axis vectors
    affine_lps[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    image = nib.Nifti1Image(data, _LPS_TO_RAS @ affine_lps)
    return ct_from_image(image, name or str(path))


def load_real_ct(name: str) -> CTVolume:
    """``"lung1"`` or ``"lung2"`` as a canonical :class:`CTVolume` (int16 HU), fetched on first use."""
    return read_nrrd_ct(real_ct_path(name), name)


def real_ct_nifti_folder() -> Path:
    """A cache folder holding both volumes as ``.nii.gz`` (for ``ctpa-vq evaluate FOLDER``)."""
    folder = cache_dir() / "nifti"
    folder.mkdir(parents=True, exist_ok=True)
    for name in REAL_CT_NAMES:
        target = folder / f"{name}.nii.gz"
        if not target.is_file():
            volume = load_real_ct(name)
            save_ct_like(volume.hu, volume, target)
    return folder


def main() -> None:
    try:
        volumes = [load_real_ct(name) for name in REAL_CT_NAMES]
    except RealCTUnavailable as err:
        sys.exit(str(err))
    for volume in volumes:
        hu = volume.hu
        print(
            f"{volume.name}: (D, H, W) {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm, "
            f"{hu.dtype}, HU {hu.min()}..{hu.max()}"
        )
    print(f"cache: {cache_dir()}")


if __name__ == "__main__":
    main()
