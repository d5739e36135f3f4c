"""Two real chest CT volumes for benchmarks: the ones the ``pyradiomics-bhklab`` sdist ships.

``pyradiomics-bhklab==3.1.4`` (an sdist on PyPI) holds ``data/lung1_image.nrrd``
(512x512x48, 0.57x0.57x5 mm) and ``data/lung2_image.nrrd`` (512x512x61, 0.63x0.63x5 mm):
two non-contrast chest CTs with lung tumours. On first use the sdist is fetched with
``pip download --no-deps`` into a cache folder outside the repository (``$CTPA_VQ_CACHE``,
else ``$XDG_CACHE_HOME/ctpa-vq``, else ``~/.cache/ctpa-vq``), checked against its SHA-256,
and the two images are extracted next to it. Nothing from it is committed.

The NRRD files are read by the package's own reader (:func:`ctpa_vq.data.volume_io.load_volume`,
SimpleITK) and so come in the project's canonical layout, ``(D, H, W) = (Z, Y, X)`` in RAS,
exactly as `ctpa-vq prepare` / `reconstruct` would read them.

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


from ctpa_vq.atomic import atomic_path
from ctpa_vq.data.nifti import CTVolume, save_ct_like
from ctpa_vq.data.volume_io import load_volume

SDIST = "pyradiomics-bhklab==3.1.4"
SDIST_FILE = "pyradiomics_bhklab-3.1.4.tar.gz"
SDIST_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
REAL_CT_NAMES = ("lung1", "lung2")
_MEMBER = "pyradiomics_bhklab-3.1.4/data/{name}_image.nrrd"


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
        with atomic_path(path) as tmp:  # a half-written file never looks cached
            tmp.write_bytes(source.read())
    return path


def load_real_ct(name: str) -> CTVolume:
    """``"lung1"`` or ``"lung2"`` as a canonical :class:`CTVolume` (int16 HU), fetched on first use."""
    return load_volume(real_ct_path(name))


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
