"""What a finished run tells its user: the last validation figures, where the model and its
mid-slice picture are, and the commands to try on the model next."""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import TrainConfig
from .loop import TrainResult
from .setup import phantom_dir, prepared_dataset_path


def run_summary(config: TrainConfig, result: TrainResult) -> str:
    """A few lines for the main process to print at the end of `train`."""
    out = Path(config.training.output_dir)
    state = "done" if result.final_dir is not None else "stopped early"
    lines = [f"Training {state}: step {result.step} of {config.training.max_steps}, run folder {out}"]
    figures = result.validation
    if figures is None:
        lines.append("  validation  none in this run (earlier ones are in metrics.csv)")
    else:
        lines.append(
            f"  validation  step {result.step}, whole volume PSNR {figures['val_psnr']:.2f} dB, "
            f"SSIM {figures['val_ssim']:.4f}; body PSNR {figures['val_body_psnr']:.2f} dB, "
            f"SSIM {figures['val_body_ssim']:.4f} (all figures: {out / 'metrics.csv'})"
        )
    model = result.final_dir
    if model is None:
        lines.append(f"  model       none yet: continue with `--resume latest` (checkpoints in {out / 'checkpoints'})")
    else:
        lines.append(f"  model       {model} (a pipeline folder; the one of best validation PSNR is {out / 'best'})")
    if result.mid_slices is not None:
        lines.append(f"  picture     {result.mid_slices} (mid-slices: input | reconstruction | error)")
    if model is None:
        return "\n".join(lines)
    phantoms = sorted(phantom_dir(config).glob("phantom_*.nii*")) if config.dataset.path is None else []
    volume = phantoms[0] if phantoms else Path("YOUR_CT.nii.gz")
    reconstruct = ["ctpa-vq", "reconstruct", "--model", model, "--input", volume,
                   "--output", out / "reconstruction.nii.gz", "--slices", out / "reconstruction.png"]
    evaluate = ["ctpa-vq", "evaluate", "--model", model, "--input", prepared_dataset_path(config),
                "--split", "validation"]
    lines.append("Next, try the model on a volume and score it on the validation split:")
    lines += [f"  {shlex.join(map(str, command))}" for command in (reconstruct, evaluate)]
    return "\n".join(lines)
