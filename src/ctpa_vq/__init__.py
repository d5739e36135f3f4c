"""ctpa-vq: a 3D VQ-GAN for full-resolution CT pulmonary angiography."""

__version__ = "0.1.0"
