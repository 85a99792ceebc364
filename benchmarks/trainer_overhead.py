"""Ray's overhead on the training step, on CPU: the tiny model's step in a plain PyTorch loop
against svdray's loop under a TorchTrainer with one CPU worker, in one run (target: the trainer's
throughput at least 0.9 of the plain loop's).

Data loading is excluded: both loops get the same precomputed uint8 batches (the trainer through a
Ray Data dataset of them, nothing to decode). Both run with the same torch thread count (Ray sets the
worker's OMP_NUM_THREADS from its CPUs). The sequence: plain; trainer reporting every step; trainer
reporting every `--log-every` steps; the plain loop itself run as a Ray Train worker's function (what
the worker's surroundings cost, without Ray Data, reports or MLflow); plain again (a warmed-up
process: it bounds the drift of a shared machine's load); the trainer with a checkpoint every
`--checkpoint-every` steps, uploaded synchronously and asynchronously (`train.checkpoint_upload`),
side by side in two interleaved rounds; then the parts: Ray Data's fetch per batch in a worker, and
one MLflow log call.

    python benchmarks/trainer_overhead.py --out trainer_overhead.json
    python benchmarks/trainer_overhead.py --checkpoint-upload-only --out checkpoint_upload.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from train_step import (  # benchmarks/ is the script's folder
    Case,
    cached_dataset,
    environment,
    make_config,
    plain_loop,
    save_random_pipeline,
    shutdown_ray,
    trainer_loop,
)

from svdray.config import config_from_dict


def data_only_loop(loop_config: dict[str, Any]) -> None:
    """The loop's data path alone: `svdray.train.loop.batches` over this worker's shard, timed per
    batch. Not overlapped with compute here, so an upper bound on what it costs a step."""
    import ray.train

    from svdray.models import family_of
    from svdray.train.checkpoint import TrainState
    from svdray.train.loop import batches

    cfg = config_from_dict(loop_config["config"], check_files=False)
    shard = ray.train.get_dataset_shard("train")
    times, last = [], time.perf_counter()
    for _ in batches(shard, cfg, family_of(cfg), torch.device("cpu"), 0, TrainState()):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    Path(loop_config["probe_path"]).write_text(json.dumps(times))


def plain_in_worker_loop(loop_config: dict[str, Any]) -> None:
    """The plain loop, unchanged, run as a Ray Train worker's training function: no Ray Data, no
    reports, no MLflow, only the worker's surroundings (its threads, Ray's processes)."""
    from train_step import plain_loop

    cfg = config_from_dict(loop_config["config"], check_files=False)
    result = plain_loop(cfg, loop_config["warmup"], loop_config["steps"], False)
    Path(loop_config["probe_path"]).write_text(json.dumps(result))


def plain_in_worker(cfg, warmup: int, steps: int, workdir: Path) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from svdray.train.trainer import init_ray

    init_ray(cfg)
    probe_path = workdir / "probe-plain-in-worker.json"
    TorchTrainer(
        plain_in_worker_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "warmup": warmup,
            "steps": steps,
            "probe_path": str(probe_path),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(name="plain-in-worker", storage_path=cfg.train.storage_path),
    ).fit()
    return json.loads(probe_path.read_text())


def data_fetch(cfg, workdir: Path) -> dict[str, Any]:
    """Seconds per batch that the Ray Data shard iterator takes in a Ray Train worker."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from svdray.train.trainer import init_ray

    init_ray(cfg)
    probe_path = workdir / "probe-data-only.json"
    TorchTrainer(
        data_only_loop,
        train_loop_config={"config": cfg.to_dict(), "probe_path": str(probe_path)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(name="data-only", storage_path=cfg.train.storage_path),
        datasets={"train": cached_dataset(cfg)},
    ).fit()
    times = json.loads(probe_path.read_text())[1:]  # the first batch waits for the pipeline to start
    return {"batches": len(times), "fetch_s_median": statistics.median(times), "fetch_s_max": max(times)}


def mlflow_log_cost(cfg, calls: int = 20) -> dict[str, Any]:
    """Seconds per `MetricWriter.log` call with the loop's five metrics (rank 0 makes one per log)."""
    from svdray import tracking
    from svdray.tracking import MetricWriter

    cfg.train.name = "mlflow-cost"
    writer = MetricWriter(tracking.tracking_uri(cfg), tracking.start_or_resume_run(cfg))
    metrics = {"loss": 0.1, "lr": 1e-4, "grad_norm": 0.5, "samples_per_s": 5.0, "frames_per_s": 40.0}
    times = []
    for step in range(1, calls + 1):
        started = time.perf_counter()
        writer.log(metrics, step=step)
        times.append(time.perf_counter() - started)
    return {"calls": calls, "log_s_median": statistics.median(times[1:])}


def checkpoint_upload_runs(args: argparse.Namespace, config, workdir: Path) -> list[dict[str, Any]]:
    """The trainer with a checkpoint every `--checkpoint-every` steps, uploaded "sync" and
    "async" (`train.checkpoint_upload`), interleaved sync, async, sync, async so that a change of
    the machine's load shows as a difference between the two rounds rather than between modes.
    Each timed interval (a logging interval) holds one checkpoint."""
    runs = []
    every = args.checkpoint_every
    for round_ in (1, 2):
        for mode in ("sync", "async"):
            cfg = config(every, args.steps)
            cfg.train.checkpoint_upload = mode
            tag = f"checkpoint-{mode}-{round_}"
            run = measure(
                f"checkpoint every {every}, {mode} ({round_})",
                trainer_loop,
                cfg,
                args.warmup,
                args.steps,
                workdir,
                tag,
                every,
            )
            checkpoints = sorted((Path(cfg.train.storage_path) / f"benchmark-{tag}").glob("step_*"))
            run["checkpoints"] = len(checkpoints)
            run["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
            runs.append(run)
    return runs


def measure(name: str, fn, *fn_args) -> dict[str, Any]:
    print(f"{name} ...", flush=True)
    load = os.getloadavg()
    result = fn(*fn_args)
    return {"name": name, **result, "load_average_before": load, "load_average_after": os.getloadavg()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(max(1, int(args.cpus)))
    case = Case(args.frames, args.size, args.size, args.batch, args.rank)
    runs = []
    with tempfile.TemporaryDirectory(prefix="svdray-overhead-") as tmp:
        workdir = Path(tmp)
        pipeline_dir = save_random_pipeline(tiny=True, out_dir=workdir / "pipeline")

        def config(log_every: int, steps: int):
            return make_config(
                case, pipeline_dir, workdir, [f"train.log_every={log_every}"], args.warmup + steps, args.cpus
            )

        runs.append(measure("plain", plain_loop, config(1, args.steps), args.warmup, args.steps, False))
        if args.checkpoint_upload_only:
            runs += checkpoint_upload_runs(args, config, workdir)
            shutdown_ray()
            return summarize(runs, {}, args, case)
        runs.append(
            measure(
                "trainer, report every step",
                trainer_loop,
                config(1, args.steps_every_step),
                2,  # each step waits for the controller's poll: the step's own warm-up is noise
                args.steps_every_step,
                workdir,
                "every-step",
            )
        )
        runs.append(
            measure(
                f"trainer, report every {args.log_every} steps",
                trainer_loop,
                config(args.log_every, args.steps),
                args.warmup,
                args.steps,
                workdir,
                "sparse",
            )
        )
        runs.append(
            measure(
                "plain, in a Ray Train worker",
                plain_in_worker,
                config(1, args.steps),
                args.warmup,
                args.steps,
                workdir,
            )
        )
        runs.append(
            measure("plain, again", plain_loop, config(1, args.steps), args.warmup, args.steps, False)
        )
        runs += checkpoint_upload_runs(args, config, workdir)
        # Where the rest goes: the data path per batch, and one MLflow log call.
        parts = {
            "data_fetch": data_fetch(config(1, args.steps), workdir),
            "mlflow_log": mlflow_log_cost(config(1, args.steps)),
        }
        shutdown_ray()
    return summarize(runs, parts, args, case)


def summarize(runs: list[dict[str, Any]], parts: dict[str, Any], args: argparse.Namespace, case) -> dict:
    # The reference is the first plain run: like the trainer's worker it is a fresh process with
    # the same warm-up (a CPU process keeps getting faster for ~100 steps, allocator and caches),
    # so the warmed-up second plain run only bounds the drift.
    plain_throughput = runs[0]["samples_per_s"]
    for r in runs:
        r["throughput_over_plain"] = r["samples_per_s"] / plain_throughput
        if "loop_step_s_median" in r:
            # The loop's own step time (data fetch to optimizer step) over the wall time between
            # logged steps, from the same steps: what reporting and logging add, immune to drift.
            r["loop_share_of_wall"] = r["loop_step_s_median"] / r["step_s_median"]
    return {
        "environment": environment(torch.device("cpu")),
        "settings": vars(args),
        "case": case.label,
        "runs": runs,
        "parts": parts,
    }


def print_summary(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\n{report['case']} on {env['device']}, {env['cpu_count']} CPUs, {env['date']}")
    print(f"{'run':<32} {'step s':>7} {'loop s':>7} {'samples/s':>10} {'ratio':>6}  load avg")
    for r in report["runs"]:
        loop = f"{r['loop_step_s_median']:.3f}" if "loop_step_s_median" in r else "-"
        print(
            f"{r['name']:<32} {r['step_s_median']:>7.3f} {loop:>7} {r['samples_per_s']:>10.2f} "
            f"{r['throughput_over_plain']:>6.3f}  "
            f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}"
        )
    for r in report["runs"]:
        if "checkpoints" in r:
            print(
                f"{r['name']}: {r['checkpoints']} checkpoints of {r['checkpoint_bytes'] / 1024:.0f} KiB, "
                f"fit {r['fit_s']:.1f} s (the last uploads included)"
            )
    parts = report["parts"]
    if not parts:
        return
    print(
        f"Ray Data batch fetch in a worker: {1000 * parts['data_fetch']['fetch_s_median']:.1f} ms median; "
        f"one MLflow log call: {1000 * parts['mlflow_log']['log_s_median']:.1f} ms median"
    )
    print(
        "step s: median wall time per step; loop s: the loop's own step time (data fetch to optimizer\n"
        "step, no reporting or logging); ratio: throughput / the first plain run's (both fresh processes)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed steps (the sparse run's logging interval)"
    )
    parser.add_argument("--steps", type=int, default=100, help="timed steps of the plain and sparse runs")
    parser.add_argument("--steps-every-step", type=int, default=6, help="timed steps, reporting every step")
    parser.add_argument("--log-every", type=int, default=20, help="the sparse run's train.log_every")
    # One thread each by default: on a small shared machine two OpenMP threads spin-wait for cores
    # other processes hold, which measures the neighbours rather than Ray.
    parser.add_argument("--cpus", type=float, default=1.0, help="the worker's CPUs = torch threads of both")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=5,
        help="the sync/async runs' checkpoint (and logging) interval",
    )
    parser.add_argument(
        "--checkpoint-upload-only",
        action="store_true",
        help="run only the plain loop and the sync/async checkpoint upload runs",
    )
    parser.add_argument("--out", help="write all figures as JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
