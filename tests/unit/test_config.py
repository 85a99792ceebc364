from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from svdray.config import ConfigError, flatten, load_config


def test_demo_and_real_configs_are_valid():
    for name in ("configs/demo.yaml", "configs/svd_xt_lora.yaml"):
        cfg = load_config(name, check_files=False)
        assert cfg.lora.rank > 0


def test_overrides_keep_types(one_clip_manifest, write_config):
    cfg = load_config(
        write_config(one_clip_manifest),
        ["lora.rank=32", "optim.lr=3e-4", "train.use_gpu=true", "lora.blocks=[temporal]"],
    )
    assert cfg.lora.rank == 32 and cfg.optim.lr == pytest.approx(3e-4) and cfg.train.use_gpu is True
    assert cfg.lora.blocks == ["temporal"]
    assert flatten(cfg.to_dict())["lora.rank"] == 32


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rnak=4", "lora.rnak: unknown key"),
        ("lora.rank=eight", "lora.rank: expected an integer"),
        ("train.use_gpu=maybe", "train.use_gpu: expected true/false"),
        ("data.start=middle", "data.start: 'middle' is not one of"),
        ("data.manifest=/nope/missing.jsonl", "data.manifest: file not found"),
        ("lora.rank=0", "lora.rank: must be positive"),
        ("model.pretrained=/nope/svd", "model.pretrained: directory not found"),
        ("trian.max_steps=3", "trian: unknown key"),
        ("train.placement=ring", "train.placement: 'ring' is not one of"),
        (
            "train.resources_per_worker={CPU: 1}",
            "train.resources_per_worker.CPU: set by train.cpus_per_worker",
        ),
        ("train.resources_per_worker={trainer: 0}", "train.resources_per_worker.trainer: must be positive"),
        ("train.checkpoint_upload=later", "train.checkpoint_upload: 'later' is not one of"),
        ("train.num_workers=0", "train.num_workers: must be at least 1"),
        ("train.num_workers=[0, 2]", "train.num_workers: must be at least 1"),
        ("train.num_workers=[3, 2]", "train.num_workers: [min, max] with min <= max"),
        ("train.num_workers=[1, 2, 3]", "train.num_workers: expected a count or [min, max]"),
        ("train.num_workers=[1, 3]", "train.global_batch_size: 3 examples per update is not divisible by"),
        ("train.global_batch_size=0", "train.global_batch_size: must be positive"),
        ("train.elastic_resize_interval_s=0", "train.elastic_resize_interval_s: must be positive"),
    ],
)
def test_bad_config_names_the_key(one_clip_manifest, write_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write_config(one_clip_manifest), [override])


def test_global_batch_stays_whatever_the_worker_count(one_clip_manifest, write_config):
    """One definition of the global batch: by default batch x accumulation x the most workers;
    each worker count gets the accumulation that keeps it."""
    fixed = load_config(write_config(one_clip_manifest), ["train.num_workers=2", "train.grad_accum=3"]).train
    assert not fixed.elastic() and fixed.global_batch() == 6 and fixed.grad_accum_at(2) == 3
    elastic = load_config(
        write_config(one_clip_manifest), ["train.num_workers=[1, 2]", "train.batch_size=2"]
    ).train
    assert elastic.elastic() and elastic.worker_range() == (1, 2) and elastic.global_batch() == 4
    assert [elastic.grad_accum_at(w) for w in (1, 2)] == [2, 1]
    assert elastic.bucket_run() == 4  # a whole update in one aspect-ratio bucket, for either count
    one_worker = elastic.at_world_size(1)  # what a worker of a 1-worker group trains with
    assert (one_worker.grad_accum, one_worker.global_batch()) == (2, 4)
    chosen = load_config(
        write_config(one_clip_manifest), ["train.num_workers=[2, 4]", "train.global_batch_size=24"]
    ).train
    assert [chosen.grad_accum_at(w) for w in (2, 3, 4)] == [12, 8, 6]
    with pytest.raises(
        ConfigError, match=r"train.global_batch_size: 5 .* by train.batch_size x workers = 1 x 2"
    ):
        load_config(
            write_config(one_clip_manifest), ["train.num_workers=[1, 2]", "train.global_batch_size=5"]
        )
    with pytest.raises(ConfigError, match="train.grad_accum: 2 disagrees with train.global_batch_size=24"):
        load_config(
            write_config(one_clip_manifest),
            ["train.num_workers=[2, 4]", "train.global_batch_size=24", "train.grad_accum=2"],
        )


