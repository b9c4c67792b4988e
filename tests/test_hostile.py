"""Hostile and careless input: every file from a user or a device is a suspect.

One test per defect found by trying the product as a careless and as a hostile user would (data loss, bundles
that could be subverted, accuracy that was silently wrong, tracebacks instead of one line), and property-based
tests (hypothesis) that feed random bytes, truncations and mutations of real checkpoints, records and manifests
to the loaders: each answers with its one error type (one line at the CLI) or a valid result, never anything
else, and never changes a file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from calibration.datasets import FolderSource, Subset
from calibration.preprocess import Preprocess
from compress.deploy.runner import (MANIFEST, BundleError, bench, check_manifest, manifest_digest, open_engine,
                                    verify)
from compress.model.checkpoint import Checkpoint, save_checkpoint
from compress.cli import app
from compress.config import load_config
from compress.deploy.bundle import deploy
from compress.errors import USER_ERRORS
from compress.model.importers import load_checkpoint
from compress.run.pipeline import run_pipeline
from compress.records import RecordsError, StageRecord, read_records
from tests.conftest import TINY, write_digit_folder

FAST = ["measure.iterations=3", "measure.max_seconds=0.3", "measure.warmup=1", "data.calib_size=20",
        "quantize.enabled=false", 'measure.runtimes=["onnxruntime"]', "measure.batch_sizes=[1]"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny ViT whose checkpoint records no class names ("0".."9"), digits in folders named by word."""
    root = tmp_path_factory.mktemp("hostile")
    write_digit_folder(root / "data", per_class=12)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i, word in enumerate(words):
        (root / "data" / str(i)).rename(root / "data" / word)
    torch.manual_seed(0)
    from compress.model.vit import ViTConfig, VisionTransformer

    model = VisionTransformer(ViTConfig(**TINY)).eval()
    save_checkpoint(Checkpoint(model, Preprocess(crop_size=32), [str(i) for i in range(10)]), root / "vit.safetensors")
    torch.save(model.state_dict(), root / "vit.pth")
    return root


@pytest.fixture(scope="module")
def run_dir(ws):
    from compress.model.importers import load_configured

    config = load_config(None, [f'data.path="{ws / "data"}"', *FAST])
    run_pipeline(load_configured(ws / "vit.safetensors", config), "tiny", config, ws / "run")
    return ws / "run"


@pytest.fixture(scope="module")
def pristine_bundle(run_dir, ws):
    return deploy(run_dir, "cpu-x86", ws / "bundle", log=lambda *_: None)


@pytest.fixture
def bundle(pristine_bundle, tmp_path):
    copy_ = tmp_path / "bundle"
    shutil.copytree(pristine_bundle, copy_)
    return copy_


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------------------------- data loss
def test_bench_into_a_run_directory_is_refused_and_changes_nothing(run_dir, bundle):
    before = _snapshot(run_dir)
    line = _one_line(invoke("bench", bundle, "--out", run_dir, "--seconds", "0.1", "--batch", "1"))
    assert "is a run directory of `compress run`" in line
    assert _snapshot(run_dir) == before


def test_a_second_bench_appends_to_the_first(bundle, tmp_path):
    for _ in range(2):
        bench(bundle, batch_sizes=[1], seconds=0.1, iterations=3, warmup=1, log=lambda *_: None)
    [records] = list((bundle / "device").glob("*/records.jsonl"))
    assert len(read_records(records)) == 2  # the first bench's row is still there
    out = tmp_path / "device"
    bench(bundle, batch_sizes=[1], seconds=0.1, iterations=3, warmup=1, out=out, log=lambda *_: None)
    bench(bundle, batch_sizes=[1], seconds=0.1, iterations=3, warmup=1, out=out, log=lambda *_: None)
    assert len(read_records(out / "records.jsonl")) == 2
    verify(bundle)  # what bench wrote is the runner's own, not an unlisted file


