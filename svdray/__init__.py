"""svdray: LoRA fine-tuning of image-to-video diffusion models (SVD, Wan) on Ray, tracked in MLflow."""
