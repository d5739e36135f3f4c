"""A reference 3D SSIM for the loss tests: the full (non-separable) Gaussian kernel, in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim_full_kernel(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of `(B, 1, D, H, W)` volumes over valid window positions, data range 2 ([-1, 1])."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    x, y = x.double(), y.double()
    mx, my = F.conv3d(x, kernel), F.conv3d(y, kernel)
    vx, vy = F.conv3d(x * x, kernel) - mx**2, F.conv3d(y * y, kernel) - my**2
    cxy = F.conv3d(x * y, kernel) - mx * my
    c1, c2 = 0.02**2, 0.06**2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()