def test_cli_rejects_bad_config_before_any_work(one_clip_manifest, write_config, tmp_path):
    path = write_config(one_clip_manifest)
    tree = yaml.safe_load(path.read_text())
    tree["optim"]["learning_rate"] = 1e-4
    path.write_text(yaml.safe_dump(tree))
    proc = subprocess.run(
        [sys.executable, "-m", "svdray.cli", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "optim.learning_rate: unknown key" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_explains_itself(capsys):
    """Every option of every command (but `sample`, rewritten apart) has help text, and the help
    shows defaults; `svdray --version`; `svdray ui --host`."""
    import argparse

    from svdray import cli

    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        if name == "sample":
            continue
        for action in sub._actions:
            assert action.help, f"svdray {name} {action.option_strings}: no help text"
    assert "(default: 127.0.0.1)" in " ".join(subparsers.choices["ui"].format_help().split())
    assert cli.build_parser().parse_args(["ui", "--host", "0.0.0.0"]).host == "0.0.0.0"
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("svdray ")
    assert cli.build_parser().parse_args(["train", "--config", "x.yaml", "--verbose"]).verbose
    assert cli.build_parser().parse_args(["--verbose", "train", "--config", "x.yaml"]).verbose


def test_browse_hint_opens_the_store_the_run_logged_to(tmp_path, one_clip_manifest, write_config):
    """`svdray train --set mlflow.tracking_uri=...` logs to another store than the config's: the
    `browse with:` line it ends on carries that override, and `svdray ui` given it reads that store."""
    import shlex

    from svdray import cli

    path = write_config(one_clip_manifest, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'config.db'}"})
    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'other db.db'}", "train.max_steps=2"]
    command = cli.browse_command(str(path), overrides)
    program, *argv = shlex.split(command)
    assert program == "svdray" and "train.max_steps=2" not in argv
    args = cli.build_parser().parse_args(argv)
    assert args.command == "ui"
    assert load_config(args.config, args.set).mlflow.tracking_uri == f"sqlite:///{tmp_path / 'other db.db'}"
    assert cli.browse_command(str(path), []) == f"svdray ui --config {shlex.quote(str(path))}"


def test_a_local_cluster_too_small_for_the_run_fails_before_it_starts(
    tmp_path, one_clip_manifest, write_config, monkeypatch
):
    """Two workers of 1 CPU and a decoder of 0.5 on a 2-CPU local instance would wait for a CPU
    forever: the error names ray.num_cpus and the keys that add up, before Ray starts."""
    from svdray.train.trainer import check_local_cluster_fits

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(write_config(one_clip_manifest, train={"num_workers": 2}, ray={"num_cpus": 2}))
    with pytest.raises(ConfigError, match=r"ray.num_cpus: .* 2 CPUs, but 2 workers .* need 2.5"):
        check_local_cluster_fits(cfg)
    cfg.ray.num_cpus = 3
    check_local_cluster_fits(cfg)  # fits
    cfg.ray.num_cpus, cfg.ray.address = 2, "127.0.0.1:6379"
    check_local_cluster_fits(cfg)  # a cluster's size is its own


def test_loading_configs_imports_no_model_library():
    """Config validation stays instant: importing svdray.config and loading every shipped config
    (each family's section and rules included) imports neither torch nor diffusers."""
    from tests.support.paths import REPO

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from svdray.config import load_config\n"
        "for path in sorted(Path('configs').glob('*.yaml')):\n"
        "    load_config(path, check_files=False)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]"
