"""Pieces of the tiny training runs the tests configure."""

# The data section of every tiny training run: small clips, one decoder next to the workers.
TINY_DATA = {"num_frames": 8, "height": 32, "width": 32, "fps": 7.0, "decode_cpus": 0.5, "decoders": 1}

# A small sweep's search space: two LoRA ranks and a learning-rate range.
SEARCH = {"lora.rank": {"choice": [2, 4]}, "optim.lr": {"loguniform": [1.0e-4, 1.0e-1]}}
