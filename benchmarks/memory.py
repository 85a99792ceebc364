"""GPU memory of one SVD-XT LoRA training step, counted without a GPU.

Builds the model on the meta device with the family's `meta_models` (no weights, no download:
the SVD-XT architecture, or the components' configs of a local `model.pretrained` folder), moves
it to fake CPU tensors (`FakeTensorMode`: shapes, dtypes and storages, no data) and runs one
training step there,
`training_loss` + backward + AdamW step, exactly as the loop builds and runs it. It counts:

  - weights: every parameter and buffer of the UNet, VAE and image encoder, by dtype;
  - LoRA: the trainable parameters, their gradients and AdamW's state (after its first step);
  - activations: the tensors autograd saves for backward, as unique storages (views of one
    tensor count once; weights are not counted again), seen by `saved_tensors_hooks`. A
    checkpointed region (`torch.utils.checkpoint.checkpoint`, as diffusers and
    svdray/models/svd/checkpointing.py call it) counts what checkpointing keeps of it (its inputs),
    and its recomputation peak (what it saves when backward reruns it, nested regions likewise)
    is added once, the largest region's: backward reruns one region at a time;
  - encode: the peak of live tensors while the frozen VAE and CLIP encode the batch (no graph,
    `torch.distributed._tools.mem_tracker.MemTracker`).

estimated peak = weights + LoRA + gradients + AdamW state + max(encode, activations). Not counted:
the CUDA context and allocator fragmentation (typically 1-3 GB), the gradient buffers alive
during backward, and DDP's gradient buckets (one more copy of the LoRA gradients). bf16 autocast
is applied as CPU autocast (what fake CPU tensors dispatch to); CUDA autocast keeps the same
matmul/convolution outputs in bf16. Attention is counted as a fused kernel (CPU flash attention,
which saves what CUDA flash / memory-efficient attention save: q, k, v, output, logsumexp).

    python benchmarks/memory.py --config configs/svd_xt_lora.yaml --out m.json
    python benchmarks/memory.py --config configs/svd_xt_lora.yaml --set train.gradient_checkpointing=true
    python benchmarks/memory.py --preset svd-xt --out memory_svd_xt.json
    python benchmarks/memory.py --preset wan --out memory_wan.json   # one rank of the full-size Wan models

`--preset wan` counts Wan's transformers one rank at a time, for a worker count and mesh
(`train.parallel`): see the Wan section below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, when imported as a module

from train_step import ARCHITECTURE, example_batch  # noqa: E402

from svdray.config import Config, apply_overrides, config_from_dict, load_config  # noqa: E402
from svdray.models import family_of  # noqa: E402
from svdray.models.lora import lora_parameters  # noqa: E402
from svdray.models.precision import mixed_precision  # noqa: E402
from svdray.models.svd.loss import encode_batch, training_loss  # noqa: E402
from svdray.models.svd.pipeline import FrozenModels  # noqa: E402
from svdray.models.wan.pipeline import MAX_SEQUENCE_LENGTH, num_latent_frames  # noqa: E402
from svdray.train.optim import build_optimizer  # noqa: E402

GIB = 2**30
CACHED = "cached_latents"

# --------------------------------------------------------------------------------------------
# Counting the tensors saved for backward


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@dataclasses.dataclass
class Region:
    """The tensors saved for backward inside one (checkpointed) region, by storage."""

    parent: Region | None = None
    saved: dict[int, int] = dataclasses.field(default_factory=dict)  # storage key -> bytes
    children: list[Region] = dataclasses.field(default_factory=list)

    def knows(self, key: int) -> bool:
        return key in self.saved or (self.parent is not None and self.parent.knows(key))

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    @property
    def peak_bytes(self) -> int:
        """Its saved tensors plus the largest recomputation of a region inside it."""
        return self.saved_bytes + max((c.peak_bytes for c in self.children), default=0)


class SavedTensorCounter:
    """Counts unique storages saved for backward; checkpointed regions by inputs + recompute peak.

    Inside `counting()`, `torch.utils.checkpoint.checkpoint` is replaced by a function that runs
    the region directly, counting its saved tensors in a child `Region` (what the recomputation
    will hold) and its tensor inputs in the enclosing one (what checkpointing keeps until then).
    Losses and gradients are the same as with checkpointing: it only changes when tensors live.
    """

    def __init__(self, exclude: set[int]):
        self.exclude = exclude  # weights: counted as such, never as activations
        self.root = Region()
        self.current = self.root
        self._alive: list[torch.UntypedStorage] = []  # keeps storage keys unique while counting
        self.modules = ModTracker()  # which module saved what, for the root region's breakdown
        self.by_module: dict[str, int] = defaultdict(int)

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        if key in self.exclude or self.current.knows(key):
            return
        self.current.saved[key] = storage.nbytes()
        self._alive.append(storage)
        if self.current is self.root:
            self.by_module[max(self.modules.parents, key=len)] += storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def checkpoint(self, function, *args, **kwargs):
        for name in ("use_reentrant", "context_fn", "determinism_check", "debug", "preserve_rng_state"):
            kwargs.pop(name, None)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                self.add(value)
        region = Region(parent=self.current)
        self.current.children.append(region)
        self.current = region
        try:
            return function(*args, **kwargs)
        finally:
            self.current = region.parent

    def weights_of(self, module: torch.nn.Module, *args) -> None:
        """A module's parameters, as it runs, are weights: FSDP2 gathers them into storages of
        their own before the forward (and `linear` saves a transposed view of one)."""
        self.exclude.update(storage_key(p) for p in module.parameters(recurse=False))

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedTensorCounter]:
        original = torch.utils.checkpoint.checkpoint
        torch.utils.checkpoint.checkpoint = self.checkpoint
        hook = torch.nn.modules.module.register_module_forward_pre_hook(self.weights_of)
        try:
            with self.modules, torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield self
        finally:
            hook.remove()
            torch.utils.checkpoint.checkpoint = original


# --------------------------------------------------------------------------------------------
# One step, counted


def tensor_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {storage_key(t): t for t in tensors}.values())


def weights_by_dtype(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, int]]:
    """Bytes of each module's frozen parameters and buffers, by dtype (LoRA counted apart)."""
    out: dict[str, dict[str, int]] = {}
    for name, module in modules.items():
        by_dtype: dict[str, int] = defaultdict(int)
        tensors = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
        for t in {storage_key(t): t for t in tensors}.values():
            by_dtype[str(t.dtype).removeprefix("torch.")] += t.untyped_storage().nbytes()
        out[name] = dict(by_dtype)
    return out