def test_bench_never_writes_through_a_planted_link(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "records.jsonl").write_text("precious\n")
    (bundle / "device").mkdir()
    import socket

    (bundle / "device" / f"{socket.gethostname()}-onnxruntime").symlink_to(outside)
    with pytest.raises(BundleError, match="is a symbolic link"):
        bench(bundle, batch_sizes=[1], seconds=0.1, log=lambda *_: None)
    assert (outside / "records.jsonl").read_text() == "precious\n"
    link_out = tmp_path / "dev"
    link_out.mkdir()
    (link_out / "records.jsonl").symlink_to(outside / "records.jsonl")  # --out of the user's, a link as its file
    (bundle / "device" / f"{socket.gethostname()}-onnxruntime").unlink()
    with pytest.raises(BundleError, match="cannot write the records"):
        bench(bundle, batch_sizes=[1], seconds=0.1, out=link_out, log=lambda *_: None)
    assert (outside / "records.jsonl").read_text() == "precious\n"


@pytest.mark.slow
def test_second_run_on_the_same_out_is_refused_while_the_first_holds_it(ws, run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from compress.io import exclusive\n"
         "with exclusive(Path(sys.argv[1]), what='`compress run`'):\n    print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)  # the product's own lock, in another process
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".run.json.abc.tmp").write_text("the other process is writing this")
        before = _snapshot(out)
        line = _one_line(invoke("run", ws / "vit.safetensors", "--data", ws / "data", "--out", out,
                                *[x for s in FAST for x in ("--set", s)]))
        assert f"is in use by another `compress run` (PID {holder.pid})" in line
        assert _snapshot(out) == before  # its temporary file was not cleaned away under it
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_rejected_run_leaves_nothing_that_blocks_the_corrected_one(ws, tmp_path):
    out = tmp_path / "run"
    base = ["run", ws / "vit.safetensors", "--data", ws / "data", "--out", out, *[x for s in FAST for x in ("--set", s)]]
    _one_line(invoke(*base, "--set", "measure.batch_sizes=[0]"))
    assert not out.exists()
    assert invoke(*base).exit_code == 0


# ---------------------------------------------------------------------------------------- bundle integrity
def test_bundle_identity_is_printed_recorded_and_checked(run_dir, bundle, tmp_path):
    digest = manifest_digest(json.loads((bundle / MANIFEST).read_text()))
    recorded = [json.loads(line) for line in (run_dir / "bundles.jsonl").read_text().splitlines()]
    assert any(r["digest"] == digest for r in recorded)
    verify(bundle, expect=digest)
    verify(bundle, expect=digest.removeprefix("sha256:").upper())
    # Anything edited in the manifest: class names, preprocessing, the model's path, the file list
    edits = {
        "classes": lambda m: m["classes"].reverse(),
        "preprocessing": lambda m: m["preprocess"].update(mean=[0.0, 0.0, 0.0]),
        "a file's hash": lambda m: m["files"].update({"README.md": "0" * 64}),
    }
    for name, edit in edits.items():
        edited = tmp_path / name
        shutil.copytree(bundle, edited)
        _edit_manifest(edited, edit)
        with pytest.raises(BundleError, match="not the expected sha256:"):
            verify(edited, expect=digest)
    line = _one_line(invoke("bench", tmp_path / "classes", "--expect", digest, "--seconds", "0.1"))
    assert "not the expected" in line


@pytest.mark.parametrize("case", ["outside", "absolute", "another file", "unlisted model", "empty files",
                                  "no files", "bf16 on ORT", "listed numpy.py", "classes vs output"])
