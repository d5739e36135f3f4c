"""Export a trained generator as a reconstruction pipeline folder (`best/`, `final/`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..models import VQGAN3D
from ..pipelines import CTPAReconstructionPipeline
from ..utils.atomic import atomic_folder


def export_model(model: VQGAN3D, target: Path, run_dir: Path) -> None:
    """Save the pipeline (model under `vqgan/`) plus the run's recipe and metrics; replace `target` atomically."""
    with atomic_folder(target) as partial:
        CTPAReconstructionPipeline(vqgan=model).save_pretrained(partial)
        for name in ("config.yaml", "metrics.csv"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, partial / name)
