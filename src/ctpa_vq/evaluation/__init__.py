"""Reconstruction quality in HU: PSNR/SSIM over the whole volume and the body (`metrics`), the body
mask and HU regions (`regions`), mid-slice pictures (`visualize`), and scoring whole volumes with a
pipeline, shared by `ctpa-vq evaluate` and the training loop's validation (`scoring`)."""