def test_edited_manifest_is_refused_in_one_line(bundle, case):
    (bundle.parent / "outside.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    edits = {
        "outside": lambda m: m["models"][0].update(path="../outside.onnx"),
        "absolute": lambda m: m["files"].update({str(bundle.parent / "outside.onnx"): "0" * 64}),
        "another file": lambda m: m["models"][0].update(path="runner.py"),
        "unlisted model": lambda m: m["models"][0].update(path="other.onnx"),
        "empty files": lambda m: m.update(files={}),
        "no files": lambda m: m.pop("files"),
        "bf16 on ORT": lambda m: [e.update(precision="bf16") for e in m["models"] if e["runtime"] == "onnxruntime"],
        "listed numpy.py": lambda m: m["files"].update({"numpy.py": hashlib.sha256(b"").hexdigest()}),
        "classes vs output": lambda m: m["classes"].pop(),
    }
    _edit_manifest(bundle, edits[case])
    (bundle / "numpy.py").write_bytes(b"")
    with pytest.raises(BundleError) as error:
        verify(bundle)
    assert "\n" not in str(error.value) and "manifest.json" in str(error.value)
    assert _one_line(invoke("bench", bundle, "--seconds", "0.1")).startswith("error: ")


@pytest.mark.slow
def test_unlisted_files_are_refused_and_never_imported(bundle, tmp_path):
    marker = tmp_path / "planted-code-ran"
    (bundle / "numpy.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    proc = subprocess.run([sys.executable, str(bundle / "runner.py"), "verify"], capture_output=True, text=True,
                          cwd=bundle, timeout=120)
    assert proc.returncode == 1 and "numpy.py is not listed in manifest.json" in proc.stderr, proc.stderr
    assert not marker.exists()  # `python runner.py` no longer imports from its own folder first
    (bundle / "numpy.py").unlink()
    (bundle / "runtimes" / "__pycache__").mkdir()
    (bundle / "runtimes" / "__pycache__" / "base.cpython-311.pyc").write_bytes(b"planted")
    with pytest.raises(BundleError, match="not listed in manifest.json"):
        verify(bundle)


def test_signed_bundle_verifies_with_its_key_only(run_dir, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {}
    for name in ("ours", "theirs"):
        key = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                 serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
        keys[name] = tmp_path / f"{name}.pub.pem"
        keys[name].write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    result = invoke("deploy", run_dir, "--target", "cpu-x86", "--out", tmp_path / "signed", "--sign",
                    tmp_path / "ours.pem")
    assert result.exit_code == 0, result.output
    signed = tmp_path / "signed"
    verify(signed, public_key=keys["ours"])
    with pytest.raises(BundleError, match="signed with another key"):
        verify(signed, public_key=keys["theirs"])
    _edit_manifest(signed, lambda m: m["classes"].reverse())
    with pytest.raises(BundleError, match="changed after signing"):
        verify(signed, public_key=keys["ours"])
    line = _one_line(invoke("deploy", run_dir, "--target", "cpu-x86", "--out", tmp_path / "b2", "--sign",
                            keys["ours"]))
    assert "cannot read signing key" in line and not (tmp_path / "b2").exists()


# ------------------------------------------------------------------------------- silently wrong accuracy
def test_sixteen_bit_images_read_as_their_eight_bit_twins(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 24, 24), dtype=np.uint8)
    for root, bits in ((tmp_path / "eight", 8), (tmp_path / "sixteen", 16)):
        for label, image in enumerate(grey):
            (root / str(label)).mkdir(parents=True)
            values = image.astype(np.uint16) * 257 if bits == 16 else image
            Image.fromarray(values).save(root / str(label) / "x.png")
    assert Image.open(tmp_path / "sixteen" / "0" / "x.png").mode.startswith("I;16")
    preprocess = Preprocess(crop_size=24, in_chans=1, mean=(0.5,), std=(0.5,))
    decoded = [Subset(FolderSource(root), np.arange(2), preprocess).decode_uint8()
               for root in (tmp_path / "eight", tmp_path / "sixteen")]
    np.testing.assert_array_equal(decoded[0], decoded[1])  # was: every 16-bit value above 255 saturated to white
    Image.fromarray(grey[0].astype(np.float32)).save(tmp_path / "sixteen" / "0" / "f.tiff")
    with pytest.raises(Exception, match="32-bit float image has no agreed value range") as error:
        Subset(FolderSource(tmp_path / "sixteen"), np.arange(3), preprocess).decode_uint8()
    assert isinstance(error.value, USER_ERRORS)


