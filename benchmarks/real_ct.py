"""Six real chest CT volumes for benchmarks, from two packages on PyPI, with a fixed split.

* ``pyradiomics-bhklab==3.1.4`` (sdist) holds ``data/lung1_image.nrrd`` (512x512x48,
  0.57x0.57x5 mm) and ``data/lung2_image.nrrd`` (512x512x61, 0.63x0.63x5 mm): two whole
  non-contrast chest CTs with lung tumours.
* ``pycerr==2.5.1`` (wheel) holds ``cerr/datasets/radiomics_phantom_dicom/pat_1`` .. ``pat_4``:
  four DICOM CT series (0.98x0.98x3 mm, 41-60 slices, 136-204 pixels in-plane), chest CTs of
  lung cancer patients cropped around the tumour (the IBSI radiomics test patients); ``pat1``
  .. ``pat4`` here. A different scanner and protocol from lung1/lung2.

On first use each package is fetched with ``pip download --no-deps`` into a cache folder outside
the repository (``$CTPA_VQ_CACHE``, else ``$XDG_CACHE_HOME/ctpa-vq``, else ``~/.cache/ctpa-vq``),
checked against its SHA-256, and the volumes are extracted next to it. Nothing from them is
committed. The files are read by the package's own reader
(:func:`ctpa_vq.data.volume_io.load_volume`: SimpleITK for NRRD, the DICOM series reader for the
folders) and so come in the project's canonical layout, ``(D, H, W) = (Z, Y, X)`` in RAS,
exactly as ``ctpa-vq prepare`` / ``reconstruct`` would read them.

:data:`SPLIT` fixes which volumes train, which choose settings (validation) and which are
scored (test); every benchmark choice is made on validation.

    from real_ct import load_real_ct, SPLIT                # with benchmarks/ on sys.path
    lung1 = load_real_ct("lung1")                          # a CTVolume; lung1.hu is int16 (48, 512, 512)
    folder = real_ct_nifti_folder()                        # lung1/lung2 as .nii.gz, for `ctpa-vq evaluate`

    python benchmarks/real_ct.py                           # fetch (once) and describe all six volumes
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ctpa_vq.data.nifti import CTVolume, save_ct_like
from ctpa_vq.data.volume_io import load_volume
from ctpa_vq.utils.atomic import atomic_folder, atomic_path


@dataclass(frozen=True)
class Distribution:
    """A file on PyPI (an sdist or a wheel) that ships CT volumes, pinned by version and hash."""

    requirement: str
    file: str
    sha256: str


PYRADIOMICS = Distribution(
    "pyradiomics-bhklab==3.1.4",
    "pyradiomics_bhklab-3.1.4.tar.gz",
    "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb",
)
PYCERR = Distribution(
    "pycerr==2.5.1", "pycerr-2.5.1-py3-none-any.whl", "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d"
)
SDIST, SDIST_FILE, SDIST_SHA256 = PYRADIOMICS.requirement, PYRADIOMICS.file, PYRADIOMICS.sha256

CT_VOLUMES: dict[str, tuple[Distribution, str]] = {
    # name: (the distribution, the member: a file, or a folder ending in "/" holding one DICOM series)
    "lung1": (PYRADIOMICS, "pyradiomics_bhklab-3.1.4/data/lung1_image.nrrd"),
    "lung2": (PYRADIOMICS, "pyradiomics_bhklab-3.1.4/data/lung2_image.nrrd"),
    **{f"pat{i}": (PYCERR, f"cerr/datasets/radiomics_phantom_dicom/pat_{i}/") for i in range(1, 5)},
}
REAL_CT_NAMES = ("lung1", "lung2")  # the pyradiomics pair, as the older benchmarks use it
SPLIT: dict[str, tuple[str, ...]] = {
    # Fixed before any model was scored: one whole scan and one crop per part, the largest crop
    # (pat4 by voxels after lung1) training, lung2 (the scan the older tables were tuned on) tested.
    "train": ("lung1", "pat4"),
    "validation": ("pat1", "pat2"),
    "test": ("lung2", "pat3"),
}


class RealCTUnavailable(RuntimeError):
    """The real volumes are not cached and cannot be fetched; the message says what to do."""


def cache_dir() -> Path:
    """Where the downloads and the extracted volumes live (created on demand)."""
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


def _fetch(dist: Distribution, cache: Path) -> Path:
    """The verified ``dist`` file in ``cache``, downloaded with pip if it is not there yet."""
    target = cache / dist.file
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", dist.requirement, "-d", str(cache)]
        if dist.file.endswith(".tar.gz"):
            command += ["--no-binary", dist.requirement.split("==")[0]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not target.is_file():
            raise RealCTUnavailable(
                f"could not download {dist.requirement} (real CT volumes) into {cache}:\n"
                f"{done.stderr.strip()[-600:]}\n"
                f"Offline? On a machine with PyPI access run `pip download --no-deps {dist.requirement} -d DIR`, "
                f"copy {dist.file} into {cache} (or point $CTPA_VQ_CACHE at the folder holding it) and rerun."
            )
    if _sha256(target) != dist.sha256:
        raise RealCTUnavailable(
            f"{target}: SHA-256 differs from the published {dist.requirement} file ({dist.sha256}); delete it and rerun"
        )
    return target


def _extract(archive: Path, member: str, path: Path) -> None:
    """Copy ``member`` (a file, or every file under a folder ``.../``) of a tar or zip archive to ``path``."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar, atomic_path(path) as tmp:  # a half-written file never looks cached
            tmp.write_bytes(tar.extractfile(tar.getmember(member)).read())
        return
    with zipfile.ZipFile(archive) as wheel, atomic_folder(path) as tmp:
        tmp.mkdir()
        for name in (name for name in wheel.namelist() if name.startswith(member) and not name.endswith("/")):
            (tmp / Path(name).name).write_bytes(wheel.read(name))


def real_ct_path(name: str) -> Path:
    """Path of the cached volume ``name`` (a file or a DICOM series folder), fetched on first use."""
    if name not in CT_VOLUMES:
        raise ValueError(f"unknown real CT volume {name!r}; choose from {tuple(CT_VOLUMES)}")
    dist, member = CT_VOLUMES[name]
    cache = cache_dir()
    path = cache / (name if member.endswith("/") else f"{name}_image{Path(member).suffix}")
    if not path.exists():
        _extract(_fetch(dist, cache), member, path)
    return path


def load_real_ct(name: str) -> CTVolume:
    """Volume ``name`` (a key of :data:`CT_VOLUMES`) as a canonical :class:`CTVolume` (int16 HU)."""
    return load_volume(real_ct_path(name))


def real_ct_nifti_folder() -> Path:
    """A cache folder holding lung1 and lung2 as ``.nii.gz`` (for ``ctpa-vq evaluate FOLDER``)."""
    folder = cache_dir() / "nifti"
    folder.mkdir(parents=True, exist_ok=True)
    for name in REAL_CT_NAMES:
        target = folder / f"{name}.nii.gz"
        if not target.is_file():
            volume = load_real_ct(name)
            save_ct_like(volume.hu, volume, target)
    return folder


def main() -> None:
    for part, names in SPLIT.items():
        for name in names:
            try:
                volume = load_real_ct(name)
            except RealCTUnavailable as err:
                sys.exit(str(err))
            hu = volume.hu
            print(
                f"{part}: {name}: (D, H, W) {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm, "
                f"{hu.dtype}, HU {hu.min()}..{hu.max()}"
            )
    print(f"cache: {cache_dir()}")


if __name__ == "__main__":
    main()
