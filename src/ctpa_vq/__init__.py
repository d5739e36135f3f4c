"""ctpa-vq: a 3D VQ-GAN for full-resolution CT pulmonary angiography."""

from .models import VQGAN3D
from .pipelines import CTPAReconstructionPipeline

__version__ = "0.1.0"

__all__ = ["VQGAN3D", "CTPAReconstructionPipeline"]
