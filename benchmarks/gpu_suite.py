"""Every GPU figure the README and BENCHMARKS.md lack, in one run of at most 8 minutes on one H100/H200.

Measured through the project's own code paths (`build_training` + `train_micro_batch`, the
reconstruction pipeline, `score_volume` as validation calls it, `encode_dataset`), each with a
warm-up, `torch.cuda.synchronize` and `reset_peak_memory_stats` / `max_memory_allocated`:

  * peak memory of the ctpa-512 training step (bf16 autocast, gradient checkpointing), reconstruction
    and GAN stage, over `ctpa-vq verify`'s prediction (`training/memory.py`, the same recipe);
  * seconds per step and patches/s: eager (TF32 and cuDNN autotuning on: the recipe's defaults),
    TF32 off, `training.cudnn_benchmark=false`, `training.compile=true` (last: skipped when the budget is short);
  * validation's peak memory at `training.val_batch_size` (fp32 forward with the training state alive),
    over `predict_validation_memory`;
  * a 604x512x512 phantom through the pipeline's default grid: seconds and peak memory by batch size,
    and the scoring's share (region labels + `reconstruction_metrics`, `benchmarks/scoring.py`);
  * `encode_dataset` volumes/s on two such volumes.

The perceptual loss is off (the recipe's `gan.perceptual_weights` is null: no VGG weights on the
machine), in the run and in the prediction alike.

    python benchmarks/gpu_suite.py --out gpu-suite             # CUDA: figures to gpu-suite/gpu_suite.{json,md}
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke     # CPU, tiny preset, small shapes, < 1 minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from accelerate.state import AcceleratorState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import scoring_split, synchronize  # noqa: E402

from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline  # noqa: E402
from ctpa_vq.data.phantom import make_phantom  # noqa: E402
from ctpa_vq.evaluation.scoring import score_volume  # noqa: E402
from ctpa_vq.latents.encode import encode_dataset  # noqa: E402
from ctpa_vq.training.config import TrainConfig, load_config  # noqa: E402
from ctpa_vq.training.loop import step_schedules  # noqa: E402
from ctpa_vq.training.memory import GIB, predict_step_memory, predict_validation_memory, with_knob  # noqa: E402
from ctpa_vq.training.setup import TrainingParts, build_training, configure_backends  # noqa: E402
from ctpa_vq.training.pretrained import generator_config, inference_patch  # noqa: E402
from ctpa_vq.training.steps import model_input, train_micro_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scale:
    """Sizes and repetitions of one mode."""

    recipe: Path | None
    overrides: tuple[str, ...]
    volume: tuple[int, int, int]  # the reconstructed, validated and encoded volume
    batch_sizes: tuple[int, ...]  # of the reconstruction
    max_patch_voxels: int | None  # of the planned grid (None: the pipeline's default)
    mixed_precision: str  # of the training steps: "bf16" on a GPU (the recipe's), "no" for the CPU smoke run
    warmup: int
    steps: int
    compile: bool
    budget_s: float


GPU = Scale(
    recipe=ROOT / "configs" / "ctpa_512.yaml",
    overrides=("dataset.phantoms=3", "dataset.phantom_shape=[136,264,264]", "dataset.num_workers=0"),
    volume=(604, 512, 512), batch_sizes=(1, 2, 4), max_patch_voxels=None, mixed_precision="bf16", warmup=2,
    steps=4, compile=True,
    budget_s=480,
)  # fmt: skip
SMOKE = Scale(
    recipe=None,
    overrides=("training.cpu=true", "model.preset=tiny", "model.gradient_checkpointing=true", "dataset.patch_size=[16,32,32]",
               "dataset.phantoms=3", "dataset.phantom_shape=[24,40,40]", "training.batch_size=1",
               "training.val_batch_size=2", "training.val_max_patch_voxels=32768", "gan.start_step=1000",
               "gan.image_gan_weight=1.0", "gan.volume_gan_weight=0.5", "gan.base_channels=8", "gan.n_layers=2"),
    volume=(32, 48, 48), batch_sizes=(1, 2), max_patch_voxels=32768, mixed_precision="no", warmup=0, steps=1,
    compile=False, budget_s=60,
)  # fmt: skip


class Budget:
    """Wall-clock budget of the run: sections that would not fit are skipped and say so."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


class Peak:
    """Peak allocated (and reserved) CUDA memory of a block; None on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.allocated, self.reserved = device, None, None

    def __enter__(self) -> Peak:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)


def ratio(measured: int | None, predicted: int) -> float | None:
    return None if measured is None else round(measured / predicted, 3)


def build(config: TrainConfig, mixed_precision: str) -> TrainingParts:
    """`build_training` under ``mixed_precision`` (bf16: what `accelerate launch` with the GPU configs sets)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision
    return build_training(config)


