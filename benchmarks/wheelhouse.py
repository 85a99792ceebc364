"""What travels to the GPU machine with benchmarks/gpu.sh: the wheels of what the step imports
that the machine's image lacks (`make wheelhouse` downloads them, pinned to this venv's versions).

The image (issue 24) has Python 3.12 with torch, transformers, peft, accelerate, safetensors and
pyarrow, and installs nothing; what those need (numpy, pyyaml, psutil, ...) is there too (`IMAGE`).
The step takes torch from it. transformers, peft and accelerate travel at the versions tested here
(a different transformers changes the models' code), and with them what that transformers checks
when it is imported (safetensors >= 0.8, huggingface_hub, tokenizers). Never Ray, MLflow or decord:
the step imports none of them.

    python benchmarks/wheelhouse.py      # name==version of each wheel, as `make wheelhouse` asks pip
"""

from __future__ import annotations

import sys
from importlib import metadata

# On the image with their own requirements (huggingface_hub aside: the wheelhouse's is used).
IMAGE = ("torch", "accelerate", "safetensors", "pyarrow")

# What the step imports beyond IMAGE, and IMAGE's packages at the versions it needs
# (tests/integration/test_gpu_bench.py runs it with nothing else).
WHEELS = (
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "tokenizers",  # transformers' pinned fast tokenizers
    "httpx2",  # huggingface_hub's HTTP client, and what it needs:
    "httpcore2",
    "h11",
    "anyio",
    "idna",
    "truststore",
    "requests",  # diffusers', and what it needs:
    "urllib3",
    "certifi",
    "charset-normalizer",
    "tqdm",  # progress bars of transformers, diffusers and huggingface_hub
    "regex",  # transformers' and diffusers' tokenizers
    "pillow",  # CLIPImageProcessorPil: the image encoders' preprocessing
    "ftfy",  # WanImageToVideoPipeline's prompt cleaning, and what it needs:
    "wcwidth",
)


def pins(names: tuple[str, ...] = WHEELS) -> list[str]:
    """`name==version` of each distribution as installed here."""
    return [f"{name}=={metadata.version(name)}" for name in names]


if __name__ == "__main__":
    print("\n".join(pins()))
    sys.exit(0)
