"""A model is scored in full on one runtime; the others score a sample and are checked against it
(``compress.run.measure.score``): the estimate, its interval, the record's account of it, and the fall-back to a
full score where a runtime disagrees."""

import numpy as np
import pytest
import torch

import compress
from calibration.evaluate import EvalResult, evaluate_top1
from compress.config import load_config
from compress.model.vit import VisionTransformer
from compress.run.context import RunContext
from compress.run.measure import FullScore, sampled_accuracy, score
from runtimes import get_runtime


def _result(correct: np.ndarray, predictions: np.ndarray) -> EvalResult:
    return EvalResult(float(correct.mean()), predictions.astype(np.int64), len(correct), correct.astype(bool),
                      len(correct))


def test_the_estimate_is_the_full_score_moved_by_the_paired_difference_on_the_sample():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000)
    full_pred = np.where(rng.random(1000) < 0.8, labels, (labels + 1) % 10)
    full = _result(full_pred == labels, full_pred)
    # on the first 200 images the other runtime loses 3 images the full one got right and wins 1 it got wrong
    other = full_pred[:200].copy()
    right = np.flatnonzero(full.correct[:200])[:3]
    wrong = np.flatnonzero(~full.correct[:200])[:1]
    other[right] = (labels[right] + 2) % 10
    other[wrong] = labels[wrong]
    sample = _result(other == labels[:200], other)
    fs = FullScore("openvino", "fp32", full, {"top1": full.top1, "top1_drop": 0.5, "top1_drop_ci95": [0.1, 0.9]})
    acc = sampled_accuracy(fs, sample, None, 1000, agree=float(np.mean(other == full_pred[:200])))
    diff = (3 - 1) / 200 * 100  # points lost on the sample
    assert acc["top1"] == pytest.approx(full.top1 - diff / 100)
    assert acc["top1_drop"] == pytest.approx(0.5 + diff) and acc["eval_samples"] == 200 and acc["eval_total"] == 1000
    low, high = acc["sampled_against"]["top1_diff_ci95"]
    assert low < diff < high  # the difference's own interval
    assert acc["top1_drop_ci95"] == pytest.approx([0.1 + low, 0.9 + high], abs=1e-3)  # widened by it
    s = acc["sampled_against"]
    assert s["runtime"] == "openvino" and s["images"] == 200 and s["agreement"] == pytest.approx(0.98)
    assert s["disagree"] == sorted(int(i) for i in np.concatenate([right, wrong]))


@pytest.mark.slow  # trains the digits model
def test_a_runtime_that_agrees_scores_a_sample_and_one_that_disagrees_is_scored_in_full(tmp_path, digits_model):
    data = compress.load_data("builtin:digits", digits_model.preprocess, calib_size=16)
    config = load_config(None, ["measure.agreement_sample=100"])
    ctx = RunContext(config=config, run_dir=tmp_path, dataset="builtin:digits", train_data=data.train,
                     calib_data=data.calib, eval_data=data.eval, teacher=None, parity_inputs=data.example(2),
                     latency_input=data.example(1), threads=2)
    total = len(data.eval)
    assert total > 100
    exported = compress.export_model(digits_model.model, tmp_path / "model.onnx", data.example(8))
    accuracy, result = score(get_runtime("onnxruntime").build(exported.path, precision="fp32", threads=2), "ort", None, ctx)
    assert accuracy["eval_samples"] == total and "sampled_against" not in accuracy
    full = FullScore("onnxruntime", "fp32", result, accuracy)

    openvino = get_runtime("openvino").build(exported.path, precision="fp32", threads=2)
    sampled, sample = score(openvino, "ov", result, ctx, full=full)
    assert sampled["eval_samples"] == sample.num_samples == 100 and sampled["eval_total"] == total
    assert sampled["sampled_against"]["runtime"] == "onnxruntime" and sampled["sampled_against"]["agreement"] >= 0.99
    actual = evaluate_top1(openvino.run, data.eval).top1  # what scoring it in full gives
    assert abs(actual - sampled["top1"]) * 100 <= max(1.0, sampled["top1_drop_ci95"][1] - sampled["top1_drop_ci95"][0])

    torch.manual_seed(1)  # another model behind the same name: it disagrees on most of the sample
    other = VisionTransformer(digits_model.model.config).eval()
    other_path = compress.export_model(other, tmp_path / "other.onnx", data.example(8)).path
    other_engine = get_runtime("openvino").build(other_path, precision="fp32", threads=2)
    accuracy, result = score(other_engine, "other", None, ctx, full=full, precision="fp32")
    assert "sampled_against" not in accuracy and accuracy["eval_samples"] == result.num_samples == total
    # Checked against a full score in another float precision (a run judged in BF16), disagreement is what rounding
    # does: the sample's estimate stands, its interval widened by the difference, and the split is not scored again.
    in_bf16 = FullScore("openvino", "bf16", full.result, full.accuracy)
    accuracy, result = score(other_engine, "other fp32", None, ctx, full=in_bf16, precision="fp32")
    assert accuracy["eval_samples"] == result.num_samples == 100 and accuracy["sampled_against"]["precision"] == "bf16"
    assert accuracy["sampled_against"]["agreement"] < 0.99
    low, high = accuracy["sampled_against"]["top1_diff_ci95"]
    assert high - low > 5  # a sample that disagrees this much says so in its interval