def batch_of(parts: TrainingParts) -> torch.Tensor:
    """One loader-style batch of real phantom patches, through `model_input` (int16 HU -> [-1, 1] on the device)."""
    size = parts.config.training.batch_size
    hu = torch.stack([torch.as_tensor(parts.dataset[i]["hu"]) for i in range(size)])
    return model_input(parts, {"hu": hu})


def one_step(parts: TrainingParts, x: torch.Tensor, gan_stage: bool) -> None:
    """One optimizer step as the loop takes it, in the chosen stage."""
    parts.state.step = parts.config.gan.start_step if gan_stage else 0
    train_micro_batch(parts, x, 0)
    step_schedules(parts)
    parts.guard.end_step()


def step_time(parts: TrainingParts, x: torch.Tensor, gan_stage: bool, scale: Scale) -> dict:
    for _ in range(scale.warmup):
        one_step(parts, x, gan_stage)
    device = x.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(scale.steps):
        one_step(parts, x, gan_stage)
    synchronize(device)
    seconds = (time.perf_counter() - start) / scale.steps
    return {"seconds_per_step": round(seconds, 4), "patches_per_s": round(x.shape[0] / seconds, 3)}


def both_stages(parts: TrainingParts, x: torch.Tensor, scale: Scale) -> dict:
    return {stage: step_time(parts, x, stage == "gan_stage", scale) for stage in ("reconstruction_stage", "gan_stage")}


def training_memory(parts: TrainingParts, x: torch.Tensor, config: TrainConfig, mixed_precision: str) -> dict:
    """Measured peak of one step per stage (after a warm-up step) over verify's prediction."""
    figures = {}
    for stage in ("reconstruction_stage", "gan_stage"):
        gan = stage == "gan_stage"
        one_step(parts, x, gan)  # warm-up: optimizer states exist, cuDNN has chosen
        with Peak(x.device) as peak:
            one_step(parts, x, gan)
        predicted = predict_step_memory(config, mixed_precision, gan_stage=gan)
        figures[stage] = {
            "measured_allocated_gib": gib(peak.allocated), "measured_reserved_gib": gib(peak.reserved),
            "predicted_allocated_gib": gib(predicted.traced_peak), "predicted_per_process_gib": gib(predicted.per_process),
            "measured_over_predicted": ratio(peak.allocated, predicted.traced_peak),
        }  # fmt: skip
    return figures


def validation_memory(parts: TrainingParts, hu: np.ndarray, config: TrainConfig) -> dict:
    """`score_volume` as `validate` calls it, with the training state alive, over the prediction."""
    training = config.training
    model = parts.accelerator.unwrap_model(parts.model)
    pipeline = CTPAReconstructionPipeline(vqgan=model)
    pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with Peak(model.device) as peak:
        score_volume(pipeline, hu, "phantom", patch_size=training.val_patch_size, overlap=training.val_overlap,
                     blend=training.val_blend, batch_size=training.val_batch_size,
                     max_patch_voxels=training.val_max_patch_voxels)  # fmt: skip
    seconds = time.perf_counter() - start
    model.train()
    predicted = predict_validation_memory(config, hu.shape, gan_stage=True)
    return {
        "volume": list(hu.shape), "val_batch_size": training.val_batch_size, "seconds": round(seconds, 2),
        "measured_allocated_gib": gib(peak.allocated), "predicted_allocated_gib": gib(predicted.traced_peak),
        "predicted_per_process_gib": gib(predicted.per_process), "measured_over_predicted": ratio(peak.allocated, predicted.traced_peak),
    }  # fmt: skip


def reconstruction(config: TrainConfig, hu: np.ndarray, device: torch.device, scale: Scale) -> tuple[dict, CTPAReconstructionPipeline]:
    """A fresh fp32 model as the recipe would export it (storing its training patch, `inference_patch`), run
    as `ctpa-vq reconstruct` runs it, on the pipeline's default grid, by batch size."""
    torch.manual_seed(0)
    arch = generator_config(config.model)
    channels = arch["vq_embed_dim"]  # unit latent statistics: `encode` needs some
    model = VQGAN3D(**{**arch, "latents_mean": [0.0] * channels, "latents_std": [1.0] * channels,
                       "inference_patch_size": inference_patch(arch["norm_type"], config.dataset.patch_size)})
    pipeline = CTPAReconstructionPipeline(model.to(device))
    pipeline.set_progress_bar_config(disable=True)
    grid = pipeline.patch_grid(hu.shape, max_patch_voxels=scale.max_patch_voxels)
    figures: dict = {"volume": list(hu.shape), "grid": grid.describe(), "by_batch_size": {},
                     "allocated_before_gib": gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None}
    if scale.warmup:  # cuDNN's choices, the allocator's pool
        pipeline(hu, batch_size=1, max_patch_voxels=scale.max_patch_voxels)
    for batch in scale.batch_sizes:
        with Peak(device) as peak:
            start = time.perf_counter()
            pipeline(hu, batch_size=batch, max_patch_voxels=scale.max_patch_voxels)
            synchronize(device)
            seconds = time.perf_counter() - start
        figures["by_batch_size"][str(batch)] = {"seconds": round(seconds, 3), "peak_allocated_gib": gib(peak.allocated)}
    figures["scoring"] = scoring_split(pipeline, hu, scale.batch_sizes[-1], scale.max_patch_voxels)
    return figures, pipeline


