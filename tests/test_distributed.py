"""Scale-out: training and recovery under torchrun (two CPU processes, gloo) match one process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from compress.model.checkpoint import save_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
MODEL = ["--set", "model.image_size=8", "--set", "model.in_chans=1", "--set", "model.patch_size=2", "--set",
         "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2", "--set", "model.mlp_dim=64",
         "--set", "preprocess.crop_size=8", "--set", "preprocess.mean=[0.5]", "--set", "preprocess.std=[0.5]"]
TRAIN = ["--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "train.crop_padding=1", "--set",
         "train.warmup_epochs=0.5", "--set", "data.calib_size=64"]


def _max_difference(a, b) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_training_on_two_processes_matches_one(tmp_path):
    args = ["-m", "compress.cli", "train", "--data", "builtin:digits", *MODEL, *TRAIN]
    _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    _run([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    # The same global batches, augmentation and averaged gradients: equal up to the order of float sums.
    assert _max_difference(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors") < 1e-4
    one, two = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("one", "two"))
    assert one["steps"] == two["steps"] > 0
    assert abs(one["history"][-1]["loss"] - two["history"][-1]["loss"]) < 1e-4  # rank 0 logs the whole batch's loss


@pytest.mark.slow
def test_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    args = ["compress.cli", "train", "--data", "builtin:digits", *MODEL, *TRAIN, "--set", "train.batch_size=33"]
    result = subprocess.run([*TORCHRUN, "-m", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and "batch size 33 does not split evenly over 2 processes" in result.stderr


@pytest.mark.slow
def test_recovery_inside_compress_run_on_two_processes_matches_one(tmp_path, digits_model):
    ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors")
    args = ["-m", "compress.cli", "run", str(ckpt), "--data", "builtin:digits", "--set", "data.calib_size=128",
            "--set", "quantize.enabled=false", "--set", "measure.iterations=3", "--set", "measure.max_seconds=0.2",
            "--set", "measure.warmup=1", "--set", "measure.batch_sizes=[1]", "--set", 'measure.runtimes=["onnxruntime"]',
            "--set", "data.eval_limit=64", "--set", "prune.enabled=true", "--set", "prune.heads=0.25", "--set",
            "prune.importance=l2", "--set", "recover.epochs=1", "--set", "recover.batch_size=32"]
    _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    two = _run([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    assert two.stderr.count("records:") + two.stdout.count("records:") == 1  # rank 0 alone reports
    marker = {d: json.loads((tmp_path / d / "stages" / "recover.json").read_text()) for d in ("one", "two")}
    steps = {d: marker[d]["notes"]["recovery"][0]["steps"] for d in marker}
    assert steps["one"] == steps["two"] > 0
    recovered = {d: tmp_path / d / "artifacts" / marker[d]["checkpoint"] for d in marker}
    assert _max_difference(recovered["one"], recovered["two"]) < 1e-4


def test_the_readme_torchrun_commands_name_real_options():
    """The README's torchrun lines call `compress.cli` commands with options those commands really have."""
    import re

    import typer

    from compress.cli import app

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.startswith("torchrun ")]
    assert any("--nnodes" in c and "--master_addr" in c for c in commands)  # the multi-node form is there
    click_app = typer.main.get_command(app)
    for command in commands:
        words = command.split()
        module = words.index("-m")
        assert words[module + 1] == "compress.cli", command
        sub = click_app.commands[words[module + 2]]  # KeyError: a subcommand that does not exist
        known = {opt for param in sub.params for opt in param.opts}
        used = {w for w in words[module + 3:] if re.fullmatch(r"--[a-z-]+", w)}
        assert used <= known, f"{command}: {sorted(used - known)} are not options of `compress {sub.name}`"
