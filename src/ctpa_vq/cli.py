"""The `ctpa-vq` command: prepare / reconstruct / evaluate / verify / push / latent-stats / encode.

Each sub-command is a thin shell over a library function; errors the user can fix are
printed as one line naming the file and the problem, with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _add_prepare(subparsers) -> None:
    prepare = subparsers.add_parser(
        "prepare",
        help="CT volumes (NIfTI, NRRD, MetaImage, DICOM series) -> a train/validation dataset "
        "(datasets.load_from_disk)",
        description="Scans --input recursively for .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd files and DICOM series "
        "folders, reorients to canonical RAS, keeps int16 HU, spacing, affine and a pseudonymised patient id, "
        "splits by patient (a hash of its id). Unreadable volumes are skipped and listed; prepare_report.json "
        "counts them. Written in shards as it goes: re-run the same command to resume. Under `accelerate launch` "
        "each process prepares its share.",
    )
    prepare.add_argument("--input", default=None,
                         help="directory of volumes and/or DICOM series folders (read only), or "
                         "hf://datasets/ORG/NAME[/PATH] (fetched one patient at a time; token: HF_TOKEN or hf auth login)")
    prepare.add_argument("--output", required=True, help="dataset directory to create (re-run to resume)")
    prepare.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients for validation")
    prepare.add_argument("--max-patients", type=int, default=None, help="use at most N patients")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    prepare.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                         help="resample every volume to this spacing in mm (default: keep each volume's grid)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    prepare.add_argument("--num-proc", type=int, default=1, help="worker processes (each holds about one volume)")
    prepare.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                         help="prepare only part I (0-based) of N, e.g. one per machine; then --combine the parts")
    prepare.add_argument("--patients-per-shard", type=int, default=8, help="patients per shard, the unit of resuming")
    prepare.add_argument("--combine", nargs="+", default=None, metavar="PART",
                         help="join the outputs of --shard runs into --output (instead of reading --input)")
    prepare.add_argument("--all-series", action="store_true",
                         help="keep every DICOM series of a study (default: the axial series with the most slices, "
                         "then the thinnest; the others are listed as skipped)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_privacy_options(prepare)
    prepare.set_defaults(handler=_run_prepare)


def _add_privacy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-identifiers", action="store_true",
                        help="store/print patient ids and paths as they are (default: keyed-hash pseudonyms)")
    parser.add_argument("--key-file", default=None,
                        help="pseudonymisation key (default: $CTPA_VQ_KEY_FILE or ~/.config/ctpa-vq/pseudonym.key, "
                        "created on first use)")


def _pseudonymise(args: argparse.Namespace):
    """Identifier -> what is stored or printed: its keyed-hash pseudonym, or itself with --keep-identifiers.
    The key is loaded (or created) on the first identifier, so a run that prints none needs none."""
    from functools import cache

    from .data.privacy import PseudonymKey

    if args.keep_identifiers:
        return str
    key = cache(lambda: PseudonymKey.load(args.key_file))
    return lambda identifier: key().pseudonym(identifier)


def _shard(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected I/N, e.g. 0/4") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"{text}: expected 0 <= I < N")
    return part, parts


def _run_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import combine_parts, prepare_dataset, process_rank
    from .data.privacy import PseudonymKey

    if args.combine:
        if args.input:
            raise ValueError("--combine joins prepared parts: give it no --input")
        print(combine_parts(args.combine, args.output).summary())
        return 0
    if not args.input:
        raise ValueError("--input is required (or --combine PART... to join prepared parts)")
    key = None if args.keep_identifiers else PseudonymKey.load(args.key_file)
    report = prepare_dataset(
        args.input, args.output, val_fraction=args.val_fraction, max_patients=args.max_patients, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress, target_spacing=args.spacing,
        keep_identifiers=args.keep_identifiers, key=key, num_proc=args.num_proc, shard=args.shard,
        patients_per_shard=args.patients_per_shard, all_series=args.all_series,
    )
    if process_rank()[0] == 0:
        print(report.summary())
    return 0


def _add_verify(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check torch/CUDA/bf16, GPUs, the Accelerate config, predicted GPU memory, the data and disk space "
        "before a long run",
        description="Predicts the peak GPU memory per process of one training step by tracing it on fake tensors "
        "(no GPU needed) and compares it with the GPUs found or --gpu-memory; when it does not fit, names the knobs "
        "that do. Multi-node configs: num_machines x GPUs per node == num_processes, a reachable rendezvous address.",
    )
    verify.add_argument("--config", default=None, help="training recipe (YAML), as given to train_vqgan.py")
    verify.add_argument("--accelerate-config", default=None, help="the Accelerate config the run will use")
    verify.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="memory of one GPU of the target machine in GiB (default: the GPUs found here)")
    verify.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dataset.path=/data/prepared")
    verify.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training.config import load_config
    from .training.verify import FAIL, verify_environment

    config = load_config(args.config, args.overrides)
    accelerate_config = Path(args.accelerate_config) if args.accelerate_config else None
    checks = verify_environment(config, accelerate_config, args.gpu_memory)
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
    push.add_argument("--data", default=None,
                      help="prepared dataset the model was trained on, for the card's provenance "
                      "(default: the recipe's dataset.path if it exists here)")
    push.add_argument("--provenance", default=None,
                      help="YAML with sites, scanners, contrast_phase, data_license, deidentification for the card")
    push.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--message", default="Upload ctpa-vq model, model card, recipe and metrics")
    push.set_defaults(handler=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub.push import push_to_hub

    result = push_to_hub(
        args.model, args.repo_id, private=args.private, revision=args.revision, endpoint=args.endpoint,
        commit_message=args.message, recipe=args.recipe, metrics=args.metrics, license=args.license,
        datasets=args.dataset, dataset_dir=args.data, provenance=args.provenance,
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
    stats.add_argument("--input", required=True, nargs="+",
                       help="volume files (NIfTI, NRRD, MetaImage), DICOM series folders, or folders of them")
    _add_grid_options(stats)
    stats.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    stats.set_defaults(handler=_run_latent_stats)


def _run_latent_stats(args: argparse.Namespace) -> int:
    from .latents.stats import compute_and_store_latent_stats

    result = compute_and_store_latent_stats(
        args.model, args.input, **_grid_options(args), progress=not args.no_progress
    )
    for reason in result.skipped:
        print(f"skipped {reason}")
    print(f"latents over {result.count} voxels per channel, stored in {args.model}")
    for channel, (mean, std) in enumerate(zip(result.mean, result.std)):
        print(f"  channel {channel}: mean {mean:+.5f}  std {std:.5f}")
    return 0


def _add_encode(subparsers) -> None:
    encode = subparsers.add_parser(
        "encode",
        help="whole volumes -> a datasets table of latents for the DDPM (resumable; accelerate launch splits it)",
        description="One row per volume: latents (unscaled and scaled), code indices, shapes, spacing, affine, "
        "split, pseudonymous patient id; Parquet shards under --output/data, written as it goes. Volumes already "
        "encoded are skipped. Under `accelerate launch` each process encodes its share.",
    )
    encode.add_argument("--model", required=True, help="saved pipeline or model folder, or Hub repo id (with latent stats)")
    encode.add_argument("--input", required=True,
                        help="prepared dataset (ctpa-vq prepare) or folder of volumes (NIfTI, NRRD, MetaImage, DICOM)")
    encode.add_argument("--output", required=True, help="output folder (created; re-run to resume)")
    encode.add_argument("--split", action="append", default=None, help="prepared split to encode; repeatable (default: all)")
    _add_grid_options(encode)
    encode.add_argument("--batch-size", type=int, default=1, help="patches per model call")
    encode.add_argument("--volumes-per-shard", type=int, default=16, help="volumes per Parquet shard")
    encode.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_privacy_options(encode)
    encode.set_defaults(handler=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from .latents.encode import encode_dataset

    report = encode_dataset(
        args.model, args.input, args.output, splits=args.split, **_grid_options(args),
        batch_size=args.batch_size, volumes_per_shard=args.volumes_per_shard, progress=not args.no_progress,
        pseudonymise=_pseudonymise(args),
    )
    print(f"encoded {report.encoded} volume(s) in {report.seconds:.1f} s ({report.volumes_per_second:.3f} volumes/s), "
          f"skipped {report.skipped} already encoded -> {report.output_dir}")
    for error in report.failed:
        print(f"ctpa-vq encode: not encoded: {error}", file=sys.stderr)
    return 1 if report.failed else 0


def _add_reconstruct(subparsers) -> None:
    reconstruct = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a CT volume (NIfTI, NRRD, MetaImage, DICOM series folder) patch-wise; print PSNR/SSIM",
        description="The output lands on the input's own grid (affine, orientation; a NIfTI input's header too). "
        "PSNR and SSIM are in HU over the model's window.",
    )
    reconstruct.add_argument("--input", required=True,
                             help="a .nii/.nii.gz, .nrrd/.nhdr or .mha/.mhd file, or a folder with one DICOM series "
                             "(read only)")
    reconstruct.add_argument("--output", required=True,
                             help="output .nii/.nii.gz (or .nrrd/.mha), written atomically")
    reconstruct.add_argument("--overwrite", action="store_true", help="replace an existing --output / --slices")
    _add_spacing_option(reconstruct)
    _add_inference_options(reconstruct)
    reconstruct.add_argument("--slices", default=None, help="also write a PNG of mid-slices input | output | error")
    reconstruct.add_argument("--no-metrics", action="store_true",
                             help="skip scoring (PSNR, SSIM, region errors against the input): write the volume only")
    reconstruct.set_defaults(handler=_run_reconstruct)


def _add_spacing_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spacing", nargs="+", metavar="MM", default=None, type=_spacing_value,
                        help="run the model at this spacing: 'training' (the median spacing of the model's training "
                        "data) or D H W in mm; the result is resampled back onto the input's grid (default: no "
                        "resampling)")


def _spacing_value(text: str) -> str | float:
    if text == "training":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: 'training' or a spacing in mm") from None


def _spacing(args: argparse.Namespace):
    """--spacing as `ctpa_vq.pipelines.spacing.reconstruct_volume` takes it: None, "training" or (D, H, W)."""
    if args.spacing is None:
        return None
    if args.spacing == ["training"]:
        return "training"
    if len(args.spacing) != 3 or "training" in args.spacing:
        raise ValueError(f"--spacing {' '.join(map(str, args.spacing))}: give 'training' or three values D H W in mm")
    return tuple(args.spacing)


def _add_grid_options(parser: argparse.ArgumentParser) -> None:
    """The patch grid options (`CTPAReconstructionPipeline.patch_grid`) of every command that runs the model."""
    parser.add_argument("--patch", type=_patch, nargs="+", metavar="D H W | planned", default=None,
                        help="patch size in voxels, or 'planned': the fewest voxels within --max-patch-voxels "
                        "(default: the model's inference patch, the one it was trained on; planned for a model "
                        "without one)")
    parser.add_argument("--overlap", type=_overlap, default=None,
                        help="patch overlap: a fraction in [0, 1) (with --patch only) or a voxel count >= 1 "
                        "(default: 0.25 with --patch, 4 latent voxels = 16 voxels for a planned grid)")
    parser.add_argument("--max-patch-voxels", type=int, default=None,
                        help="memory budget of a planned patch in voxels (default 128*256*256 = 8388608)")


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """Model, patch grid, device and progress options shared by `reconstruct` and `evaluate`."""
    parser.add_argument("--model", required=True, help="model or pipeline folder, or a Hub repo id")
    _add_grid_options(parser)
    parser.add_argument("--blend", choices=("linear", "gaussian", "constant"), default="linear",
                        help="how overlapping decoded patches blend (default linear: a ramp across the overlap)")
    parser.add_argument("--batch-size", type=int, default=1, help="patches per model call")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _load_pipeline(args: argparse.Namespace):
    from .hub.model_source import resolve_model
    from .pipelines import load_reconstruction_pipeline

    device = _device(args.device)
    source = resolve_model(args.model)  # errors name the folder and what it lacks
    try:
        pipeline = load_reconstruction_pipeline(source)
    except OSError as err:  # diffusers' "no file named ..." and friends
        raise FileNotFoundError(f"{args.model}: the model cannot be loaded ({err})") from err
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=args.no_progress)
    return pipeline


def _device(name: str | None):
    """The torch device to run on; an error naming what is missing when it is not available here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        cause = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available ({cause}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _patch(value: str) -> int | str:
    """One `--patch` word: a voxel count, or a word the pipeline knows ('planned')."""
    return int(value) if value.isdigit() else value


def _grid_options(args: argparse.Namespace) -> dict:
    """The patch grid keyword arguments of `CTPAReconstructionPipeline.patch_grid`."""
    patch = args.patch
    if patch is not None and len(patch) == 1 and isinstance(patch[0], str):
        patch = patch[0]  # a word: the pipeline checks it
    elif patch is not None and (len(patch) != 3 or not all(isinstance(p, int) for p in patch)):
        raise ValueError(f"--patch {' '.join(map(str, patch))}: give three sizes D H W in voxels, or 'planned'")
    return dict(patch_size=patch, overlap=args.overlap, max_patch_voxels=args.max_patch_voxels)


def _describe_grid(args: argparse.Namespace, pipeline, shape) -> str:
    return f"patch grid {pipeline.patch_grid(shape, **_grid_options(args)).describe()}"


def _describe_run(args: argparse.Namespace, pipeline, shape, spacing, target) -> str:
    """The patch plan of a volume of `shape` at `spacing` mm when the model runs at `target` (None: as it is)."""
    from .data.resample import resampled_shape

    if target is None:
        return _describe_grid(args, pipeline, shape)
    at = " x ".join(f"{s:g}" for s in target)
    return f"{_describe_grid(args, pipeline, resampled_shape(shape, spacing, target))} at {at} mm"


def _overlap(text: str) -> float | int:
    value = float(text)
    if value < 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"overlap {text}: a fraction below 1, or a whole number of voxels")
    return int(value)