def encode(pipeline: CTPAReconstructionPipeline, hu: np.ndarray, work: Path, scale: Scale) -> dict:
    """`encode_dataset` on two NIfTI copies of the volume, with the reconstruction's model."""
    pipeline.save_pretrained(work / "model")
    folder = work / "nifti"
    folder.mkdir()
    affine = np.diag([0.7, 0.7, 1.0, 1.0])  # (x, y, z) of the canonical (D, H, W) = (z, y, x) array
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), folder / f"volume_{name}.nii")
    report = encode_dataset(work / "model", folder, work / "latents", batch_size=scale.batch_sizes[-1],
                            max_patch_voxels=scale.max_patch_voxels, progress=False)  # fmt: skip
    return {"volumes": report.encoded, "volume": list(hu.shape), "volumes_per_s": round(report.volumes_per_second, 4)}


def release() -> None:
    """Free what the caller deleted, on the device too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Suite:
    """The sections in order, sharing the phantom, the training parts and the pipeline. A section
    that fails records its error and the next one runs; the figures are saved after every section."""

    def __init__(self, scale: Scale, work: Path, device_name: str, save: Callable[[dict], None]) -> None:
        self.scale, self.work, self.save, self.budget = scale, work, save, Budget(scale.budget_s)
        overrides = [*scale.overrides, f"training.output_dir={work / 'train'}", "gan.perceptual_weight=0"]
        self.config = config = load_config(scale.recipe, overrides)
        self.result: dict = {
            "device": device_name, "torch": torch.__version__, "preset": config.model.preset,
            "patch": list(config.dataset.patch_size), "batch_size": config.training.batch_size,
            "gradient_checkpointing": config.model.gradient_checkpointing, "mixed_precision": scale.mixed_precision,
            "skipped": {}, "errors": {}, "section_seconds": {},
        }  # fmt: skip
        cpu = config.training.cpu or not torch.cuda.is_available()  # as `build_accelerator` chooses
        self.device = torch.device("cpu" if cpu else "cuda", None if cpu else torch.cuda.current_device())
        self.hu: np.ndarray | None = None
        self.parts: TrainingParts | None = None
        self.x: torch.Tensor | None = None
        self.pipeline: CTPAReconstructionPipeline | None = None

    def run(self) -> dict:
        sections = [("phantom", self.phantom), ("build_training", self.build_training),
                    ("training_memory", self.training_memory), ("step_time", self.step_time),
                    ("validation", self.validation), ("reconstruction", self.reconstruction), ("encode", self.encode),
                    ("compile", self.compile)]  # fmt: skip
        for name, section in sections:
            start = time.perf_counter()
            try:
                section()
            except Exception as error:  # noqa: BLE001 - one failing section must not lose the others' figures
                traceback.print_exc()
                self.result["errors"][name] = f"{type(error).__name__}: {error}"[:1000]
            self.result["section_seconds"][name] = round(time.perf_counter() - start, 1)
            self.result["seconds_left_of_budget"] = round(self.budget.left(), 1)
            self.save(self.result)
        return self.result

    def _training(self) -> tuple[TrainingParts, torch.Tensor]:
        if self.parts is None or self.x is None:
            raise RuntimeError("needs the training parts, which could not be built (see build_training)")
        return self.parts, self.x

    def _drop_training(self) -> None:
        self.parts = self.x = None
        release()

    def phantom(self) -> None:
        self.hu = make_phantom(self.scale.volume, seed=7)

    def build_training(self) -> None:
        self.parts = build(self.config, self.scale.mixed_precision)
        self.x = batch_of(self.parts)

    def training_memory(self) -> None:
        parts, x = self._training()
        self.result["training_memory"] = training_memory(parts, x, self.config, self.scale.mixed_precision)

    def step_time(self) -> None:
        parts, x = self._training()
        device, training = x.device, self.config.training
        timing = self.result["step_time"] = {"eager": both_stages(parts, x, self.scale)}
        try:
            configure_backends(replace(training, tf32=False), device)
            timing["tf32_off"] = both_stages(parts, x, self.scale)
            configure_backends(replace(training, cudnn_benchmark=False), device)
            timing["cudnn_benchmark_off"] = both_stages(parts, x, self.scale)
        finally:
            configure_backends(training, device)

    def validation(self) -> None:
        parts, _ = self._training()
        self.result["validation"] = validation_memory(parts, self.hu, self.config)

    def reconstruction(self) -> None:
        self._drop_training()
        self.result["reconstruction"], self.pipeline = reconstruction(self.config, self.hu, self.device, self.scale)

    def encode(self) -> None:
        if self.pipeline is None:
            raise RuntimeError("needs the reconstruction's pipeline (see reconstruction)")
        try:
            self.result["encode"] = encode(self.pipeline, self.hu, self.work, self.scale)
        finally:
            self.pipeline = None
            release()

    def compile(self) -> None:
        if not self.scale.compile:
            self.result["skipped"]["compile"] = "smoke mode: inductor compiles for minutes on a CPU"
            return
        if self.budget.left() < 150:
            self.result["skipped"]["compile"] = f"{self.budget.left():.0f} s of the budget left; compiling takes minutes"
            return
        compiled = build(with_knob(self.config, training__compile=True), self.scale.mixed_precision)
        x = batch_of(compiled)
        start = time.perf_counter()
        one_step(compiled, x, False)  # compiles the reconstruction stage's graphs
        one_step(compiled, x, True)  # and the GAN stage's
        self.result["compile_seconds"] = round(time.perf_counter() - start, 1)
        self.result["step_time"]["compile"] = both_stages(compiled, x, self.scale)


def markdown(result: dict) -> str:
    """The figures as a Markdown table (figure | value); a failed section's error in its place."""
    rows = [("device", f"{result['device']}, torch {result['torch']}"), ("preset / patch / batch", f"{result['preset']} / "
            f"{'x'.join(map(str, result['patch']))} / {result['batch_size']}, mixed precision "
            f"{result['mixed_precision']}, checkpointing {'on' if result['gradient_checkpointing'] else 'off'}")]  # fmt: skip
    for stage, m in result.get("training_memory", {}).items():
        rows.append((f"training peak, {stage.replace('_', ' ')} (measured / predicted GiB)",
                     f"{m['measured_allocated_gib']} / {m['predicted_allocated_gib']} = {m['measured_over_predicted']}"))
    for variant, stages in result.get("step_time", {}).items():
        for stage, t in stages.items():
            rows.append((f"step, {variant.replace('_', ' ')}, {stage.replace('_', ' ')}",
                         f"{t['seconds_per_step']} s, {t['patches_per_s']} patches/s"))
    if "compile_seconds" in result:
        rows.append(("compile, first step of each stage", f"{result['compile_seconds']} s"))
    if "validation" in result:
        v = result["validation"]
        rows.append((f"validation peak, {'x'.join(map(str, v['volume']))}, val_batch_size {v['val_batch_size']} "
                     "(measured / predicted GiB)", f"{v['measured_allocated_gib']} / {v['predicted_allocated_gib']} = "
                     f"{v['measured_over_predicted']}"))  # fmt: skip
    if "reconstruction" in result:
        r = result["reconstruction"]
        for batch, figures in r["by_batch_size"].items():
            rows.append((f"reconstruction {'x'.join(map(str, r['volume']))}, {r['grid']}, batch {batch}",
                         f"{figures['seconds']} s, peak {figures['peak_allocated_gib']} GiB"))
        s = r["scoring"]
        rows.append(("scoring / reconstruction (labels + metrics)",
                     f"{s['scoring_s']} s / {s['reconstruction_s']} s = {s['scoring_over_reconstruction']}"))
    if "encode" in result:
        e = result["encode"]
        rows.append((f"encode, {'x'.join(map(str, e['volume']))}", f"{e['volumes_per_s']} volumes/s"))
    rows += [(name, f"skipped: {why}") for name, why in result["skipped"].items()]
    rows += [(name, f"error: {why.splitlines()[0]}") for name, why in result["errors"].items()]
    return "| figure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small shapes (the code paths only)")
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md (written after every section)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU check of the code paths")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    scale = SMOKE if args.smoke else GPU
    device_name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        (out / "gpu_suite.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "gpu_suite.md").write_text(markdown(result))

    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        result = Suite(scale, Path(work), device_name, save).run()
    print(markdown(result))
    if result["errors"]:
        sys.exit(f"gpu_suite: {len(result['errors'])} section(s) failed: {', '.join(result['errors'])}")


if __name__ == "__main__":
    main()
