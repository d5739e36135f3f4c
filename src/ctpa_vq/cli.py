"""The `ctpa-vq` command: prepare / reconstruct / evaluate / verify / push / latent-stats.

Each sub-command is a thin shell over a library function; errors the user can fix are
printed as one line naming the file and the problem, with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys


def _add_prepare(subparsers) -> None:
    prepare = subparsers.add_parser(
        "prepare",
        help="NIfTI CT volumes -> a train/validation dataset (datasets.load_from_disk)",
        description="Scans --input recursively for .nii/.nii.gz, reorients to canonical RAS, keeps int16 HU, "
        "spacing, affine and patient id, splits by patient. Unreadable files are skipped and listed.",
    )
    prepare.add_argument("--input", required=True, help="directory of .nii / .nii.gz volumes (read only)")
    prepare.add_argument("--output", required=True, help="dataset directory to create")
    prepare.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients for validation")
    prepare.add_argument("--max-patients", type=int, default=None, help="use at most N patients")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    prepare.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_dataset

    report = prepare_dataset(
        args.input, args.output, val_fraction=args.val_fraction, max_patients=args.max_patients, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(report.summary())
    return 0


def _add_verify(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check torch/CUDA/bf16, GPUs, the Accelerate config, the data and disk space before a long run",
    )
    verify.add_argument("--config", default=None, help="training recipe (YAML), as given to train_vqgan.py")
    verify.add_argument("--accelerate-config", default=None, help="the Accelerate config the run will use")
    verify.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dataset.path=/data/prepared")
    verify.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training.config import load_config
    from .training.verify import FAIL, verify_environment

    config = load_config(args.config, args.overrides)
    checks = verify_environment(config, Path(args.accelerate_config) if args.accelerate_config else None)
    for check in checks:
        print(check)
    failed = [c for c in checks if c.status == FAIL]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed without failure")
    return 1 if failed else 0


def _add_push(subparsers) -> None:
    push = subparsers.add_parser(
        "push",
        help="push a model or pipeline folder, its model card, recipe and metrics to a (private) Hub repo",
        description="Token: `hf auth login` or HF_TOKEN (never printed). Endpoint: HF_ENDPOINT or --endpoint. "
        "Safe to re-run after an interruption.",
    )
    push.add_argument("--model", required=True, help="save_pretrained folder (VQGAN3D, or pipeline with model_index.json)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="(default)")
    visibility.add_argument("--public", dest="private", action="store_false")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing); default main")
    push.add_argument("--recipe", default=None, help="training recipe YAML (default: a *.yaml in --model)")
    push.add_argument("--metrics", default=None, help="metrics.csv / .json (default: metrics.* in --model)")
    push.add_argument("--dataset", action="append", default=None, help="Hub dataset id for the card; repeatable")
    push.add_argument("--license", default="apache-2.0")
    push.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--message", default="Upload ctpa-vq model, model card, recipe and metrics")
    push.set_defaults(handler=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    result = push_to_hub(
        args.model, args.repo_id, private=args.private, revision=args.revision, endpoint=args.endpoint,
        commit_message=args.message, recipe=args.recipe, metrics=args.metrics, license=args.license,
        datasets=args.dataset,
    )
    visibility = "private" if result.private else "public"
    print(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision} ({visibility}): {result.commit_url}")
    return 0


def _add_latent_stats(subparsers) -> None:
    stats = subparsers.add_parser(
        "latent-stats",
        help="measure per-channel latent mean/std on volumes and store them in the model's config",
    )
    stats.add_argument("--model", required=True, help="save_pretrained folder (VQGAN3D, or pipeline)")
    stats.add_argument("--input", required=True, nargs="+", help="NIfTI files, or folders of *.nii / *.nii.gz")
    stats.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                       help="patch size for patch-wise encoding (default: the pipeline's)")
    stats.add_argument("--overlap", type=float, default=None, help="patch overlap fraction (default: the pipeline's)")
    stats.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    stats.set_defaults(handler=_run_latent_stats)


def _run_latent_stats(args: argparse.Namespace) -> int:
    from .latent_stats import compute_and_store_latent_stats

    result = compute_and_store_latent_stats(
        args.model, args.input, patch_size=args.patch, overlap=args.overlap, progress=not args.no_progress
    )
    print(f"latents over {result.count} voxels per channel, stored in {args.model}")
    for channel, (mean, std) in enumerate(zip(result.mean, result.std)):
        print(f"  channel {channel}: mean {mean:+.5f}  std {std:.5f}")
    return 0


def _add_reconstruct(subparsers) -> None:
    reconstruct = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a NIfTI CT volume patch-wise with a model; print PSNR/SSIM against it",
        description="The output keeps the input's affine, orientation and header. PSNR and SSIM are in HU over "
        "the model's window.",
    )
    reconstruct.add_argument("--input", required=True, help="input .nii / .nii.gz (read only)")
    reconstruct.add_argument("--output", required=True, help="output .nii / .nii.gz (written atomically)")
    _add_inference_options(reconstruct)
    reconstruct.add_argument("--slices", default=None, help="also write a PNG of mid-slices input | output | error")
    reconstruct.set_defaults(handler=_run_reconstruct)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """Model, patch grid, device and progress options shared by `reconstruct` and `evaluate`."""
    parser.add_argument("--model", required=True, help="model or pipeline folder, or a Hub repo id")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), default=(128, 256, 256),
                        help="patch size in voxels (default 128 256 256)")
    parser.add_argument("--overlap", type=_overlap, default=0.25,
                        help="patch overlap: a fraction in [0, 1) or a voxel count >= 1 (default 0.25)")
    parser.add_argument("--blend", choices=("gaussian", "linear", "constant"), default="gaussian")
    parser.add_argument("--batch-size", type=int, default=1, help="patches per model call")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _load_pipeline(args: argparse.Namespace):
    import torch

    from .pipelines import load_reconstruction_pipeline

    pipeline = load_reconstruction_pipeline(args.model)
    pipeline.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline.set_progress_bar_config(disable=args.no_progress)
    return pipeline


def _overlap(text: str) -> float | int:
    value = float(text)
    if value < 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"overlap {text}: a fraction below 1, or a whole number of voxels")
    return int(value)


def _run_reconstruct(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from .data.nifti import load_ct, save_ct_like
    from .metrics import reconstruction_metrics
    from .visualize import save_mid_slices

    output = Path(args.output)
    if not output.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{output}: output must end in .nii or .nii.gz")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: output directory does not exist")
    if output.resolve() == Path(args.input).resolve():
        raise ValueError(f"{output}: refusing to overwrite the input")
    ct = load_ct(args.input)
    pipeline = _load_pipeline(args)
    reconstruction = pipeline(
        ct.hu, patch_size=args.patch, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size
    ).reconstruction
    if ct.hu.dtype.kind in "iu":  # integral input: write integral HU, like the input
        reconstruction = np.rint(reconstruction).astype(ct.hu.dtype)
    metrics = reconstruction_metrics(reconstruction, ct.hu, pipeline.window, device=pipeline.vqgan.device)
    save_ct_like(reconstruction, ct, output)
    print(f"{output}: {metrics}")
    if args.slices:
        save_mid_slices(args.slices, ct.hu, reconstruction, pipeline.window, spacing=ct.spacing)
        print(f"{args.slices}: mid-slices input | reconstruction | |error|")
    return 0


def _add_evaluate(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="reconstruct every volume of a NIfTI folder or a prepared dataset split; PSNR/SSIM per volume",
    )
    evaluate.add_argument("--input", required=True, help="a .nii/.nii.gz file, a folder of them, or a `prepare` output")
    evaluate.add_argument("--split", default="validation", help="split of a prepared dataset (default validation)")
    _add_inference_options(evaluate)
    evaluate.add_argument("--csv", default=None, help="also write the per-volume scores to this CSV")
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from .evaluation import VolumeScore, iter_volumes, score_volume, write_scores_csv

    def summary(score: VolumeScore) -> str:
        return (
            f"PSNR {score.psnr:.2f} dB, SSIM {score.ssim:.4f}; body PSNR {score.body_psnr:.2f} dB, "
            f"SSIM {score.body_ssim:.4f}; MAE HU body {score.mae_body:.1f}, lung {score.mae_lung:.1f}, "
            f"soft tissue {score.mae_soft_tissue:.1f}, vessel {score.mae_vessel:.1f}, bone {score.mae_bone:.1f}"
        )

    pipeline = _load_pipeline(args)
    grid = dict(patch_size=args.patch, overlap=args.overlap, blend=args.blend, batch_size=args.batch_size)
    scores = []
    for name, hu in iter_volumes(args.input, args.split):
        score, _ = score_volume(pipeline, hu, name, **grid)
        scores.append(score)
        print(f"{name}: {summary(score)}; clipped {100 * score.clipped_fraction:.3f}%")
    values = {key: [getattr(s, key) for s in scores] for key in VolumeScore.__dataclass_fields__ if key != "name"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a region empty in every volume stays NaN
        mean = VolumeScore("mean", **{key: float(np.nanmean(v)) for key, v in values.items()})
    low, high = pipeline.window
    print(f"mean over {len(scores)} volumes: {summary(mean)} (HU window {low:g}..{high:g}; regions: ctpa_vq.regions)")
    if args.csv:
        write_scores_csv(scores, args.csv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpa-vq", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare(subparsers)
    _add_reconstruct(subparsers)
    _add_evaluate(subparsers)
    _add_push(subparsers)
    _add_latent_stats(subparsers)
    _add_verify(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"ctpa-vq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
