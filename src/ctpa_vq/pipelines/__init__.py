"""Inference pipelines built on the model and the patch stitcher: `CTPAReconstructionPipeline`
(`reconstruction`), and running it at another voxel spacing than a volume's own (`spacing`)."""

from __future__ import annotations

import diffusers

from .reconstruction import CTPAReconstructionOutput, CTPAReconstructionPipeline, load_reconstruction_pipeline

# diffusers resolves a plain `_class_name` in model_index.json only as an attribute of the `diffusers`
# module: registering the class there lets `DiffusionPipeline.from_pretrained(saved_dir)` load a saved
# pipeline once this module is imported, as `from ctpa_vq import CTPAReconstructionPipeline` does (a bare
# `import ctpa_vq` imports nothing heavy); its component, `ctpa_vq.models.vqgan`, resolves from sys.modules.
setattr(diffusers, CTPAReconstructionPipeline.__name__, CTPAReconstructionPipeline)

__all__ = ["CTPAReconstructionOutput", "CTPAReconstructionPipeline", "load_reconstruction_pipeline"]
