"""The VQ-GAN generator and its building blocks, and its input contract: the HU window
(`intensity`) and the record of its training data (`input_spec`)."""

from .discriminators import PatchDiscriminator
from .presets import PRESETS
from .quantizer import EMAVectorQuantizer, FiniteScalarQuantizer, QuantizerOutput
from .vqgan import VQGAN3D, VQGAN3DOutput

__all__ = [
    "PRESETS",
    "PatchDiscriminator",
    "EMAVectorQuantizer",
    "FiniteScalarQuantizer",
    "QuantizerOutput",
    "VQGAN3D",
    "VQGAN3DOutput",
]
