"""Named model sizes. `VQGAN3D.from_preset(name, **overrides)` builds one.

Both use `norm_type="none"` (no normalisation, learned residual scales): with GroupNorm a voxel's
reconstruction followed the statistics of whatever patch it was inferred in (3.7 dB across
inference patches on one validation CT); without, it depends on its receptive field only, and
the training patch is the best inference patch on every volume (larger ones 0.2-0.9 dB lower).
On the validation CTs the trained `tiny` scored 1.6 dB above GroupNorm on seed 0, within the
spread of its own seeds (BENCHMARKS.md, "quality"). `norm_type="group"` restores the GroupNorm
model, and configs saved before the option load as GroupNorm.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # CPU tests and the demo: 4x downsampling, 0.5M parameters, narrow at full resolution
    # (the full-resolution convolutions dominate the cost on a CPU).
    "tiny": dict(
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        downsample_factor=(4, 4, 4),
        latent_channels=8,
        vq_embed_dim=8,
        num_vq_embeddings=256,
        norm_num_groups=4,
        norm_type="none",
    ),
    # The seeds' size for 256x256x128 patches of 512x512x~600 CTPA.
    "ctpa-512": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        downsample_factor=(4, 4, 4),
        latent_channels=8,
        vq_embed_dim=8,
        num_vq_embeddings=16384,
        norm_num_groups=32,
        norm_type="none",
    ),
}
