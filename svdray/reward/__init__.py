"""Stage 2: reward-gradient fine-tuning of LoRA weights, guarded against silent zero rewards."""
