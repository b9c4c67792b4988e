"""The command line: the happy path, and one clear line with exit code 1 for each kind of bad input."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calibration.preprocess import Preprocess
from compress.model.checkpoint import Checkpoint, save_checkpoint
from compress.cli import app
from tests.conftest import TINY, write_digit_folder

FAST = ["--set", "measure.iterations=3", "--set", "measure.max_seconds=0.5", "--set", "measure.warmup=1",
        "--set", "data.calib_size=20", "--set", "quantize.enabled=false"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def workspace(tmp_path, tiny_vit):
    write_digit_folder(tmp_path / "data", per_class=10)
    save_checkpoint(Checkpoint(tiny_vit, Preprocess(crop_size=32), [str(i) for i in range(10)]), tmp_path / "vit.safetensors")
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_run_writes_records_and_report_then_resumes(workspace):
    args = ["run", workspace / "vit.safetensors", "--data", workspace / "data", "--out", workspace / "run",
            "--runtime", "onnxruntime", "--runtime", "openvino", *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert (workspace / "run" / "records.jsonl").exists() and (workspace / "run" / "report.md").exists()
    assert "baseline" in first.output and "openvino" in first.output
    second = invoke(*args)
    assert second.exit_code == 0 and "resumed: stages baseline" in second.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = invoke("run", "--demo", "--out", tmp_path / "demo", "--set", "train.epochs=1", "--set", "recover.epochs=1",
                    "--runtime", "onnxruntime", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo-train" / "model.safetensors").exists()
    assert "onnxruntime" in (tmp_path / "demo" / "report.md").read_text()


def test_progress_without_a_terminal_is_lines(capsys):
    """In a log file or CI, in-place redraws would pile up on one line: long work prints whole lines, quick work
    nothing."""
    from compress import cli

    bars = cli._ProgressBars()
    bars.live, bars.min_interval_s = False, 0.0  # as when stderr is a file, with no wait between lines
    with bars:
        for step in range(1, 41):
            bars("recover (tokens)", step, 40)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("recover (tokens):") for line in lines), lines
    assert "\r" not in "".join(lines) and "40/40" in lines[-1], lines
    bars = cli._ProgressBars()  # the default interval: a quick job says nothing
    bars.live = False
    with bars:
        for step in range(1, 41):
            bars("export", step, 40)
    assert capsys.readouterr().err == ""


def _write_truncated(ws):
    data = (ws / "vit.safetensors").read_bytes()
    (ws / "bad.safetensors").write_bytes(data[: len(data) // 2])
    return ws / "bad.safetensors"


def _write_cnn(ws):
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), ws / "cnn.pt")
    return ws / "cnn.pt"


def _write_onnx(ws):
    """The tiny ViT as a user's ONNX file: it records no normalisation."""
    from compress.model.vit import ViTConfig, VisionTransformer
    from export.onnx_export import export_onnx

    model = VisionTransformer(ViTConfig(**TINY)).eval()
    return export_onnx(model, ws / "vit.onnx", example=torch.randn(2, 3, 32, 32)).path


def _write_no_cls(ws):
    from compress.model.vit import ViTConfig, VisionTransformer

    model = VisionTransformer(ViTConfig(**(TINY | {"class_token": False, "pool": "mean"})))
    path = ws / "mean-pool.safetensors"
    save_checkpoint(Checkpoint(model, Preprocess(crop_size=32), [str(i) for i in range(10)]), path)
    return path


def _calib_array(ws):
    np.save(ws / "calib.npy", np.zeros((8, 1, 32, 32), np.float32))  # grayscale: the model takes RGB
    return ws / "calib.npy"


def _empty_dir(ws):
    (ws / "empty").mkdir()
    return ws / "empty"


def _one_class(ws):
    return write_digit_folder(ws / "one", classes=1, per_class=4)