@pytest.mark.slow
def test_a_run_scores_the_first_runtime_in_full_and_says_which_records_come_from_a_sample(tmp_path, tiny_vit,
                                                                                        digit_folder):
    from calibration.preprocess import Preprocess
    from compress.model.checkpoint import Checkpoint
    from compress.records import read_records
    from compress.run.pipeline import run_pipeline

    config = load_config(None, [f'data.path="{digit_folder}"', "data.calib_size=20", "quantize.enabled=false",
                                "measure.iterations=3", "measure.warmup=1", "measure.batch_sizes=[1]",
                                "measure.agreement_sample=16", 'measure.runtimes=["torch", "onnxruntime", "openvino"]'])
    ckpt = Checkpoint(tiny_vit, Preprocess(crop_size=32), [str(i) for i in range(10)])
    run_pipeline(ckpt, "tiny", config, tmp_path / "run")
    ok = [r for r in read_records(tmp_path / "run" / "records.jsonl") if r.status == "ok"]
    full = [r for r in ok if r.sampled_against is None]
    assert [(r.runtime, r.precision) for r in full] == [("torch", "fp32")]
    assert full[0].eval_samples == full[0].eval_total == 40
    sampled = [r for r in ok if r.sampled_against is not None]
    assert {r.runtime for r in sampled} >= {"onnxruntime", "openvino"}
    for r in sampled:
        assert r.eval_samples == r.sampled_against["images"] == 16 and r.eval_total == 40
        assert r.sampled_against["runtime"] == "torch" and r.sampled_against["agreement"] >= 0.99
        assert r.top1_drop_ci95 is not None and r.top1_drop_ci95[0] <= r.top1_drop <= r.top1_drop_ci95[1]
        if r.sampled_against["agreement"] == 1.0:  # not a point: the 24 images not sampled may still differ
            assert r.top1_drop_ci95[1] - r.top1_drop_ci95[0] == pytest.approx(2 * 300 / 16, abs=1e-3)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "sample of 16" in report and "agree with torch fp32" in report


def _openvino_runs_bf16_natively() -> bool:
    try:
        return get_runtime("openvino").default_float == "bf16"
    except Exception:
        return False


