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
    ],
)
def test_bad_config_names_the_key(one_clip_manifest, write_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write_config(one_clip_manifest), [override])


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
