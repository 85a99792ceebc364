"""How the denoiser is spread over the workers (`train.parallel`): the one place that knows.

    ddp   every worker holds the whole denoiser and the LoRA gradients are all-reduced (torch's
          DistributedDataParallel, as Ray Train's `prepare_model` wraps it; one worker runs bare)
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): each of the family's blocks (Wan's
          transformer blocks, SVD's spatio-temporal transformers and res-blocks), then the rest
          of the denoiser, is split over all workers along dim 0 - frozen base and LoRA alike -
          and gathered for that block's forward and backward only; the LoRA gradients are
          reduce-scattered, so each worker holds 1/N of the weights, the gradients and AdamW
          state
    hsdp  FSDP2 on a 2-D mesh: sharded within each node, replicated across nodes (the replicas'
          gradients all-reduced), so the per-block gathers stay on a node's own links

and, with any of them, context parallelism (`train.context_parallel: N`): the workers form a 2-D
mesh, data parallel x context parallel, N consecutive ranks per context-parallel group. A group
trains on one clip, each worker on 1/N of its tokens: diffusers' own context parallelism
(`enable_parallelism` with a `ContextParallelConfig` on that mesh, the transformer's `_cp_plan`):
the tokens and RoPE tables are split before the first block, each attention exchanges heads
(Ulysses, an all-to-all) or passes keys and values around the group (ring), and the output is
gathered after `proj_out`, so the loss is the whole clip's on every worker of the group.

The loop calls `parallelize` once, right after the family built its models (LoRA injected,
frozen weights in their dtype, gradient checkpointing on) and before the optimizer exists, then
goes through the returned `Parallel` for everything that depends on the choice: the module the
forward runs through, gradient sync across accumulated micro-batches, the gradient norm, the
full LoRA (exports and the checkpoint's `lora/`) and the optimizer state of a checkpoint.

Choices, and why:
- The mesh is built here, explicitly, on the device type the workers train on (a CPU mesh with
  gloo in the tests: a default mesh on a GPU host moved parameters to CUDA, torch issue 132471).
  HSDP groups the workers by the Ray node they run on, gathered from every worker, rather than by
  Ray Train's node rank, which is keyed by IP address (the simulated nodes of a one-machine test
  cluster share one).
- Precision: `MixedPrecisionPolicy(param_dtype=None, reduce_dtype=float32,
  cast_forward_inputs=False)`. Compute precision stays where it is under DDP, in the loop's bf16
  autocast (`train.mixed_precision`), so FSDP and DDP compute the same step: gathering in a
  `param_dtype` would round what the family keeps in float32 on purpose (Wan's norms, time
  embedder and modulation table), gather the fp8 base as bf16 (twice the bytes), and casting
  forward inputs would put Wan's float32 residual stream and timesteps into bf16. The frozen base
  (bf16 or fp8) and the float32 LoRA share one group (torch requires one dtype among trainable
  parameters only), the LoRA gradients are reduced in float32.
- Every block but the last reshards after its forward; the last and the root stay gathered for
  the backward that starts right after. Activation checkpointing is the family's own (each
  block's forward recomputed in backward, inside the block's gather).
- The LoRA starts as rank 0's on every worker, as DDP makes it: it is broadcast before sharding
  (each worker seeds its own initialisation; `fully_shard` broadcasts nothing).
- DDP leaves the frozen weights and buffers out of its start-up broadcast: they are loaded from
  the same files on every worker, the broadcast of a 14B base would take minutes, and gloo cannot
  send float8.
- Context parallelism is enabled before `fully_shard` (as NVIDIA NeMo AutoModel composes them):
  diffusers' hooks wrap the modules' forwards, FSDP2's wrap them again. The weights are spread
  over every worker (FSDP2's mesh is the whole group; the two axes only decide which workers
  share a clip). Each worker's backward carries only its own tokens' share of the gradient
  (diffusers' gather hands each rank the gradient of its chunk), so a group's gradients sum, not
  average, to the clip's: `backward` scales the loss by N before the reduction averages over all
  workers, which leaves the mean over data-parallel ranks (exact for N a power of two).
- diffusers guesses each rank's device as `rank % torch.accelerator.device_count()`, which
  divides by zero where there is no accelerator (the CPU tests); the collectives themselves run
  on gloo. On such a host the count reads 1 while diffusers sets up (`_accelerator_count_at_least_one`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from svdray import console
from svdray.models.lora import lora_parameters

logger = logging.getLogger("svdray.train")

STRATEGIES = ("ddp", "fsdp", "hsdp")
CONTEXT_KINDS = ("ulysses", "ring")
# Keys of the tensors a sharded checkpoint holds (torch.distributed.checkpoint): the LoRA by its
# parameter names, AdamW's state by parameter name and state name.
LORA_PREFIX, OPTIMIZER_PREFIX = "lora/", "optimizer/"


@dataclass(frozen=True)
class Workers:
    """This worker's place in the worker group (the loop reads it from Ray Train's context)."""

    rank: int = 0
    world_size: int = 1
    node: str = ""  # the node it runs on (Ray's node id): HSDP shards within the workers of one node


@dataclass(frozen=True)
class ContextParallel:
    """How one clip is split over a group of workers (`train.context_parallel*`); 1: not split."""

    degree: int = 1
    kind: str = "ulysses"  # "ulysses" or "ring"
    attention: str | None = None  # diffusers' attention backend; None: the model's own

    @classmethod
    def of(cls, train: Any) -> ContextParallel:
        """From the config's `train` section."""
        return cls(train.context_parallel, train.context_parallel_kind, train.context_parallel_attention)


