"""Interruption and faults, for real: a `compress run` subprocess killed mid-stage, then the same command again."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compress.model.checkpoint import save_checkpoint
from compress.config import load_config
from compress.run.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # every test here starts `compress run` subprocesses and kills them

SETTINGS = ["--set", "data.calib_size=128", "--set", "quantize.enabled=false", "--set", "measure.iterations=3",
            "--set", "measure.max_seconds=0.3", "--set", "measure.warmup=1", "--set", "measure.batch_sizes=[1]",
            "--set", 'measure.runtimes=["onnxruntime"]', "--set", "data.eval_limit=64", "--set", "prune.enabled=true",
            "--set", "prune.heads=0.25", "--set", "prune.importance=l2", "--set", "recover.epochs=6",
            "--set", "recover.batch_size=32"]


def _command(ckpt: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "compress.cli", "run", str(ckpt), "--data", "builtin:digits", "--out", str(run),
            *SETTINGS]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be interrupted: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the point to interrupt it")
        time.sleep(0.05)


def _half_written(run: Path) -> list[Path]:
    """Temporary files of atomic writes, and artifacts no finished stage accounts for."""
    import json

    referenced = set()
    for marker in (run / "stages").glob("*.json"):
        data = json.loads(marker.read_text())
        referenced |= {data.get("checkpoint"), data.get("onnx")}
    stray = [p for p in run.rglob("*.tmp")]
    stray += [p for p in (run / "artifacts").glob("*") if p.is_file() and p.name not in referenced]
    return stray


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_stage_leaves_nothing_half_written_and_the_rerun_resumes(tmp_path, digits_model, sig):
    ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors")
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(ckpt, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt during recovery, after it has saved its first training state (at the end of an epoch).
    _wait_for(lambda: any((run / "stages").glob("recover-*/recover-final.pt")), 300, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; rerun the same command to resume" in err
    assert not (run / "stages" / "recover.json").exists()
    assert _half_written(run) == []
    again = subprocess.run(_command(ckpt, run), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resumed: stages baseline, prune were done in an earlier run" in again.stderr
    assert "resuming training at step" in again.stderr  # recovery went on from its saved state, not from zero
    assert (run / "stages" / "recover.json").exists() and _half_written(run) == []


def test_sigkill_mid_stage_then_the_rerun_cleans_up_and_finishes(tmp_path, digits_model):
    ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors")
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(ckpt, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (run / "stages" / "prune.json").exists(), 300, proc)
    proc.kill()  # no handler runs: whatever was being written stays as a temporary file
    proc.wait(timeout=60)
    leftover = run / "artifacts" / ".recover-left.safetensors.x.tmp"  # what a kill during a write leaves
    leftover.write_bytes(b"partial")
    again = subprocess.run(_command(ckpt, run), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert not leftover.exists() and _half_written(run) == []


def test_unwritable_output_is_one_clear_error(tmp_path, digits_model):
    ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors")
    result = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(ckpt), "--data", "builtin:digits",
                             "--out", "/proc/vit-compress-run"], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot write the run directory /proc/vit-compress-run")


def test_full_disk_is_one_clear_error_and_the_rerun_resumes(tmp_path, digits_model):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a 600 kB tmpfs, which needs root and mount(8)")
    try:
        ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors")
        run = mount / "run"
        result = subprocess.run(_command(ckpt, run)[:-4], capture_output=True, text=True, timeout=600)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
        assert result.returncode == 1, result.stderr
        assert lines[-1].startswith("error: cannot write") and "No space left on device" in lines[-1]
        assert list(run.rglob("*.tmp")) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_twenty_repeated_runs_leave_no_stray_files_threads_or_handles(tmp_path, digits_model):
    config = load_config(None, ['data.path="builtin:digits"', "data.calib_size=128", "quantize.enabled=false",
                                "measure.iterations=3", "measure.max_seconds=0.2", "measure.warmup=1",
                                "measure.batch_sizes=[1]", 'measure.runtimes=["onnxruntime", "openvino"]',
                                "data.eval_limit=64"])
    run = tmp_path / "run"
    run_pipeline(digits_model, "digits", config, run)
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(20):
        result = run_pipeline(digits_model, "digits", config, run)
        assert result.resumed_stages == ["baseline"]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files
    assert len(os.listdir("/proc/self/fd")) <= fds and threading.active_count() <= threads
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    assert children == []
