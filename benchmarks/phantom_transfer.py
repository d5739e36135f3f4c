"""What better phantoms buy: models trained only on phantoms, scored on two real chest CTs.

Two models, identical in everything but their training data: the same recipe as the CPU demo
(`configs/demo.yaml`: tiny preset, 32x64x64 patches, batch 2, seed 0) for the same number of
steps, one on the phantoms of commit 4ed1936 (boxes and ellipses, white noise; its
`phantom.py` is read with `git show` into a temporary module, never committed) and one on
today's `ctpa_vq.data.phantom`. Each is then run through `CTPAReconstructionPipeline` on the
two real volumes of `benchmarks/real_ct.py` (fetched once from the pyradiomics-bhklab sdist)
and scored with `ctpa_vq.evaluation.metrics.reconstruction_metrics` in HU. Also printed: how far each
phantom set's HU distribution is from the real volumes' (Wasserstein-1 distance in HU, inside
the scanner's field of view and the model's window).

The phantoms are generated at the real volumes' scale by default, 64 x 512 x 512 (the
phantom spans about 320 mm in z, so 5 mm slices, as the real scans; 0.6 mm in-plane).

    python benchmarks/phantom_transfer.py                       # 300 steps each, ~30 min on 2 CPU cores
    python benchmarks/phantom_transfer.py --steps 50 --phantoms 4 --shape 32 256 256   # a quick look
    python benchmarks/phantom_transfer.py --keep runs/          # keep both trained models
    python benchmarks/phantom_transfer.py --score runs/         # score models kept earlier, no training
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from scipy.stats import wasserstein_distance

sys.path.insert(0, str(Path(__file__).parent))
from real_ct import REAL_CT_NAMES, RealCTUnavailable, load_real_ct  # noqa: E402

import ctpa_vq.data.phantom as new_phantom  # noqa: E402
from ctpa_vq import VQGAN3D  # noqa: E402
from ctpa_vq.data.prepare import prepare_dataset  # noqa: E402
from ctpa_vq.evaluation.metrics import reconstruction_metrics  # noqa: E402
from ctpa_vq.models.intensity import DEFAULT_HU_WINDOW  # noqa: E402
from ctpa_vq.pipelines import CTPAReconstructionPipeline  # noqa: E402
from ctpa_vq.training import load_config, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
OLD_COMMIT = "4ed1936"


def old_phantom_module(folder: Path) -> ModuleType:
    """`ctpa_vq/data/phantom.py` as of :data:`OLD_COMMIT`, imported from a temporary file."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:src/ctpa_vq/data/phantom.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = folder / f"phantom_{OLD_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def train_on_phantoms(module: ModuleType, args: argparse.Namespace, work: Path) -> VQGAN3D:
    """The demo recipe for ``args.steps`` steps on ``args.phantoms`` phantoms from ``module``."""
    raw, dataset = work / "phantoms", work / "dataset"
    start = time.perf_counter()
    module.write_phantom_dir(raw, args.phantoms + 1, tuple(args.shape), seed=0, compressed=False)
    print(f"  {args.phantoms + 1} phantoms {'x'.join(map(str, args.shape))}: {time.perf_counter() - start:.1f} s")
    prepare_dataset(raw, dataset, val_fraction=0.01, progress=False)  # one for the loop's final validation
    patch = ",".join(map(str, args.patch))
    config = load_config(DEMO_CONFIG, [
        f"dataset.path={dataset}", f"dataset.patch_size=[{patch}]", f"training.output_dir={work / 'run'}",
        f"training.max_steps={args.steps}", f"training.validate_every={10 * args.steps}",
        f"training.checkpoint_every={10 * args.steps}", "training.seed=0",
    ])  # fmt: skip
    start = time.perf_counter()
    model = train(config).model
    print(f"  {args.steps} steps: {time.perf_counter() - start:.0f} s")
    return model


def hu_distance(
    sample: np.ndarray, reference: np.ndarray, window: tuple[float, float], rng: np.random.Generator
) -> float:
    """Wasserstein-1 distance (HU) between two HU distributions, clipped to ``window``, scanner
    padding (below -1024) left out; on up to 10^6 voxels of each."""

    def values(hu: np.ndarray) -> np.ndarray:
        flat = hu[hu >= -1024]
        flat = flat if flat.size <= 10**6 else rng.choice(flat, 10**6, replace=False)
        return np.clip(flat, *window)

    return float(wasserstein_distance(values(sample), values(reference)))


def scores(model: VQGAN3D, volumes: dict[str, np.ndarray], patch: list[int]) -> dict[str, dict[str, float]]:
    """Every number of `reconstruction_metrics`, per real volume, for ``model``."""
    pipeline = CTPAReconstructionPipeline(vqgan=model.eval())
    table = {}
    for name, hu in volumes.items():
        reconstruction = pipeline(hu, patch_size=patch, batch_size=8).reconstruction
        metrics = dataclasses.asdict(reconstruction_metrics(reconstruction, hu, pipeline.window))
        metrics.pop("window")
        table[name] = _flatten(metrics)
    return table


def _flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--keep", type=Path, default=None, help="save both trained models here")
    parser.add_argument("--score", type=Path, default=None, help="score the models saved by --keep instead of training")
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        volumes = {name: load_real_ct(name).hu for name in REAL_CT_NAMES}
    except RealCTUnavailable as err:
        sys.exit(str(err))

    rows: dict[str, dict[str, dict[str, float]]] = {}
    distances: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {f"old ({OLD_COMMIT})": old_phantom_module(Path(tmp)), "new": new_phantom}
        for label, module in variants.items():
            key = label.split()[0]
            print(f"{label} phantoms")
            sample = module.make_phantom(tuple(args.shape), seed=0)
            rng = np.random.default_rng(0)
            distance = [hu_distance(sample, hu, DEFAULT_HU_WINDOW, rng) for hu in volumes.values()]
            distances[label] = float(np.mean(distance))
            if args.score is not None:
                model = VQGAN3D.from_pretrained(args.score / key)
            else:
                model = train_on_phantoms(module, args, Path(tmp) / key)
                if args.keep is not None:
                    model.save_pretrained(args.keep / key)
            rows[label] = scores(model, volumes, args.patch)

    trained = f"models from {args.score}" if args.score else f"steps={args.steps} phantoms={args.phantoms}"
    print(f"\nCPU threads={torch.get_num_threads()} {trained} shape={'x'.join(map(str, args.shape))} "
          f"patch={'x'.join(map(str, args.patch))}\n")  # fmt: skip
    print("| phantoms | HU distance to real (W1, HU) |")
    print("|---|---:|")
    for label, distance in distances.items():
        print(f"| {label} | {distance:.1f} |")
    columns = list(next(iter(next(iter(rows.values())).values())))
    print("\n| phantoms | volume | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for label, per_volume in rows.items():
        mean = {c: float(np.mean([v[c] for v in per_volume.values()])) for c in columns}
        for name, values in {**per_volume, "mean": mean}.items():
            print(f"| {label} | {name} | " + " | ".join(f"{values[c]:.4g}" for c in columns) + " |")


if __name__ == "__main__":
    main()