def cached_batch(cfg: Config, frozen: FrozenModels, clip_dim: int) -> dict[str, torch.Tensor]:
    """A latent-cache batch (`svdray.data.cache`): latent mean/std, CLIP embedding, clean image."""
    batch = example_batch(cfg, "meta")
    b, t, h, w = cfg.train.batch_size, cfg.data.num_frames, cfg.data.height, cfg.data.width
    factor = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
    latent = torch.empty(b, t, frozen.vae.config.latent_channels, h // factor, w // factor, device="meta")
    del batch["video"]
    return batch | {
        "latent_mean": latent,
        "latent_std": latent,
        "image_embedding": torch.empty(b, 1, clip_dim),
    }


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v, device=device) if v.device.type == "meta" else v for k, v in batch.items()}


class LiveTensors(TorchDispatchMode):
    """The peak of bytes held by tensors that ops create while it is active (inputs made before
    are not counted). A storage counts from the op that creates it until it is freed (a weakref
    callback: torch keeps one Python object per storage for as long as the storage lives)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def encode_peak(frozen: FrozenModels, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    """Peak bytes of the tensors live while the frozen encoders run (no graph: nothing is saved)."""
    strength = torch.full((batch["image"].shape[0],), 0.02, device=device)
    with LiveTensors() as live:
        encoded = encode_batch(frozen, batch, strength, None)
    del encoded
    return live.peak


def count_step(
    frozen: FrozenModels, unet: torch.nn.Module, cfg: Config, cached: bool, device: torch.device
) -> dict[str, Any]:
    """Count one step of prepared models (LoRA, dtypes, checkpointing and speed options applied)
    whose tensors live on `device`: fake CPU tensors for the count, real ones to check it."""
    unet.train()
    modules = {"unet": unet, "vae": frozen.vae, "image_encoder": frozen.image_encoder}
    weights = weights_by_dtype(modules)
    lora = lora_parameters(unet)
    clip_dim = frozen.image_encoder.config.projection_dim
    batch = on_device(cached_batch(cfg, frozen, clip_dim) if cached else example_batch(cfg, "meta"), device)
    optimizer = build_optimizer(lora, cfg.optim, dataclasses.replace(cfg.speed, fused_adamw=False), device)

    exclude = {storage_key(t) for m in modules.values() for t in (*m.parameters(), *m.buffers())}
    counter = SavedTensorCounter(exclude)
    with mixed_precision(cfg.train.mixed_precision, device):
        encode = encode_peak(frozen, batch, device)
        with counter.counting():
            loss = training_loss(unet, frozen, batch, cfg.svd, None)
        loss.backward()
    optimizer.step()
    lora_bytes = tensor_bytes(lora)
    grads = tensor_bytes(p.grad for p in lora if p.grad is not None)
    state = tensor_bytes(
        t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    activations = counter.root.peak_bytes
    weight_bytes = {name: sum(by_dtype.values()) for name, by_dtype in weights.items()}
    peak = sum(weight_bytes.values()) + lora_bytes + grads + state + max(encode, activations)
    return {
        "weights_bytes": weights,
        "unet_weights_gib": weight_bytes["unet"] / GIB,
        "encoder_weights_gib": (weight_bytes["vae"] + weight_bytes["image_encoder"]) / GIB,
        "lora_params": sum(p.numel() for p in lora),
        "lora_bytes": lora_bytes,
        "lora_grad_bytes": grads,
        "adamw_state_bytes": state,
        "saved_bytes": counter.root.saved_bytes,
        "recompute_peak_bytes": activations - counter.root.saved_bytes,
        "checkpointed_regions": count_regions(counter.root),
        # Where the saved (not recomputed) bytes come from: the innermost module saving them.
        "saved_by_module": dict(sorted(counter.by_module.items(), key=lambda kv: -kv[1])[:15]),
        "activations_gib": activations / GIB,
        "encode_peak_gib": encode / GIB,
        "estimated_peak_gib": peak / GIB,
    }


def count_regions(region: Region) -> int:
    return sum(1 + count_regions(child) for child in region.children)


def count_config(cfg: Config, cached: bool = False, architecture: str | None = None) -> dict[str, Any]:
    """Count one step of `cfg` on fake CPU tensors: no memory, no data, exact shapes and dtypes.
    The models are the family's `meta_models` (of `model.pretrained`'s configs, or the named
    full-size `architecture`): built as `build_models` builds them."""
    models = family_of(cfg).meta_models(cfg, architecture)
    frozen, unet = models.frozen, models.denoiser
    cpu = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in (unet, frozen.vae, frozen.image_encoder):
            module.to_empty(device=cpu)
        return count_step(frozen, unet, cfg, cached, cpu)


# --------------------------------------------------------------------------------------------
# Cases


# Each memory option with its "on" and "off" value; the preset counts every case with all on,
# then each one off in turn. cached_latents is a case property, not a config key.
OPTIONS = {
    "train.gradient_checkpointing": ("full", True, False),
    "model.denoiser_dtype": ("bfloat16", "float32"),
    "train.mixed_precision": ("bf16", "no"),
    "model.frozen_dtype": ("bfloat16", "float32"),
}
PRESETS = {
    "svd-xt": dict(
        shapes=["25x576x1024", "14x576x1024", "25x320x512", "14x320x512"],
        ranks=[64, 16],
        base=[f"{key}={values[0]}" for key, values in OPTIONS.items()],
    )
}


def option_variants(base: Config) -> list[tuple[str, list[str]]]:
    """(label, overrides): each option switched to its other values; cached latents."""
    out = [("as given", [])]
    tree = base.to_dict()
    for key, values in OPTIONS.items():
        section, name = key.split(".")
        for value in values:
            if value == tree[section][name]:
                continue
            overrides = [f"{key}={json.dumps(value)}"]
            if key == "train.mixed_precision" and value == "no":
                overrides.append('model.denoiser_dtype="float32"')  # bf16 weights need bf16 autocast
            out.append((f"{key}={value}", overrides))
    out.append((CACHED, []))
    return out


def preset_configs(name: str, template: Config) -> list[Config]:
    preset = PRESETS[name]
    out = []
    for shape in preset["shapes"]:
        frames, height, width = (int(x) for x in shape.split("x"))
        for rank in preset["ranks"]:
            overrides = [f"data.num_frames={frames}", f"data.height={height}", f"data.width={width}"]
            out.append(
                with_overrides(
                    template, [*overrides, f"lora.rank={rank}", f"lora.alpha={rank}", *preset["base"]]
                )
            )
    return out


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides), check_files=False)


def settings(cfg: Config, cached: bool) -> dict[str, Any]:
    return {
        "frames": cfg.data.num_frames,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "batch": cfg.train.batch_size,
        "rank": cfg.lora.rank,
        "lora.blocks": cfg.lora.blocks,
        **{key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in OPTIONS},
        CACHED: cached,
    }


def architecture(cfg: Config) -> tuple[str | None, str]:
    """A local pipeline folder gives its components' configs; anything else (a hub id) counts the
    SVD-XT architecture the family builds (no weights, nothing downloaded). (name, label)."""
    local = Path(cfg.model.pretrained).expanduser()
    if (local / "unet" / "config.json").is_file():
        return None, str(local)
    return ARCHITECTURE, f"{ARCHITECTURE} (built-in configs)"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    template = load_config(args.config, args.set, check_files=False) if args.config else Config()
    template = with_overrides(template, ["train.grad_accum=1"])  # memory of one micro-batch
    cases: list[tuple[Config, str, bool]] = []
    if args.config:
        for label, overrides in option_variants(template):
            cases.append((with_overrides(template, overrides), label, label == CACHED))
    if args.preset:
        # Every shape and rank with all options on, then each option flipped on the first (the
        # headline case): the shape and rank do not change which option saves what.
        configs = preset_configs(args.preset, template)
        cases += [(cfg, "all on", False) for cfg in configs]
        for label, overrides in option_variants(configs[0])[1:]:
            cases.append((with_overrides(configs[0], overrides), label, label == CACHED))
    rows = []
    name, label = architecture(template)
    for cfg, variant, cached in cases:
        started = time.perf_counter()
        row = {"variant": variant, "settings": settings(cfg, cached), "architecture": label}
        row.update(count_config(cfg, cached, name))
        row["count_s"] = time.perf_counter() - started
        rows.append(row)
        print_row(row, header=len(rows) == 1)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


COLUMNS = [  # title, width, how to show a row
    ("case", 22, lambda r: "{frames}x{height}x{width} b{batch} r{rank}".format(**r["settings"])),
    ("variant", 38, lambda r: r["variant"]),
    ("UNet w", 7, lambda r: f"{r['unet_weights_gib']:.2f}"),
    ("enc w", 6, lambda r: f"{r['encoder_weights_gib']:.2f}"),
    (
        "LoRA+grad+Adam",
        15,
        lambda r: f"{(r['lora_bytes'] + r['lora_grad_bytes'] + r['adamw_state_bytes']) / GIB:.2f}",
    ),
    ("encode", 7, lambda r: f"{r['encode_peak_gib']:.2f}"),
    ("activations", 12, lambda r: f"{r['activations_gib']:.2f}"),
    ("peak GiB", 8, lambda r: f"{r['estimated_peak_gib']:.2f}"),
]


def print_row(row: dict[str, Any], header: bool = False) -> None:
    if header:
        print("  ".join(f"{title:<{width}}" for title, width, _ in COLUMNS))
    print("  ".join(f"{show(row):<{width}}" for _, width, show in COLUMNS), flush=True)


# --------------------------------------------------------------------------------------------
# Wan: one rank of a run spread over workers (`train.parallel`)
#
# The transformer is built on the meta device (the full-size architectures, no weights) and
# prepared as training prepares it (`WanFamily.prepare_transformer`: LoRA, an fp8 base, every
# block checkpointed); one step from the latent cache runs on fake tensors, whole. One rank holds:
#
#   weights    its shard of every frozen parameter (FSDP2 splits dim 0 into equal chunks, padded),
#              the whole of them under DDP; buffers whole
#   gathered   FSDP2's unsharded parameters: the root's (embedders, head; kept gathered from the
#              first forward to the end of backward) plus two blocks, the one running and the
#              next one prefetched; and one block's LoRA gradients before their reduce-scatter,
#              twice (the block's and the one in flight)
#   LoRA       its shard of the LoRA, of their float32 gradients and of AdamW's two moments
#   activations  the tensors saved for backward: each checkpointed block's inputs plus the
#              largest recomputation (as for SVD above), the same on every rank
#   dequant    an fp8 base's one layer dequantised to bf16 at a time
#   batch      the cached batch on the device (latent mean and std, prompt and image embeddings,
#              image condition; float32): the encoders stay off the GPU (`release_encoders`)
#
# estimated peak = the sum. Not counted: the CUDA context and allocator fragmentation (1-3 GB),
# NCCL's buffers, attention's workspace, transient tensors inside one op.
#
# Context parallelism (`train.context_parallel: N`, the workers in groups of N splitting each
# clip's tokens; FSDP2 still shards the weights over all workers): a rank's blocks see 1/N of
# the tokens, and Ulysses' attention holds all the tokens of 1/N of the heads, the same bytes, so
# the activations are those of the step on a clip with 1/N of the tokens, which is what is
# counted: the latent split along its height (or width) into N bands (the same per-token tensors
# in every block; the text and image tokens the cross-attention reads are whole on every rank in
# both). Each rank still holds the whole cached batch. Not counted under it: the prediction
# gathered after `proj_out` and the loss on it (the clip's latent size in float32, a few MB), the
# all-to-all buffers (one attention input at a time).

WAN_TARGETS_NOTE = (
    "targets: issue 21 (a 24 GB card with its CUDA context: 22 GiB; a 40 GB card); "
    "issue 22 (context parallel: 16 GiB on 4 GPUs at 480p, 22 GiB on 8 at 720p)"
)


@dataclasses.dataclass(frozen=True)
class Spread:
    """How the transformer is spread: `workers` in all, `shard` of them holding one copy between
    them (ddp: 1; fsdp: all of them; hsdp: the workers of one node), `context` of them splitting
    each clip (`train.context_parallel`)."""

    parallel: str
    workers: int
    shard: int
    context: int = 1

    @property
    def label(self) -> str:
        if self.workers == 1:
            return "1 GPU"
        split = f" cp{self.context}" if self.context > 1 else ""
        if self.parallel == "hsdp":
            return f"hsdp {self.workers // self.shard}x{self.shard}{split}"
        return f"{self.parallel} {self.workers}{split}"


@dataclasses.dataclass(frozen=True)
class WanCase:
    model: str  # a key of svdray.models.wan.pipeline.FULL_SIZE_TRANSFORMERS
    frames: int
    height: int
    width: int
    spread: Spread
    denoiser_dtype: str = "bfloat16"
    offload: bool = False  # train.offload_activations
    target_gib: float | None = None  # the target for this case, if it sets one
    rank: int = 32


def _spread(parallel: str, workers: int, per_node: int | None = None, context: int = 1) -> Spread:
    shard = {"ddp": 1, "fsdp": workers, "hsdp": per_node or workers}[parallel]
    return Spread(parallel, workers, shard if workers > 1 else 1, context)


I2V_14B, A14B, TI2V_5B = "Wan2.1-I2V-14B", "Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B"
WAN_PRESET = [  # the three targets, each also without the option that meets it
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4), target_gib=22),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4), offload=True, target_gib=22),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 8), offload=True),
    WanCase(I2V_14B, 81, 480, 832, _spread("hsdp", 16, per_node=8), offload=True),
    WanCase(I2V_14B, 81, 480, 832, _spread("ddp", 1), "float8", target_gib=40),
    WanCase(I2V_14B, 81, 480, 832, _spread("ddp", 1), "float8", offload=True, target_gib=40),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4), "float8", offload=True),
    WanCase(A14B, 81, 480, 832, _spread("fsdp", 4), offload=True),
    WanCase(A14B, 81, 480, 832, _spread("ddp", 1), "float8", offload=True),
    WanCase(TI2V_5B, 121, 704, 1280, _spread("ddp", 1), target_gib=40),
    WanCase(TI2V_5B, 121, 704, 1280, _spread("fsdp", 4)),
    # issue 22: a clip split over a context-parallel group (configs/wan_i2v_14b_cp*.yaml)
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4, context=2), target_gib=16),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4, context=4), target_gib=16),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4, context=2), offload=True, target_gib=16),
    WanCase(I2V_14B, 81, 480, 832, _spread("fsdp", 4, context=4), offload=True, target_gib=16),
    WanCase(I2V_14B, 81, 720, 1280, _spread("fsdp", 8)),
    WanCase(I2V_14B, 81, 720, 1280, _spread("fsdp", 8, context=4), target_gib=22),
    WanCase(I2V_14B, 81, 720, 1280, _spread("fsdp", 8, context=8), target_gib=22),
]


def wan_case_config(case: WanCase) -> Config:
    """The run config of a case: LoRA on attention and FFN, latent cache, bf16 autocast, every
    block checkpointed (what `configs/wan_*_fsdp.yaml` set)."""
    layout = {"Wan2.2-TI2V-5B": "ti2v", "Wan2.2-I2V-A14B": "a14b"}.get(case.model, "i2v")
    tree = {
        "model": {
            "family": "wan",
            "pretrained": case.model,
            "denoiser_dtype": case.denoiser_dtype,
            "frozen_dtype": "bfloat16",
        },
        "data": {"num_frames": case.frames, "height": case.height, "width": case.width, "cache": True},
        "lora": {"rank": case.rank, "alpha": case.rank, "feed_forward": True},
        "train": {
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "num_workers": case.spread.workers,
            "parallel": case.spread.parallel if case.spread.workers > 1 else "ddp",
            "context_parallel": case.spread.context,
            "offload_activations": case.offload,
        },
        "wan": {"expert": "transformer" if layout == "a14b" else None},
    }
    return config_from_dict(tree, check_files=False)


def full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def per_rank_bytes(tensors: Iterable[torch.Tensor], shard: int) -> int:
    """What one worker stores of tensors FSDP2 shards over `shard` workers: equal chunks of each
    one's rows (torch.chunk's ceil(rows / shard)), padded. Of a real run's shards (DTensors):
    the storages their local parts live in, each once (FSDP2 keeps a group's gradient shards in
    one buffer)."""
    from torch.distributed.tensor import DTensor

    tensors = list(tensors)
    total = tensor_bytes(t.to_local() for t in tensors if isinstance(t, DTensor))
    for t in tensors:
        if isinstance(t, DTensor):
            continue
        rows = t.shape[0] if t.dim() else 0
        whole = shard == 1 or rows == 0
        total += full_bytes(t) if whole else math.ceil(rows / shard) * (full_bytes(t) // rows)
    return total


def wan_cached_batch(
    transformer: torch.nn.Module,
    frames: int,
    height: int,
    width: int,
    device: torch.device,
    image_tokens: int = 257,
) -> dict[str, torch.Tensor]:
    """A latent-cache batch of one clip (`svdray.models.wan.cache`: float32), shaped for the
    transformer's layout: Wan's VAEs compress 4x in time and 8x in space (16x for the 48-channel
    VAE of TI2V-5B); the image condition is 4 mask channels and the latent of (image, zeros...),
    or the image's latent alone (TI2V); CLIP's 257 tokens for Wan2.1."""
    config = transformer.config
    z = config.out_channels
    expand = config.in_channels == z  # TI2V: the latent alone goes in
    spatial = 16 if z == 48 else 8
    latent = (1, z, num_latent_frames(frames), height // spatial, width // spatial)
    condition = (1, z, 1, *latent[-2:]) if expand else (1, 4 + z, *latent[2:])
    batch = {
        "latent_mean": torch.zeros(latent, device=device),
        "latent_std": torch.ones(latent, device=device),
        "prompt_embeds": torch.zeros(1, MAX_SEQUENCE_LENGTH, config.text_dim, device=device),
        "condition": torch.zeros(condition, device=device),
        "image": torch.zeros(1, 3, height, width, dtype=torch.uint8, device=device),
    }
    if config.image_dim:
        batch["image_embeds"] = torch.zeros(1, image_tokens, config.image_dim, device=device)
    return batch


@dataclasses.dataclass
class WanStep:
    """One counted step of a Wan transformer, everything a rank's count reads: the model (its
    parameters, gradients and buffers, whole or a real run's shards), the optimizer's state,
    the blocks, the saved tensors and the batch."""

    transformer: torch.nn.Module
    blocks: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    counter: SavedTensorCounter
    batch: dict[str, torch.Tensor]


def run_wan_step(
    transformer: torch.nn.Module,
    blocks: list[torch.nn.Module],
    frozen: Any,
    cfg: Config,
    batch: dict[str, torch.Tensor],
    device: torch.device,
) -> WanStep:
    """One training step of a transformer prepared as training prepares it (whole on fake
    tensors, or sharded in a real FSDP2 run): `training_loss` on the cached batch, backward under
    the run's autocast, one AdamW step; the tensors saved for backward counted."""
    from svdray.models.wan.loss import training_loss as wan_training_loss

    transformer.train()
    optimizer = build_optimizer(
        lora_parameters(transformer), cfg.optim, dataclasses.replace(cfg.speed, fused_adamw=False), device
    )
    counter = SavedTensorCounter(
        {storage_key(t) for t in (*transformer.parameters(), *transformer.buffers())}
    )
    with mixed_precision(cfg.train.mixed_precision, device), counter.counting():
        loss = wan_training_loss(transformer, frozen, batch, cfg.wan, None)
    with mixed_precision(cfg.train.mixed_precision, device):
        loss.backward()
    optimizer.step()
    return WanStep(transformer, blocks, optimizer, counter, batch)


