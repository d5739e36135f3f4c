"""Named model sizes. `VQGAN3D.from_preset(name, **overrides)` builds one.

Both use `full_resolution_blocks=False`: the encoder's input conv is its first downsampling and
the decoder ends in a sub-pixel conv, so no ResBlock runs at the input's resolution. On the
held-apart chest CTs this trained 3.1x faster per step than the layout with full-resolution
ResBlocks (1.11x MONAI's VQVAE) and scored 0.6 dB higher (BENCHMARKS.md, "quality").

Both use `norm_type="none"` (no normalisation, learned residual scales): with GroupNorm a voxel's
reconstruction followed the statistics of whatever patch it was inferred in (up to 3.7 dB across
inference patches on one validation CT); without, it depends on its receptive field only, and
the training patch is the best inference patch on 11 of 12 test volume-seed pairs. On the
validation CTs `tiny` scored 3.0 dB above GroupNorm, on every seed (BENCHMARKS.md, "quality").
`norm_type="group"` restores the GroupNorm model, and configs saved before the option load as
GroupNorm.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # CPU tests and the demo: 4x downsampling, 0.5M parameters.
    "tiny": dict(
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        downsample_factor=(4, 4, 4),
        latent_channels=8,
        vq_embed_dim=8,
        num_vq_embeddings=256,
        norm_num_groups=4,
        norm_type="none",
        full_resolution_blocks=False,
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
        full_resolution_blocks=False,
    ),
}