@pytest.mark.slow  # trains the digits model
def test_a_run_judged_in_bf16_scores_every_float_model_and_setting_in_it_and_checks_fp32_on_a_sample(tmp_path,
                                                                                                    digits_model,
                                                                                                    caplog):
    import logging

    from compress.records import read_records
    from compress.run.pipeline import run_pipeline

    config = load_config(None, ['data.path="builtin:digits"', "data.calib_size=64", "data.eval_limit=128",
                                "measure.iterations=3", "measure.max_seconds=0.3", "measure.warmup=1",
                                "measure.batch_sizes=[1]", "measure.agreement_sample=32",
                                'measure.runtimes=["openvino", "onnxruntime"]', 'measure.judge_precision="auto"',
                                'pipeline.stages=["prune", "tokens", "quantize"]', "pipeline.max_drop=5",
                                'quantize.quantizers=["nncf"]', "quantize.calib_size=32",
                                "prune.search=true", "prune.target_macs=[0.9]", "prune.importance=fisher",
                                "tokens.finetune_epochs=0", "tokens.macs=[0.8]", 'tokens.time_precision="fp32"',
                                'tokens.target_runtime="openvino"', 'prune.target_runtime="openvino"'])
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="compress.run.measure"):
        run_pipeline(digits_model, "digits", config, run)
    # the INT8 candidate was scored once, while the quantizer fitted it, and measured from those predictions
    assert "quantize · nncf-ov · openvino: top-1 as its stage scored it on the same file, all 128 images: not " \
           "scored again" in caplog.text
    ok = [r for r in read_records(run / "records.jsonl") if r.status == "ok"]
    int8 = next(r for r in ok if r.stage == "quantize" and r.runtime == "openvino")
    assert int8.scored_in_full and int8.top1_drop_ci95 is not None
    chain = __import__("json").loads((run / "stages" / "pipeline.json").read_text())
    judge = "bf16" if _openvino_runs_bf16_natively() else "fp32"  # auto: bf16 only where OpenVINO defaults to it
    assert chain["judged_in"] == judge
    for stage in ("baseline", "prune", "tokens"):
        full = [r for r in ok if r.stage == stage and r.candidate is None and r.sampled_against is None]
        assert [(r.runtime, r.precision) for r in full] == [("openvino", judge)], stage
        assert full[0].eval_samples == full[0].eval_total == 128
        if judge == "bf16":  # the other precision checked against it on a sample, and ONNX Runtime's fp32 too
            fp32 = [r for r in ok if r.stage == stage and r.candidate is None and r.precision == "fp32"]
            assert {r.runtime for r in fp32} == {"openvino", "onnxruntime"}
            assert all(r.sampled_against["precision"] == "bf16" and r.eval_samples == 32 for r in fp32)
    # the settings the stages tried were judged in it too, and each stage's drop is the one scored in full
    tried = [r for r in ok if r.stage in ("prune", "tokens") and r.candidate is not None]
    assert tried and {r.precision for r in tried} == {judge}
    baseline = next(r for r in ok if r.stage == "baseline" and r.sampled_against is None)
    assert baseline.top1_drop == 0.0
    tokens = next(r for r in ok if r.stage == "tokens" and r.candidate is None and r.sampled_against is None)
    assert chain["per_stage"][-1]["drop_pt"] == pytest.approx(tokens.top1_drop)
    if judge == "bf16":
        assert "(the baseline run in BF16)" in (run / "report.md").read_text()
    # OpenVINO first: every file exported in its graph form (export.graph "auto"), and the report says so
    assert chain["exported_as"] == "openvino"
    assert "exported in OpenVINO's graph form" in (run / "report.md").read_text()
    for r in (baseline, tokens):
        ops = {n.op_type for n in __import__("onnx").load(run / r.artifact).graph.node}
        assert "Einsum" in ops and "Split" not in ops, r.stage


def test_judging_in_bf16_on_a_runtime_that_cannot_is_refused_before_any_work(tmp_path):
    from compress.errors import ConfigError
    from compress.run.measure import judge_precision

    config = load_config(None, ['measure.runtimes=["onnxruntime", "openvino"]', 'measure.judge_precision="bf16"'])
    with pytest.raises(ConfigError, match=r"measure.judge_precision=bf16, but onnxruntime .* offers \['fp32'\] here; "
                                          "use auto"):
        judge_precision(config)
    assert judge_precision(load_config(None, ['measure.runtimes=["onnxruntime"]', 'measure.judge_precision="auto"'])) \
        == "fp32"  # ONNX Runtime's CPU provider has no native bf16: auto stays in fp32
    assert judge_precision(load_config(None, [])) == "fp32"  # the default


def test_a_scored_file_is_reused_only_while_it_is_unchanged(tmp_path):
    from compress.quantize.base import ScoredFiles

    path = tmp_path / "model.onnx"
    path.write_bytes(b"first")
    result = _result(np.array([True, False]), np.array([1, 2]))
    scored = ScoredFiles()
    scored.keep(path, "openvino", "int8", result)
    assert scored.get(path, "openvino", "int8") is result
    assert scored.get(path, "onnxruntime", "int8") is None and scored.get(path, "openvino", "fp32") is None
    path.write_bytes(b"rewritten by the quantizer")  # another size: another file
    assert scored.get(path, "openvino", "int8") is None
    path.unlink()
    assert scored.get(path, "openvino", "int8") is None
