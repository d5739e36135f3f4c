"""ctpa-vq: a 3D VQ-GAN for full-resolution CT pulmonary angiography.

`from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline` works as ever, but the names are imported
on first use (PEP 562): `import ctpa_vq` alone, as `ctpa-vq --help` does, loads neither torch nor
diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the sub-package that defines it
_LAZY = {"VQGAN3D": ".models", "CTPAReconstructionPipeline": ".pipelines"}

__all__ = ["VQGAN3D", "CTPAReconstructionPipeline"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
