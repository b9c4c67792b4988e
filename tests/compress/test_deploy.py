"""Deployment bundles: choosing, packing, the standalone runner (without torch), tampering, TensorRT absence."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration.datasets import digits_source, make_splits
from compress.deploy.runner import BundleError, bench, verify
from compress.cli import app
from compress.config import load_config
from compress.deploy.bundle import deploy
from compress.errors import InputError
from compress.run.pipeline import run_pipeline
from compress.records import read_records

pytestmark = pytest.mark.slow  # its run (pruning, INT8, two runtimes) takes 15-40 s; test_hostile covers bundles fast

# Runs the bundle's runner.py with torch and the vit-compress packages made unimportable: a bundle must work on a
# device that has only its runtime, numpy and Pillow.
STANDALONE = ("import runpy, sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'compress', 'calibration', "
              "'export', 'onnx', 'psutil')]; sys.argv = [sys.argv[1], *sys.argv[2:]]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_model):
    config = load_config(None, ['data.path="builtin:digits"', "data.calib_size=128", "quantize.calib_size=64",
                                'quantize.quantizers=["onnxruntime-static"]', "measure.iterations=5",
                                "measure.max_seconds=0.5", "measure.warmup=1", "measure.batch_sizes=[1, 4]",
                                'measure.runtimes=["onnxruntime", "openvino"]', "prune.enabled=true",
                                "prune.heads=0.5", "prune.importance=l2"])
    run = tmp_path_factory.mktemp("deploy") / "run"
    run_pipeline(digits_model, "digits", config, run)
    return run


@pytest.fixture(scope="module")
def digits_eval_folder(tmp_path_factory):
    """The run's evaluation split of the digits, written losslessly as an ImageFolder."""
    source = digits_source()
    root = tmp_path_factory.mktemp("digits-eval")
    for i in make_splits(source, calib_size=128, seed=0).eval:
        folder = root / source.classes[source.labels[i]]
        folder.mkdir(exist_ok=True)
        source.load(int(i)).save(folder / f"{i:04d}.png")
    return root


