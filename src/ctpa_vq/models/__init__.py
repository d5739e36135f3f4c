"""The VQ-GAN generator and its building blocks."""

from .presets import PRESETS
from .quantizer import EMAVectorQuantizer, FiniteScalarQuantizer, QuantizerOutput
from .vqgan import VQGAN3D, VQGAN3DOutput

__all__ = [
    "PRESETS",
    "EMAVectorQuantizer",
    "FiniteScalarQuantizer",
    "QuantizerOutput",
    "VQGAN3D",
    "VQGAN3DOutput",
]
