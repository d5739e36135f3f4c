"""Named model sizes. `VQGAN3D.from_preset(name, **overrides)` builds one."""

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
    ),
}