BAD_RUNS = {
    "ONNX without its normalisation": (lambda ws: ["run", _write_onnx(ws), "--data", ws / "data"],
                                       "vit.onnx records no normalisation, so preprocess.mean and std must be given"),
    "ONNX with a [model] setting its graph gives": (
        lambda ws: ["train", "--data", ws / "data", "--out", ws / "t", "--init", _write_onnx(ws), "--set",
                    "preprocess.mean=[0.5,0.5,0.5]", "--set", "preprocess.std=[0.5,0.5,0.5]", "--set",
                    "model.num_heads=2"], "model.num_heads does not apply to an ONNX file"),
    "missing checkpoint": (lambda ws: ["run", ws / "nope.pt", "--data", ws / "data"], "does not exist"),
    "truncated checkpoint": (lambda ws: ["run", _write_truncated(ws), "--data", ws / "data"], "truncated"),
    "not a ViT": (lambda ws: ["run", _write_cnn(ws), "--data", ws / "data"], "no known ViT layout"),
    "hyper-parameters disagree": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                              "model.embed_dim=128"], "model.embed_dim=128 disagrees"),
    "dataset with no images": (lambda ws: ["run", ws / "vit.safetensors", "--data", _empty_dir(ws)], "no images found"),
    "single class": (lambda ws: ["run", ws / "vit.safetensors", "--data", _one_class(ws)], "single class"),
    "missing dataset": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "nodata"], "does not exist"),
    "image size": (lambda ws: ["train", "--data", ws / "data", "--out", ws / "t", "--set", "model.image_size=30",
                               "--set", "model.patch_size=8"], "not divisible by patch size 8"),
    "unknown runtime": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--runtime", "tensorflow"],
                        "measure.runtimes: unknown value 'tensorflow'; choose from 'torch'"),
    "unknown key": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set", "train.epoch=3"],
                    "config: unknown key 'train.epoch'"),
    "calibration set too small": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                              "quantize.enabled=true", "--set", "quantize.calib_size=64"],
                                  "asked for 64 calibration images but the calibration split holds"),
    "calibration array of another shape": (
        lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set", "quantize.enabled=true",
                    "--set", f'quantize.calibration_data="{_calib_array(ws)}"', "--set", "quantize.calib_size=4"],
        "has shape (8, 1, 32, 32) but the model takes (N, 3, 32, 32)"),
    "unknown quantizer": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                      'quantize.quantizers=["tensorrt-int8"]'], "quantize.quantizers"),
    "prune ratio out of range": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                             "prune.enabled=true", "--set", "prune.heads=1.0"],
                                 "config prune.heads: Input should be less than 1"),
    "prune ratio empties a layer": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                                "prune.enabled=true", "--set", "prune.heads=0.9"],
                                    "would leave a layer with fewer than 1; at most 75%"),
    "token merging r too large": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                              "tokens.enabled=true", "--set", "tokens.r=9"],
                                  "r=9 at layer 0 is more than that layer can merge: it has 16 patch tokens, so the "
                                  "largest valid r there is 8"),
    "keep rate out of range": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                           "tokens.enabled=true", "--set", "tokens.method='evit'", "--set",
                                           "tokens.keep_rate=1.2"], "keep rate 1.2 at layer 0 is outside (0, 1]"),
    "EViT without a class token": (lambda ws: ["run", _write_no_cls(ws), "--data", ws / "data", "--set",
                                               "tokens.enabled=true", "--set", "tokens.method='evit'"],
                                   "this model has no class token"),
    "unknown stage in a recipe": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                              'pipeline.stages=["prune", "distill"]'],
                                  "config pipeline.stages: unknown value 'distill'; choose from 'prune'"),
    "stages in an impossible order": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--set",
                                                  'pipeline.stages=["quantize", "tokens"]'],
                                      "puts 'tokens' after 'quantize'"),
    "unknown built-in recipe": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--recipe",
                                            "gpu-latency"],
                                "or a built-in one (cpu-latency, cpu-training-free, cpu-quick-finetune, "
                                "jetson-latency, digits-demo)"),
    "output under a file": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--out",
                                        ws / "vit.safetensors" / "run"], "vit.safetensors is a file"),
    "existing RUN_DIR": (lambda ws: ["run", ws / "vit.safetensors", "--data", ws / "data", "--out", ws / "data"],
                         "not a run directory"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_is_one_line_and_changes_nothing(workspace, case):
    make_args, message = BAD_RUNS[case]
    args = make_args(workspace)
    before = _snapshot(workspace)
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert _snapshot(workspace) == before  # no file the user had was changed, and nothing was added


@pytest.mark.slow
def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(tmp_path / "x.pt"), "--data", "builtin:digits"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: checkpoint") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_help_does_not_import_runtimes():
    code = ("import sys; from typer.testing import CliRunner; from compress.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('openvino', 'onnxruntime', 'tensorrt', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_help_renders_as_written_and_names_the_choices():
    """Rich markup once ate "[model], [data]" out of --recipe's help; every fixed set of values is listed."""
    # As read, whatever the wrapping (click may break a line after a hyphen, as in "digits-" / "demo").
    run = " ".join(CliRunner().invoke(app, ["run", "--help"]).output.split()).replace("- ", "-")
    assert "[model], [preprocess], [data]" in run and "[pipeline]" in run
    assert "cpu-latency, cpu-training-free, cpu-quick-finetune, jetson-latency, digits-demo" in run
    assert "torch, onnxruntime, openvino, tensorrt" in run
    deploy = " ".join(CliRunner().invoke(app, ["deploy", "--help"]).output.split())
    assert "cpu-x86, cpu-arm, jetson-orin" in deploy and "--sign" in deploy