def rank_count(step: WanStep, shard: int, offload: bool = False) -> dict[str, Any]:
    """One rank's bytes (see above) when `shard` workers hold one copy of the model between them
    (a real FSDP2 run's tensors are its own shards already); `offload`: the forward's saved
    tensors wait in host memory (`train.offload_activations`), so the device holds one block's
    recomputation and the one saved tensor backward is copying back."""
    from svdray.models.float8 import Float8Linear

    transformer, blocks, counter = step.transformer, step.blocks, step.counter
    lora = lora_parameters(transformer)
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = sum(full_bytes(p) for p in transformer.parameters() if id(p) not in in_blocks)
    block = max(sum(full_bytes(p) for p in b.parameters()) for b in blocks)
    block_lora = max(sum(full_bytes(p) for p in b.parameters() if p.requires_grad) for b in blocks)
    state = [t for s in step.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    by_dtype = {
        str(dtype).removeprefix("torch."): per_rank_bytes((p for p in frozen if p.dtype == dtype), shard)
        for dtype in {p.dtype for p in frozen}
    }
    saved = counter.root.saved_bytes
    recompute = counter.root.peak_bytes - saved
    largest_saved = max(counter.root.saved.values(), default=0)
    terms = {
        "weights": sum(by_dtype.values()),
        "buffers": tensor_bytes(transformer.buffers()),
        "gathered": root + 2 * block + 2 * block_lora if shard > 1 else 0,
        "lora": per_rank_bytes(lora, shard),
        "lora_grads": per_rank_bytes((p.grad for p in lora if p.grad is not None), shard),
        "adamw": per_rank_bytes(state, shard),
        "activations": recompute + largest_saved if offload else saved + recompute,
        "dequant": max(
            (m.weight.numel() * 2 for m in transformer.modules() if isinstance(m, Float8Linear)), default=0
        ),
        "batch": tensor_bytes(step.batch.values()),
    }
    return {
        "terms": terms,
        "weights_by_dtype": dict(by_dtype),
        "root_bytes": root,
        "block_bytes": block,
        "block_lora_bytes": block_lora,
        "saved_bytes": saved,
        "recompute_peak_bytes": recompute,
        "host_bytes": saved if offload else 0,
        "checkpointed_regions": count_regions(counter.root),
        "lora_params": sum(p.numel() for p in lora),
        "estimated_peak_gib": sum(terms.values()) / GIB,
    }


def count_wan_cases(cases: list[WanCase]) -> Iterator[dict[str, Any]]:
    """Count `cases` on fake tensors, the full-size models built on the meta device by the family
    (`meta_models`: as `build_models` builds them); one counted step serves every case of the same
    model, shape, base dtype and rank (how the model is spread and offloading change only the
    per-rank arithmetic)."""
    steps: dict[tuple, WanStep] = {}
    for case in cases:
        started = time.perf_counter()
        cfg = wan_case_config(case)
        height, width = context_share(case.height, case.width, case.spread.context)
        key = (case.model, case.frames, height, width, case.denoiser_dtype, case.rank)
        if key not in steps:
            data = dataclasses.replace(cfg.data, height=height, width=width)
            train = dataclasses.replace(cfg.train, context_parallel=1)  # counted as one rank's share
            steps[key] = fake_wan_step(dataclasses.replace(cfg, data=data, train=train), case.model)
        step = steps[key]
        counted = rank_count(step, case.spread.shard, case.offload)
        if case.spread.context > 1:  # every rank of the group holds the whole cached batch
            whole = wan_cached_batch(
                step.transformer, case.frames, case.height, case.width, torch.device("meta")
            )
            counted["terms"]["batch"] = tensor_bytes(whole.values())
            counted["estimated_peak_gib"] = sum(counted["terms"].values()) / GIB
        p_t, p_h, p_w = step.transformer.config.patch_size
        latent = num_latent_frames(case.frames), case.height // 8, case.width // 8
        if step.transformer.config.out_channels == 48:  # TI2V-5B's VAE: 16x in space
            latent = latent[0], latent[1] // 2, latent[2] // 2
        yield {
            "model": case.model,
            "shape": f"{case.frames}x{case.height}x{case.width}",
            "tokens": latent[0] // p_t * (latent[1] // p_h) * (latent[2] // p_w),
            "tokens_per_rank": latent[0]
            // p_t
            * (latent[1] // p_h)
            * (latent[2] // p_w)
            // case.spread.context,
            "spread": case.spread.label,
            "context_parallel": case.spread.context,
            "denoiser_dtype": case.denoiser_dtype,
            "offload_activations": case.offload,
            "lora_rank": case.rank,
            "target_gib": case.target_gib,
            **counted,
            "verdict": verdict(counted, case.target_gib),
            "count_s": time.perf_counter() - started,
        }


def context_share(height: int, width: int, context: int) -> tuple[int, int]:
    """The pixel size whose clip has 1/`context` of the tokens of height x width: the height (or
    the width) cut into `context` bands of whole 16-pixel token rows (Wan2.1's 8x VAE x 2x2
    patches). Raises if neither side splits evenly (the run's check would refuse it too)."""
    rows, columns = height // 16, width // 16
    if rows % context == 0:
        return height // context, width
    if columns % context == 0:
        return height, width // context
    raise ValueError(f"{height}x{width}: neither side splits into {context} bands of whole tokens")


def fake_wan_step(cfg: Config, architecture: str | None = None) -> WanStep:
    """One cached step of `cfg`'s Wan model (the named full-size `architecture`, or the configs of
    `model.pretrained`), whole, on fake CPU tensors."""
    family = family_of(cfg)
    models = family.meta_models(cfg, architecture)
    cpu = torch.device("cpu")
    transformer = models.denoiser
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer.to_empty(device=cpu)
        # The encoders stay on the meta device (the cache holds what they compute); the empty
        # prompt they encoded is what prompt dropout puts in.
        frozen = dataclasses.replace(
            models.frozen, empty_prompt=torch.empty_like(models.frozen.empty_prompt, device=cpu)
        )
        batch = wan_cached_batch(transformer, cfg.data.num_frames, cfg.data.height, cfg.data.width, cpu)
        return run_wan_step(transformer, family.blocks(transformer), frozen, cfg, batch, cpu)


def verdict(counted: dict[str, Any], target_gib: float | None) -> str:
    """Whether the count meets the target; if not, by how much and the term that stops it (the
    largest, which alone exceeds what the others leave)."""
    if target_gib is None:
        return ""
    peak = counted["estimated_peak_gib"]
    if peak <= target_gib:
        return f"meets {target_gib:g} GiB ({target_gib - peak:.1f} to spare)"
    term, size = max(counted["terms"].items(), key=lambda kv: kv[1])
    return f"over {target_gib:g} GiB by {peak - target_gib:.1f}: {term} ({size / GIB:.1f} GiB) stops it"


WAN_COLUMNS = [  # title, width, how to show a row
    ("model", 16, lambda r: r["model"]),
    ("frames x H x W", 15, lambda r: r["shape"]),
    ("spread", 11, lambda r: r["spread"]),
    ("base", 9, lambda r: r["denoiser_dtype"]),
    ("offload", 8, lambda r: "yes" if r["offload_activations"] else "no"),
    *[
        (title, width, lambda r, key=key: f"{r['terms'][key] / GIB:.2f}")
        for title, width, key in (
            ("weights", 8, "weights"),
            ("gathered", 9, "gathered"),
            ("LoRA", 5, "lora"),
            ("grads", 6, "lora_grads"),
            ("AdamW", 6, "adamw"),
            ("activ.", 7, "activations"),
            ("dequant", 8, "dequant"),
            ("batch", 6, "batch"),
        )
    ],
    ("peak GiB", 9, lambda r: f"{r['estimated_peak_gib']:.2f}"),
    ("target", 40, lambda r: r["verdict"]),
]


def print_wan_row(row: dict[str, Any], header: bool = False) -> None:
    if header:
        print("  ".join(f"{title:<{width}}" for title, width, _ in WAN_COLUMNS))
    print("  ".join(f"{show(row):<{width}}" for _, width, show in WAN_COLUMNS), flush=True)


def run_wan(out: str | None) -> list[dict[str, Any]]:
    """`--preset wan`: every case of WAN_PRESET, one row each: one rank's GiB."""
    rows = []
    for row in count_wan_cases(WAN_PRESET):
        rows.append(row)
        print_wan_row(row, header=len(rows) == 1)
        if out:
            Path(out).write_text(json.dumps(rows, indent=1))
    print(f"GiB per rank; {WAN_TARGETS_NOTE}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", help="a run config: its shape, LoRA and memory options, then each option flipped"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    parser.add_argument(
        "--preset",
        choices=[*sorted(PRESETS), "wan"],
        help="the full matrix (see PRESETS); wan: one rank of the full-size Wan models (WAN_PRESET)",
    )
    parser.add_argument("--out", help="write one JSON row per case here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.config and not args.preset:
        raise SystemExit("give --config PATH and/or --preset svd-xt | wan")
    if args.preset == "wan":
        if args.config:
            raise SystemExit("--preset wan counts its own cases; --config is SVD's")
        run_wan(args.out)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
