"""Patch-wise processing of whole volumes: the patch grid (`grid`), blend weights (`blend`), the
streaming stitcher (`stitcher`) and pinned host buffers for GPU transfers (`host_buffers`)."""

from .blend import BLEND_MODES, STITCH_MODES, BlendMode, StitchMode, blend_profile, blend_weights
from .grid import PatchGrid, plan_grid
from .stitcher import PatchFn, PatchStitcher, SupportsUpdate

__all__ = [
    "BLEND_MODES",
    "STITCH_MODES",
    "BlendMode",
    "PatchFn",
    "PatchGrid",
    "PatchStitcher",
    "StitchMode",
    "SupportsUpdate",
    "blend_profile",
    "blend_weights",
    "plan_grid",
]
