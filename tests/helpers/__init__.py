"""What several test modules share: the small models (models), their single-file checkpoints (ldm_checkpoint), image
comparison (images), diffusers as the reference (reference, hires, prompts), the files users bring (lora,
controlnet, embeddings) and a live `sdrt serve` (server). Test modules import from here, never from each other."""
