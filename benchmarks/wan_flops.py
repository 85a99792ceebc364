"""Model FLOPs of one Wan image-to-video LoRA training step at full size, counted on the meta device.

Per case (model, frames x height x width, batch 1): the transformer's forward and backward with
LoRA on the attention projections (svdray.models.wan.objective.training_loss, so exactly the training
inputs), and the frozen encoders' forwards a step without a latent cache would add: the VAE
encoding the clip, the VAE encoding the condition clip ((image, zeros...) for Wan2.1/A14B, the
image alone for TI2V), UMT5-XXL on 512 tokens and, for Wan2.1, CLIP ViT-H/14. Counted with
torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention, no recompute.
Nothing is allocated, so this runs on any machine in about a minute.

    python benchmarks/wan_flops.py [--rank 32] [--out wan_flops.json]

`step_flops(...)` is the entry point for `benchmarks/train_step.py --family wan`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from svdray.config import config_from_dict
from svdray.models import get_family
from svdray.models.wan import conditioning, objective
from svdray.models.wan import pipeline as wan_pipeline

CASES = [
    ("Wan2.2-TI2V-5B", 121, 704, 1280),
    ("Wan2.2-TI2V-5B", 49, 480, 832),
    ("Wan2.1-I2V-14B", 81, 480, 832),
    ("Wan2.2-I2V-A14B", 81, 480, 832),
]


def _count(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def step_flops(
    model: str, frames: int, height: int, width: int, rank: int = 32, batch: int = 1
) -> dict[str, Any]:
    """FLOPs of one training step of `model` (one of `WanFamily.architectures`), by part: the
    family's full-size models on the meta device, LoRA as training puts it (one A14B expert)."""
    wan_pipeline.check_num_frames(frames, key="frames")
    cfg = config_from_dict(
        {
            "model": {"family": "wan"},
            "data": {"num_frames": frames, "height": height, "width": width},
            "lora": {"rank": rank, "alpha": rank},
            "wan": {"expert": "transformer" if model == "Wan2.2-I2V-A14B" else None},
        },
        check_files=False,
    )
    models = get_family("wan").meta_models(cfg, architecture=model)
    transformer, pipe = models.denoiser, models.frozen.pipe
    vae, text_encoder, clip = pipe.vae, pipe.text_encoder, pipe.image_encoder
    config = transformer.config
    z = config.out_channels
    expand = bool(pipe.config.expand_timesteps)
    spatial = vae.config.scale_factor_spatial
    latent_shape = (batch, z, wan_pipeline.num_latent_frames(frames), height // spatial, width // spatial)

    video = torch.empty(batch, frames, 3, height, width, device="meta")
    with torch.no_grad():
        parts = {
            "vae_video": _count(lambda: conditioning.encode_video(vae, video))[0],
            "vae_condition": _count(lambda: conditioning.condition_latents(vae, video[:, 0], frames, expand))[
                0
            ],
            "umt5": _count(
                lambda: text_encoder(
                    torch.zeros(batch, wan_pipeline.MAX_SEQUENCE_LENGTH, dtype=torch.long, device="meta")
                )
            )[0],
        }
        if clip is not None:
            pixels = torch.empty(batch, 3, 224, 224, device="meta")
            parts["clip"] = _count(lambda: clip(pixel_values=pixels, output_hidden_states=True))[0]
        condition = conditioning.condition_latents(vae, video[:, 0], frames, expand)

    cond = conditioning.WanConditioning(
        prompt_embeds=torch.empty(batch, wan_pipeline.MAX_SEQUENCE_LENGTH, config.text_dim, device="meta"),
        image_embeds=torch.empty(batch, 257, config.image_dim, device="meta") if config.image_dim else None,
        condition=condition,
    )
    x0 = torch.empty(latent_shape, device="meta")
    sigmas = torch.full((batch,), 0.5, device="meta")

    def transformer_step():
        objective.training_loss(transformer, x0, torch.empty_like(x0), sigmas, cond, expand).mean().backward()

    parts["transformer_fwd_bwd"], by_op = _count(transformer_step)
    p_t, p_h, p_w = config.patch_size
    tokens = latent_shape[2] // p_t * latent_shape[3] // p_h * latent_shape[4] // p_w
    encoders = sum(v for k, v in parts.items() if k != "transformer_fwd_bwd")
    return {
        "model": model,
        "frames": frames,
        "height": height,
        "width": width,
        "batch": batch,
        "lora_rank": rank,
        "tokens": tokens,
        "transformer_params": sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        "lora_params": sum(p.numel() for p in transformer.parameters() if p.requires_grad),
        "flops": parts,
        "encoders_total": encoders,
        "total": encoders + parts["transformer_fwd_bwd"],
        "transformer_by_op": by_op,
    }


def _row(r: dict[str, Any]) -> str:
    f = r["flops"]
    t = 1e12
    clip = f"{f['clip'] / t:.2f}" if "clip" in f else "-"
    return (
        f"| {r['model']} | {r['frames']} x {r['height']} x {r['width']} | {r['tokens']} | "
        f"{f['transformer_fwd_bwd'] / t:,.1f} | {f['vae_video'] / t:,.1f} | {f['vae_condition'] / t:,.1f} | "
        f"{f['umt5'] / t:.2f} | {clip} | {r['total'] / t:,.1f} |"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank on the attention projections")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    print(
        "| model | frames x H x W | tokens | transformer fwd+bwd TFLOP | VAE clip | VAE condition | "
        "UMT5 | CLIP | step total |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for case in CASES:
        start = time.perf_counter()
        result = step_flops(*case, rank=args.rank)
        result["count_s"] = time.perf_counter() - start
        results.append(result)
        print(_row(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