def _standalone(bundle, *args, cwd):
    return subprocess.run([sys.executable, "-c", STANDALONE, str(bundle / "runner.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cpu_bundle_holds_the_fastest_candidate_within_budget_and_checksums(run_dir, tmp_path):
    bundle = deploy(run_dir, "cpu-x86", tmp_path / "bundle", log=lambda *_: None)
    manifest = verify(bundle)
    records = [r for r in read_records(run_dir / "records.jsonl") if r.status == "ok" and r.batch_size == 1
               and r.runtime in ("onnxruntime", "openvino") and r.top1_drop <= 1.0]
    fastest = min(records, key=lambda r: r.latency_ms_p50)
    chosen = manifest["selected"]
    assert (chosen["measured_runtime"], chosen["precision"]) == (fastest.runtime, fastest.precision)
    assert chosen["top1"] == fastest.top1 and chosen["budget_pt"] == 1.0
    assert manifest["input"]["shape"] == ["batch", 1, 8, 8] and manifest["classes"][3] == "3"
    assert {"runner.py", "preprocess.py", "env.py", "requirements.txt", "runtimes/base.py"} <= set(manifest["files"])
    assert "runtimes/torch_eager.py" not in manifest["files"]
    if fastest.runtime == "openvino":
        assert (bundle / "openvino" / "model.xml").is_file() and (bundle / "openvino" / "model.bin").is_file()
    assert "torch" not in (bundle / "requirements.txt").read_text()
    with tarfile.open(tmp_path / "bundle.tar.gz") as tar:
        assert "bundle/manifest.json" in tar.getnames()
    assert (tmp_path / "bundle.tar.gz.sha256").read_text().split()[1] == "bundle.tar.gz"


def test_standalone_runner_classifies_and_benchmarks_without_torch(run_dir, digits_eval_folder, tmp_path):
    bundle = deploy(run_dir, "cpu-x86", tmp_path / "bundle", runtime="onnxruntime", log=lambda *_: None)
    image = next(digits_eval_folder.glob("7/*.png"))
    result = _standalone(bundle, "classify", image, "--top", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(image)) and result.stdout.count(" 0.") + result.stdout.count(" 1.") == 2
    out = tmp_path / "device"
    result = _standalone(bundle, "bench", "--data", digits_eval_folder, "--batch", "1", "4", "--seconds", "0.5",
                         "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert all(r["stage"] == "deployed" and r["schema"] == "vit-compress.record/1" and r["latency_ms_p50"] > 0
               for r in rows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    # the same images, preprocessing and model give the top-1 the run recorded, exactly
    assert rows[0]["top1"] == pytest.approx(manifest["selected"]["top1"], abs=1e-9)
    assert rows[0]["eval_samples"] == manifest["selected"]["eval_samples"]
    # device records join the report beside the run's
    report = CliRunner().invoke(app, ["report", str(run_dir), str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "deployed" in (tmp_path / "report" / "report.html").read_text()


def test_openvino_bundle_fills_its_model_cache(run_dir, tmp_path):
    bundle = deploy(run_dir, "cpu-x86", tmp_path / "bundle", runtime="openvino", log=lambda *_: None)
    assert json.loads((bundle / "manifest.json").read_text())["models"][0]["path"] == "openvino/model.xml"
    _, rows = bench(bundle, batch_sizes=[1], seconds=0.2, iterations=5, log=lambda *_: None)
    assert any((bundle / "cache" / "openvino").iterdir())  # a second start reads the compiled model from here
    assert rows[0]["env"]["startup_s"] > 0
    verify(bundle)  # what the runner adds (cache, device records) is outside the checksummed files


def test_an_arm_bundle_holds_no_openvino_int8_which_the_arm_plugin_got_wrong(run_dir, tmp_path):
    int8 = next(r for r in read_records(run_dir / "records.jsonl")
                if r.runtime == "openvino" and r.precision == "int8" and r.status == "ok")
    with pytest.raises(InputError, match="cpu-arm bundles do not hold openvino INT8: .*11.8% top-1"):
        deploy(run_dir, "cpu-arm", tmp_path / "ov-int8", candidate=int8.candidate, runtime="openvino", max_drop=100,
               log=lambda *_: None)
    assert not (tmp_path / "ov-int8").exists()
    # left to choose, it takes OpenVINO in FP32, which gave x86's top-1 on aarch64
    bundle = deploy(run_dir, "cpu-arm", tmp_path / "ov", runtime="openvino", max_drop=100, log=lambda *_: None)
    assert json.loads((bundle / "manifest.json").read_text())["selected"]["precision"] == "fp32"
    # an ONNX Runtime INT8 bundle offers no OpenVINO alternative: OpenVINO would run its Q/DQ file in INT8
    bundle = deploy(run_dir, "cpu-arm", tmp_path / "ort", candidate=int8.candidate, runtime="onnxruntime",
                    max_drop=100, log=lambda *_: None)
    assert [m["runtime"] for m in json.loads((bundle / "manifest.json").read_text())["models"]] == ["onnxruntime"]
    # on x86 the same file keeps its OpenVINO alternative
    bundle = deploy(run_dir, "cpu-x86", tmp_path / "x86", candidate=int8.candidate, runtime="onnxruntime",
                    max_drop=100, log=lambda *_: None)
    assert {m["runtime"] for m in json.loads((bundle / "manifest.json").read_text())["models"]} == \
        {"onnxruntime", "openvino"}


def test_tampered_bundle_is_refused_in_one_line(run_dir, tmp_path):
    bundle = deploy(run_dir, "cpu-arm", tmp_path / "bundle", log=lambda *_: None)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its SHA-256"):
        verify(bundle)
    result = CliRunner().invoke(app, ["bench", str(bundle)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "does not match its SHA-256" in lines[0]
    assert _standalone(bundle, "verify", cwd=tmp_path).returncode == 1


def test_jetson_bundle_carries_onnx_and_build_engine_says_what_is_missing(run_dir, tmp_path):
    bundle = deploy(run_dir, "jetson-orin", tmp_path / "bundle", max_drop=100, log=lambda *_: None)
    manifest = verify(bundle)
    assert manifest["models"][0]["runtime"] == "tensorrt" and manifest["models"][0]["path"] == "model.onnx"
    assert manifest["selected"]["precision"] == "int8"  # a Q/DQ file within budget is TensorRT's first choice
    assert "build-engine" in (bundle / "README.md").read_text()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = CliRunner().invoke(app, ["build-engine", str(bundle)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "TensorRT is not installed" in lines[0]
    else:
        pytest.skip("TensorRT is installed here: building is tested in tests/runtimes/test_tensorrt.py")


BAD_DEPLOYS = {
    "unknown target": (["--target", "cpu-risc"], "unknown target 'cpu-risc'"),
    "runtime not of the target": (["--target", "cpu-x86", "--runtime", "tensorrt"],
                                  "runtime 'tensorrt' is not one of target cpu-x86's"),
    "no candidate within budget": (["--target", "cpu-x86", "--candidate", "prune", "--max-drop", "0"],
                                   "no candidate of the run is within the 0 pt budget"),
    "negative budget": (["--target", "cpu-x86", "--max-drop", "-1"], "--max-drop -1 is negative"),
    "unknown candidate": (["--target", "cpu-x86", "--candidate", "nope"], "no record of candidate 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD_DEPLOYS))
def test_bad_deploy_is_one_line_and_writes_nothing(run_dir, tmp_path, case):
    args, message = BAD_DEPLOYS[case]
    pruned = [r for r in read_records(run_dir / "records.jsonl") if r.stage == "prune" and r.status == "ok"]
    assert min(r.top1_drop for r in pruned) > 0  # half the heads gone, no recovery: the budget case is real
    result = CliRunner().invoke(app, ["deploy", str(run_dir), *args, "--out", str(tmp_path / "b")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_target_whose_runtime_the_run_did_not_measure(run_dir, tmp_path):
    only_ort = tmp_path / "run"
    only_ort.mkdir()
    rows = [line for line in (run_dir / "records.jsonl").read_text().splitlines()
            if json.loads(line)["runtime"] == "onnxruntime"]
    (only_ort / "records.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="the run has no measurements on openvino, the runtime.* `--runtime openvino`"):
        deploy(only_ort, "cpu-x86", tmp_path / "b", runtime="openvino", log=lambda *_: None)


def test_existing_bundle_and_non_run_directories_are_refused(run_dir, tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match="already exists"):
        deploy(run_dir, "cpu-x86", tmp_path / "b", log=lambda *_: None)
    with pytest.raises(InputError, match="is not a run directory"):
        deploy(tmp_path, "cpu-x86", tmp_path / "c", log=lambda *_: None)
    with pytest.raises(BundleError, match="is not a deployment bundle"):
        verify(tmp_path)


def test_runner_refuses_images_of_unknown_classes(run_dir, tmp_path):
    bundle = deploy(run_dir, "cpu-x86", tmp_path / "bundle", log=lambda *_: None)
    (tmp_path / "data" / "cat").mkdir(parents=True)
    np.save(tmp_path / "data" / "cat" / "x.npy", np.zeros(1))
    with pytest.raises(BundleError, match=r"class folders \['cat'\] the model does not know"):
        bench(bundle, data=tmp_path / "data", log=lambda *_: None)
