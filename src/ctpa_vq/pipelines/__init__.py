"""Inference pipelines built on the model and the patch stitcher."""

from __future__ import annotations

from .reconstruction import CTPAReconstructionOutput, CTPAReconstructionPipeline, load_reconstruction_pipeline

__all__ = ["CTPAReconstructionOutput", "CTPAReconstructionPipeline", "load_reconstruction_pipeline"]