def _run_reconstruct(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from .data.volume_io import VOLUME_SUFFIXES, load_volume, save_volume_like
    from .evaluation.metrics import SSIM_KERNEL, psnr_hu, reconstruction_metrics
    from .evaluation.visualize import save_mid_slices
    from .pipelines.spacing import reconstruct_volume, target_spacing

    output = Path(args.output)
    if not output.name.endswith(VOLUME_SUFFIXES):
        raise ValueError(f"{output}: output must end in {', '.join(VOLUME_SUFFIXES)}")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: output directory does not exist")
    if output.resolve() == Path(args.input).resolve():
        raise ValueError(f"{output}: refusing to overwrite the input")
    for path in (output, Path(args.slices) if args.slices else None):
        if path is not None and path.exists() and not args.overwrite:
            raise ValueError(f"{path}: already exists (choose another output, or pass --overwrite)")
    ct = load_volume(args.input)
    pipeline = _load_pipeline(args)
    spacing = target_spacing(pipeline, _spacing(args))
    print(f"{args.input}: {_describe_run(args, pipeline, ct.shape, ct.spacing, spacing)}")
    started = time.perf_counter()
    reconstruction = reconstruct_volume(pipeline, ct, spacing, **_grid_options(args), blend=args.blend,
                                        batch_size=args.batch_size)
    model_seconds = time.perf_counter() - started
    if ct.hu.dtype.kind in "iu":  # integral input: write integral HU, like the input
        reconstruction = np.rint(reconstruction).astype(ct.hu.dtype)
    save_volume_like(reconstruction, ct, output)
    started = time.perf_counter()
    if args.no_metrics:
        metrics = "written (scoring skipped: --no-metrics)"
    elif min(ct.shape) > SSIM_KERNEL // 2:
        metrics = reconstruction_metrics(reconstruction, ct.hu, pipeline.window, device=pipeline.vqgan.device)
    else:  # too thin for the 3D SSIM kernel: report what applies
        low, high = pipeline.window
        psnr = psnr_hu(reconstruction, ct.hu, pipeline.window, device=pipeline.vqgan.device)
        metrics = (f"PSNR {psnr:.2f} dB (HU window {low:g}..{high:g}); SSIM not computed: 3D SSIM needs more than "
                   f"{SSIM_KERNEL // 2} voxels along every axis, this volume is {'x'.join(map(str, ct.shape))}")
    print(f"{output}: {metrics}")
    scoring_seconds = time.perf_counter() - started
    print(f"time: reconstruction {model_seconds:.1f} s, scoring {scoring_seconds:.1f} s "
          f"({scoring_seconds / max(model_seconds, 1e-9):.2f}x the reconstruction)")
    if args.slices:
        save_mid_slices(args.slices, ct.hu, reconstruction, pipeline.window, spacing=ct.spacing)
        print(f"{args.slices}: mid-slices input | reconstruction | |error|")
    return 0


def _add_evaluate(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="reconstruct every volume of a NIfTI folder or a prepared dataset split; PSNR/SSIM per volume",
    )
    evaluate.add_argument("--input", required=True,
                          help="a volume file, a folder of volumes / DICOM series folders, or a `prepare` output")
    evaluate.add_argument("--split", default="validation", help="split of a prepared dataset (default validation)")
    _add_inference_options(evaluate)
    _add_spacing_option(evaluate)
    evaluate.add_argument("--csv", default=None, help="also write the per-volume scores to this CSV")
    _add_privacy_options(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from .data.dicom import SkippedSeries
    from .data.nifti import CTFileError
    from .evaluation.scoring import VolumeScore, iter_volumes, score_volume, write_scores_csv
    from .pipelines.spacing import target_spacing

    def summary(score: VolumeScore) -> str:
        return (
            f"PSNR {score.psnr:.2f} dB, SSIM {score.ssim:.4f}; body PSNR {score.body_psnr:.2f} dB, "
            f"SSIM {score.body_ssim:.4f}; MAE HU body {score.mae_body:.1f}, lung {score.mae_lung:.1f}, "
            f"soft tissue {score.mae_soft_tissue:.1f}, vessel {score.mae_vessel:.1f}, bone {score.mae_bone:.1f}"
        )

    pipeline = _load_pipeline(args)
    target = target_spacing(pipeline, _spacing(args))
    options = dict(_grid_options(args), blend=args.blend, batch_size=args.batch_size, target_spacing=target)
    scores, failures = [], []
    for name, read in iter_volumes(args.input, args.split, name=_pseudonymise(args)):
        try:
            hu, spacing = read()
            print(f"{name}: {_describe_run(args, pipeline, hu.shape, spacing, target)}")
            score, _ = score_volume(pipeline, hu, name, **options, spacing=spacing)
        except SkippedSeries as err:
            print(f"skipped {err}")
            continue
        except CTFileError as err:
            failures.append(str(err))
            continue
        except ValueError as err:  # e.g. a volume too thin for 3D SSIM
            failures.append(f"{name}: {err}")
            continue
        scores.append(score)
        print(f"{name}: {summary(score)}; clipped {100 * score.clipped_fraction:.3f}%")
    if scores:
        values = {key: [getattr(s, key) for s in scores] for key in VolumeScore.__dataclass_fields__ if key != "name"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a region empty in every volume stays NaN
            mean = VolumeScore("mean", **{key: float(np.nanmean(v)) for key, v in values.items()})
        low, high = pipeline.window
        print(f"mean over {len(scores)} volumes: {summary(mean)} "
              f"(HU window {low:g}..{high:g}; regions: ctpa_vq.evaluation.regions)")
    if args.csv and scores:
        write_scores_csv(scores, args.csv)
    if failures:
        print(f"ctpa-vq evaluate: {len(failures)} volume(s) could not be scored:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


def _show_input_warnings(command: str, show_others):
    """`warnings.showwarning` that prints a volume's `InputSpecWarning` as one line, like the errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        from .models.input_spec import InputSpecWarning

        if issubclass(category, InputSpecWarning):
            print(f"ctpa-vq {command}: warning: {message}", file=sys.stderr)
        else:
            show_others(message, category, filename, lineno, file, line)

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpa-vq", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare(subparsers)
    _add_reconstruct(subparsers)
    _add_evaluate(subparsers)
    _add_push(subparsers)
    _add_latent_stats(subparsers)
    _add_encode(subparsers)
    _add_verify(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .utils.allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # this process is ours: reuse freed activations instead of re-faulting them
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_input_warnings(args.command, warnings.showwarning)
            return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"ctpa-vq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctpa-vq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # never a traceback for the user; CTPA_VQ_DEBUG=1 shows it
        if os.environ.get("CTPA_VQ_DEBUG"):
            raise
        print(f"ctpa-vq {args.command}: error: {type(err).__name__}: {err} (set CTPA_VQ_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