@pytest.mark.parametrize("setting,message", [
    ("preprocess.std=[0.0]", "std [0.0] must be positive"),
    ("preprocess.std=[0.5, -0.5, 0.5]", "must be positive"),
    ("preprocess.mean=[0.5, 0.5]", "need 3 value(s) each, one per input channel"),
    ("preprocess.crop_size=0", "preprocess.crop_size: Input should be greater than or equal to 1"),
    ("preprocess.resize_size=16", "resize_size=16 must be a whole number no smaller than crop_size 32"),
    ("measure.batch_sizes=[0]", "measure.batch_sizes.0: Input should be greater than or equal to 1"),
    ("measure.batch_sizes=[-1]", "greater than or equal to 1"),
    ("measure.batch_sizes=[]", "measure.batch_sizes: List should have at least 1 item"),
    ("measure.threads=-1", "measure.threads: Input should be greater than or equal to 1"),
])
def test_impossible_settings_fail_before_any_work(ws, tmp_path, setting, message):
    before = _snapshot(ws)
    line = _one_line(invoke("run", ws / "vit.safetensors", "--data", ws / "data", "--out", tmp_path / "run",
                            "--set", setting))
    assert message in line, line
    assert not (tmp_path / "run").exists() and _snapshot(ws) == before


# ------------------------------------------------------------------- the bundle is what the run chose
def test_deploy_packs_what_the_run_chose_with_the_dataset_class_names(run_dir, pristine_bundle, ws, tmp_path):
    chain = json.loads((run_dir / "stages" / "pipeline.json").read_text())
    manifest = verify(pristine_bundle)
    assert manifest["selected"]["record"]["id"] == chain["selected"]["record"]
    assert manifest["classes"][:3] == ["eight", "five", "four"]  # the folders' names, not "0".."9"
    image = next((ws / "data" / "seven").glob("*.png"))
    proc = subprocess.run([sys.executable, str(pristine_bundle / "runner.py"), "classify", str(image), "--top", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split(": ")[1].split()[0] in manifest["classes"], proc.stderr
    # the very dataset the run read, laid out as train/ beside test/, is accepted by the runner
    split = tmp_path / "split"
    shutil.copytree(ws / "data", split / "test")
    shutil.copytree(ws / "data", split / "train")
    _, rows = bench(pristine_bundle, data=split, batch_sizes=[1], seconds=0.1, iterations=3, out=tmp_path / "d",
                    log=lambda *_: None)
    assert rows[0]["eval_samples"] == 120


def test_no_runtime_is_offered_a_precision_it_cannot_run(run_dir, tmp_path):
    from compress.deploy.bundle import TARGETS, _write_models

    ok = next(r for r in read_records(run_dir / "records.jsonl") if r.status == "ok")
    record = StageRecord(**{**ok.__dict__, "runtime": "openvino", "precision": "bf16"})
    (tmp_path / "b").mkdir()
    models = _write_models(run_dir / ok.artifact, record, TARGETS["cpu-x86"], tmp_path / "b")
    assert [(m["runtime"], m["precision"], m["measured"]) for m in models] == [
        ("openvino", "bf16", True), ("onnxruntime", "fp32", False)]
    # And where a runtime is installed but cannot run what a (hand-made) manifest asks, the fix is not "install it"
    manifest = {"models": [{"runtime": "onnxruntime", "path": "model.onnx", "precision": "bf16"}],
                "selected": {"runtime": "onnxruntime"}}
    with pytest.raises(BundleError) as error:
        open_engine(tmp_path / "b", manifest)
    assert "onnxruntime cannot run this bundle's bf16 model" in str(error.value)
    assert "pip install" not in str(error.value)


# ------------------------------------------------------------------------ one line, never a traceback
def _weights_only_refused(ws):
    torch.save({"a": np.zeros(3)}, ws / "objects.pth")  # a numpy array: not a tensor, refused by weights_only
    return ws / "objects.pth"


BAD_FILES = {
    "empty .pth": (lambda ws: (ws / "empty.pth").write_bytes(b"") and None or ws / "empty.pth", "is an empty file"),
    # random bytes that start like neither torch's zip format (PK) nor a pickle (0x80): one in 256 random files
    # starts with 0x80, and each such file is the next case
    "random bytes": (lambda ws: (ws / "random.pth").write_bytes(b"\0" + os.urandom(4095)) and ws / "random.pth",
                     "not a PyTorch or safetensors checkpoint"),
    # garbage after a pickle's first byte: refused by the weights-only unpickler like a pickle of objects, but it is
    # damage, not code (it was once reported as "contains code or Python objects")
    "random bytes after a pickle's first byte": (
        lambda ws: (ws / "garbled.pth").write_bytes(b"\x80" + random.Random(0).randbytes(4095)) and ws / "garbled.pth",
        "the file is truncated or corrupt"),
    "text": (lambda ws: (ws / "text.pth").write_text("weights\n" * 50) and ws / "text.pth",
             "not a PyTorch or safetensors checkpoint"),
    "pickle of objects": (_weights_only_refused, "contains code or Python objects other than tensors"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_files_are_one_line(ws, tmp_path, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    line = _one_line(invoke("run", path, "--data", ws / "data", "--out", tmp_path / "run"))
    assert message in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "--batch 0: a batch size is a whole number from 1 to 4096"),
    (["--batch", "-1"], "--batch -1"),
    (["--seconds", "-5"], "--seconds -5.0 must be a positive number"),
])
@pytest.mark.slow
def test_bad_bench_options_are_one_line_and_write_nothing(bundle, args, message):
    before = _snapshot(bundle)
    assert message in _one_line(invoke("bench", bundle, *args))
    proc = subprocess.run([sys.executable, str(bundle / "runner.py"), "bench", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert _snapshot(bundle) == before


@pytest.mark.slow
def test_runner_bench_into_an_unwritable_place_is_one_line(bundle, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run([sys.executable, str(bundle / "runner.py"), "bench", "--seconds", "0.1", "--batch", "1",
                           "--out", str(tmp_path / "a-file" / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot write the records"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_disk_while_saving_is_one_line(ws, tmp_path):
    """A file-size limit stands in for a full disk: the same write fails with the operating system's error."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        from compress.cli import main
        sys.argv = ["compress", "run", {str(ws / "vit.safetensors")!r}, "--data", {str(ws / "data")!r}, "--out",
                    {str(tmp_path / "run")!r}, *{[x for s in FAST for x in ("--set", s)]!r}]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "error: cannot write" in proc.stderr and "File too large" in proc.stderr
    assert not list((tmp_path / "run").rglob(".*.tmp"))  # nothing half-written left behind


def test_report_names_the_damaged_line(run_dir, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    lines = (damaged / "records.jsonl").read_text().splitlines()
    lines = [lines[0], "", *lines[1:]]  # a blank line is no record, but it is a line
    lines[2] = lines[2][: len(lines[2]) // 2]
    (damaged / "records.jsonl").write_text("\n".join(lines) + "\n")
    assert "records.jsonl, line 3: not a record" in _one_line(invoke("report", damaged))
    lines[2] = json.dumps({**json.loads(lines[0]), "top1": "75%"})
    (damaged / "records.jsonl").write_text("\n".join(lines) + "\n")
    assert "line 3: not a record (field 'top1' is str '75%'" in _one_line(invoke("report", damaged))


# --------------------------------------------------------------------------------------- property-based
# Derandomized, so CI is reproducible; HOSTILE_EXAMPLES=400 searches further (run so before this change: 5 passed).
HYPOTHESIS = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 40)), deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def _damaged(data: bytes):
    """Random bytes, truncations of ``data``, and ``data`` with a few bytes flipped."""
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, max(0, len(data) - 1)).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
            lambda flips: bytes(b ^ dict(flips).get(i, 0) for i, b in enumerate(data))),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit.safetensors", "vit.pth"])
def test_damaged_checkpoints_are_a_checkpoint_error(ws, tmp_path, name):
    data = (ws / name).read_bytes()
    before = _snapshot(ws)

    @HYPOTHESIS
    @given(_damaged(data))
    def check(blob):
        path = tmp_path / name
        path.write_bytes(blob)
        try:
            load_checkpoint(path)
        except USER_ERRORS as e:
            assert "\n" not in str(e)
        # a few flipped bytes inside a weight load as other weights: that is the file's content, not an error

    check()
    assert _snapshot(ws) == before


def test_damaged_records_are_a_records_error(run_dir, tmp_path):
    data = (run_dir / "records.jsonl").read_bytes()

    @HYPOTHESIS
    @given(_damaged(data))
    def check(blob):
        path = tmp_path / "records.jsonl"
        path.write_bytes(blob)
        try:
            records = read_records(path)
        except RecordsError as e:
            assert "\n" not in str(e) and "line " in str(e) or "UTF-8" in str(e)
        else:
            assert all(isinstance(r.batch_size, int) and r.batch_size >= 1 for r in records)

    check()


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def test_damaged_manifests_are_a_bundle_error(pristine_bundle, tmp_path):
    original = json.loads((pristine_bundle / MANIFEST).read_text())
    paths = [p for p in _paths(original) if p]
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine_bundle, bundle)
    before = {k: v for k, v in _snapshot(bundle).items() if k != MANIFEST}

    @HYPOTHESIS
    @given(st.one_of(_damaged(json.dumps(original).encode()).map(lambda b: ("bytes", b)),
                     st.tuples(st.sampled_from(paths), _JSON).map(lambda e: ("value", e))))
    def check(change):
        kind, what = change
        if kind == "bytes":
            (bundle / MANIFEST).write_bytes(what)
        else:
            path, value = what
            manifest = copy.deepcopy(original)
            node = manifest
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            (bundle / MANIFEST).write_text(json.dumps(manifest))
        try:
            manifest = verify(bundle)
        except BundleError as e:
            assert "\n" not in str(e)
        else:
            check_manifest(manifest)  # what verified is a manifest the runner can use in full

    check()
    assert {k: v for k, v in _snapshot(bundle).items() if k != MANIFEST} == before


@pytest.mark.parametrize("settings,message", [
    (["prune.target_macs=0.5", "prune.target_latency_ms=3.0"], "config prune: set one of prune.target_macs and "
                                                               "prune.target_latency_ms, not both"),
    (["prune.target_macs=0.5", "prune.iterations=2"], "config prune: prune.iterations > 1 works with"),
    (["tokens.method='evit'", "tokens.r=4"],
     "config tokens: tokens.r belongs to tokens.method='tome' or 'pitome', not 'evit'"),
])
def test_conflicting_settings_fail_before_the_baseline_is_measured(ws, tmp_path, settings, message):
    """Conflicts that were found only inside their stage, after the baseline was exported and measured."""
    args = [x for s in ["prune.enabled=true", *settings] for x in ("--set", s)]
    line = _one_line(invoke("run", ws / "vit.safetensors", "--data", ws / "data", "--out", tmp_path / "run", *args))
    assert message in line, line
    assert not (tmp_path / "run").exists()


def test_error_lines_print_brackets_as_written(ws, tmp_path):
    """Rich read "[preprocess]" in a message as markup and dropped it ("set it in  or with --set")."""
    line = _one_line(invoke("run", ws / "vit.safetensors", "--data", ws / "data", "--out", tmp_path / "[run]",
                            "--set", "preprocess.mean=[0.5, 0.5]"))
    assert "set it in [preprocess] or with --set" in line, line
