"""The latent side, for the downstream DDPM: whole volumes to a `datasets` table of latents
(`encode`), and the per-channel latent mean and std stored in the model's config (`stats`)."""
