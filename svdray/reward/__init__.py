"""Stage 2: reward-gradient fine-tuning of SVD LoRA weights, guarded against silent zero rewards."""