def data_rank(rank: int, context: ContextParallel) -> int:
    """The data-parallel rank of worker `rank`: its context-parallel group, whose workers train
    on the same clips (groups are consecutive ranks: on one node when Ray packs them)."""
    return rank // context.degree


class Parallel:
    """The denoiser spread over the workers as `train.parallel` says; see the module docstring."""

    def __init__(
        self,
        strategy: str,
        denoiser: torch.nn.Module,
        module: torch.nn.Module,
        workers: Workers,
        mesh: Any = None,
        context: ContextParallel = ContextParallel(),
        context_mesh: Any = None,
    ):
        self.strategy = strategy
        self.workers = workers
        self.denoiser = denoiser  # the model itself: its parameters are what the optimizer updates
        self.module = module  # what the forward runs through (DDP's wrapper; the sharded model)
        self.mesh = mesh  # FSDP2's device mesh (None under DDP)
        self.context = context
        # Under context parallelism: (data, ring, ulysses), diffusers' mesh, and the same ranks as
        # (data, context); None without.
        self.context_mesh = context_mesh
        self.context_mesh_2d = None
        if context_mesh is not None:
            from torch.distributed.device_mesh import DeviceMesh

            grid = context_mesh.mesh.reshape(-1, context.degree)
            self.context_mesh_2d = DeviceMesh(
                context_mesh.device_type, grid, mesh_dim_names=("data", "context")
            )

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "hsdp")

    @property
    def collective_forward(self) -> bool:
        """Whether a forward of the denoiser involves other workers (a sharded model gathers its
        blocks, a context-parallel group splits the clip): every worker must run each one."""
        return self.sharded or self.context.degree > 1

    @property
    def data_rank(self) -> int:
        return data_rank(self.workers.rank, self.context)

    @property
    def data_parallel_size(self) -> int:
        """Groups training on their own clips (workers / train.context_parallel)."""
        return self.workers.world_size // self.context.degree

    @property
    def reads_data(self) -> bool:
        """Whether this worker reads its group's clips (the first of each context-parallel group;
        every worker without context parallelism); the others get them from it (`shared_batches`)."""
        return self.workers.rank % self.context.degree == 0

    def shared_batches(self, batches: Iterator[Any] | None) -> Iterator[Any]:
        """The batches the first worker of this context-parallel group reads (`batches`, None on
        the others), on every worker of the group, until they run out there: the group trains on
        the same clips. Without context parallelism, `batches` as they are."""
        if self.context.degree == 1:
            yield from batches
            return
        group = self.context_mesh_2d.get_group("context")
        source = dist.get_global_rank(group, 0)
        while True:
            box = [next(batches, None) if self.reads_data else None]
            dist.broadcast_object_list(box, src=source, group=group)
            if box[0] is None:
                return
            yield box[0]

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, the loss scaled by the context-parallel degree: see the module
        docstring (a group's workers each hold one share of the clip's gradient)."""
        (loss * self.context.degree if self.context.degree > 1 else loss).backward()

    def train(self) -> None:
        self.module.train()

    def mesh_ranks(self) -> list | None:
        """The ranks at each position of the device mesh (rows: HSDP's replicas); None under DDP."""
        return None if self.mesh is None else self.mesh.mesh.tolist()

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce the gradients across workers only
        when `enabled` (the last micro-batch of an update); before it, they accumulate locally."""
        if self.sharded:
            self.module.set_requires_gradient_sync(enabled)
            yield
        elif enabled or not hasattr(self.module, "no_sync"):
            yield
        else:
            with self.module.no_sync():
                yield

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the LoRA gradients to `max_norm` (their global norm, over every worker's shard);
        returns the norm before clipping as a plain tensor, the same on every worker."""
        norm = torch.nn.utils.clip_grad_norm_(lora_parameters(self.denoiser), max_norm)
        return norm.full_tensor() if _is_dtensor(norm) else norm

    def lora_state_dict(self, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The trained parameters, whole, on the CPU, keyed as the unwrapped model names them:
        what exports and the checkpoint's `lora/` are written from. Every worker must call it (a
        sharded model gathers); the tensors come back on rank 0 only, or on every worker with
        `everywhere`."""
        if not self.sharded:
            if self.workers.rank != 0 and not everywhere:
                return {}
            return {name: p.detach().cpu() for name, p in self.denoiser.named_parameters() if p.requires_grad}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload keeps the gathered tensors on rank 0 only (the others get {}).
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=not everywhere, ignore_frozen_params=True
        )
        state = get_model_state_dict(self.module, options=options)
        return {name: t.cpu() for name, t in state.items() if name in _trainable_names(self.denoiser)}

    # ---------------------------------------------------------------- sharded checkpoints
    def sharded_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The LoRA and the optimizer state as this worker's shards, flat (`lora/<name>`,
        `optimizer/<name>/<state>`), for `torch.distributed.checkpoint`; and the optimizer's
        param groups (hyperparameters, parameters by name), which are not tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(
            self.module, optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        names = _trainable_names(self.denoiser)
        flat = {LORA_PREFIX + name: t for name, t in model_state.items() if name in names}
        for name, state in optim_state["state"].items():
            for key, value in state.items():
                flat[f"{OPTIMIZER_PREFIX}{name}/{key}"] = value
        return flat, optim_state["param_groups"]

    def load_sharded_state(
        self, folder: Path, optimizer: torch.optim.Optimizer, param_groups: list[dict]
    ) -> None:
        """Restore the LoRA and the optimizer from a checkpoint's sharded state (`folder`),
        written by any worker count: `torch.distributed.checkpoint` reads what this worker's
        shards need of it. Works under DDP too (every worker reads the whole). The folder's
        metadata must have passed `svdray.safeload.check_sharded_state` (the caller's job)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # The current state's layout (the optimizer's state initialised if it has none yet) is
        # what the checkpoint is read into.
        flat, _ = self.sharded_state(optimizer)
        dcp.load(flat, checkpoint_id=str(folder))
        model_state = {k.removeprefix(LORA_PREFIX): v for k, v in flat.items() if k.startswith(LORA_PREFIX)}
        optim_state: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            if key.startswith(OPTIMIZER_PREFIX):
                name, state_name = key.removeprefix(OPTIMIZER_PREFIX).rsplit("/", 1)
                optim_state.setdefault(name, {})[state_name] = value
        set_state_dict(
            self.module,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict={"state": optim_state, "param_groups": param_groups},
            options=StateDictOptions(strict=False),
        )


def parallelize(
    denoiser: torch.nn.Module,
    blocks: list[torch.nn.Module],
    strategy: str,
    device: torch.device,
    workers: Workers,
    context: ContextParallel = ContextParallel(),
) -> Parallel:
    """Spread `denoiser` over the worker group as `strategy` ("ddp", "fsdp" or "hsdp") says, each
    clip over `context.degree` workers; `blocks` are the family's repeated blocks
    (`ModelFamily.blocks`), FSDP2's units of gathering. Called on every worker (it is
    collective), after the models are built and before the optimizer: under FSDP2 the optimizer
    must see the sharded parameters."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.parallel: {strategy!r} is not one of {list(STRATEGIES)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context_mesh = None
    if context.degree > 1:
        context_mesh = split_context(denoiser, context, device, workers)
    if strategy == "ddp":
        module = _ddp(denoiser, device, workers)
        return Parallel(strategy, denoiser, module, workers, None, context, context_mesh)
    mesh = device_mesh(strategy, device, workers)
    _fully_shard(denoiser, blocks, mesh, workers, device)
    return Parallel(strategy, denoiser, denoiser, workers, mesh, context, context_mesh)


def context_grid(world_size: int, context: ContextParallel) -> list[list[list[int]]]:
    """The context-parallel mesh's ranks, (data, ring, ulysses): consecutive ranks form a group,
    split along the one axis of its kind (diffusers' config wants both axes named)."""
    if context.kind not in CONTEXT_KINDS:
        raise ValueError(f"train.context_parallel_kind: {context.kind!r} is not one of {list(CONTEXT_KINDS)}")
    if world_size % context.degree:
        raise ValueError(f"train.context_parallel: {context.degree} must divide the {world_size} workers")
    ring, ulysses = (context.degree, 1) if context.kind == "ring" else (1, context.degree)
    return torch.arange(world_size).reshape(world_size // context.degree, ring, ulysses).tolist()


def split_context(
    denoiser: torch.nn.Module, context: ContextParallel, device: torch.device, workers: Workers
) -> Any:
    """Enable diffusers' context parallelism on `denoiser` over the (data, ring, ulysses) mesh;
    returns the mesh."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import DeviceMesh

    if getattr(denoiser, "_cp_plan", None) is None:
        raise ValueError(
            f"train.context_parallel: {type(denoiser).__name__} declares no context-parallel plan"
        )
    grid = context_grid(workers.world_size, context)
    mesh = DeviceMesh(device.type, torch.tensor(grid), mesh_dim_names=("data", "ring", "ulysses"))
    ring, ulysses = len(grid[0]), len(grid[0][0])
    logger.info(
        "context parallel (%s): %d group(s) of %d, ranks %s", context.kind, len(grid), context.degree, grid
    )
    if context.attention:
        denoiser.set_attention_backend(context.attention)
    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh)
    if not console.verbose():
        # Expected, not news to the user: the API's "experimental" notice, and that I2V's one
        # timestep per clip (a 1-D input the plan would split if it were per token) stays whole.
        for name in ("diffusers.models.modeling_utils", "diffusers.hooks.context_parallel"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with _accelerator_count_at_least_one():
        denoiser.enable_parallelism(config=config)
    # diffusers' output gather calls a functional collective torch has renamed; its warning is
    # about diffusers' code, not the run's.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor. is deprecated", category=FutureWarning)
    return mesh


@contextlib.contextmanager
def _accelerator_count_at_least_one() -> Iterator[None]:
    """See the module docstring: diffusers' device guess divides by the accelerator count."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def device_mesh(strategy: str, device: torch.device, workers: Workers) -> Any:
    """FSDP2's mesh: every worker on one axis ("fsdp"), or (nodes, workers per node) for "hsdp",
    rows replicating each other, each row one node's workers sharding the model."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if strategy == "fsdp":
        return init_device_mesh(device.type, (workers.world_size,), mesh_dim_names=("shard",))
    nodes: list[str] = [workers.node] * workers.world_size
    if workers.world_size > 1:
        dist.all_gather_object(nodes, workers.node)  # which node each worker runs on
    grid = node_grid(nodes)
    logger.info("hsdp: %d node(s) x %d worker(s), ranks %s", len(grid), len(grid[0]), grid)
    return DeviceMesh(device.type, torch.tensor(grid), mesh_dim_names=("replicate", "shard"))


def node_grid(nodes: list[str]) -> list[list[int]]:
    """HSDP's mesh from the node each rank runs on (`nodes[rank]`): the ranks of one node per
    row, rows in order of their lowest rank. Every node must hold the same number of workers."""
    rows: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        rows.setdefault(node, []).append(rank)
    sizes = {node: len(ranks) for node, ranks in rows.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            "train.parallel: hsdp shards within each node and needs the same number of workers on "
            f"every node, but this worker group has {sorted(sizes.values(), reverse=True)} workers "
            "on its nodes (train.placement: pack fills a node before the next; make "
            "train.num_workers a multiple of the workers a node holds)"
        )
    return list(rows.values())


def _ddp(denoiser: torch.nn.Module, device: torch.device, workers: Workers) -> torch.nn.Module:
    if workers.world_size == 1:
        return denoiser  # as Ray Train's prepare_model: nothing to synchronise
    from torch.nn.parallel import DistributedDataParallel

    # Ignored: neither broadcast at start nor synchronised at each forward (buffers).
    frozen = [name for name, p in denoiser.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in denoiser.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(denoiser, frozen)
    return DistributedDataParallel(denoiser, device_ids=[device] if device.type == "cuda" else None)


def _fully_shard(
    denoiser: torch.nn.Module,
    blocks: list[torch.nn.Module],
    mesh: Any,
    workers: Workers,
    device: torch.device,
) -> None:
    """Shard `denoiser` (built on the CPU, `svdray.models.base.denoiser_device`): each block, then
    the root, moves to the mesh's device as `fully_shard` splits it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not blocks:
        raise ValueError(f"train.parallel: {type(denoiser).__name__} declares no blocks to shard")
    # Every worker starts from rank 0's LoRA, as DDP makes them (each worker seeds its own); sent
    # from the training device (NCCL sends no CPU tensors).
    if workers.world_size > 1:
        for param in lora_parameters(denoiser):
            sent = param.data.to(device)
            dist.broadcast(sent, src=0)
            param.data.copy_(sent)
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for index, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # FSDP2 warns that a module returned a view (an in-place op on it would skip its backward
    # hook); the families only read the denoiser's output.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
