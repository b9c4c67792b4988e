"""Which record a bundle packs: within budget, fastest, and near-ties ranked by their interleaved re-timing."""

import json

import pytest

from compress.deploy.bundle import TARGETS, choose, contenders, retimed_in_run, timing_key
from compress.errors import InputError
from compress.records import StageRecord

CPU = TARGETS["cpu-x86"]


def _row(candidate, runtime, p50, drop=0.2, precision="int8", batch=1):
    return StageRecord(stage="quantize", runtime=runtime, precision=precision, batch_size=batch, top1=0.9,
                       top1_drop=drop, latency_ms_p50=p50, candidate=candidate, artifact=f"artifacts/{candidate}.onnx")


RECORDS = [_row("baseline", "openvino", 2.0, drop=0.0, precision="fp32"), _row("a", "openvino", 1.00),
           _row("b", "onnxruntime", 1.05), _row("c", "openvino", 1.30), _row("d", "openvino", 0.50, drop=3.0),
           _row("a", "openvino", 0.30, batch=8)]


def test_near_ties_within_budget_are_the_contenders_and_their_retiming_decides():
    close = contenders(RECORDS, CPU, max_drop=1.0)
    assert [r.candidate for r in close] == ["a", "b"]  # c is 30% slower, d over budget, batch 8 is not compared
    assert choose(RECORDS, CPU, max_drop=1.0).candidate == "a"  # by single medians
    retimed = {timing_key(RECORDS[1]): 1.10, timing_key(RECORDS[2]): 0.95}
    assert choose(RECORDS, CPU, max_drop=1.0, retimed=retimed).candidate == "b"
    partial = {timing_key(RECORDS[2]): 0.10}  # figures for only some contenders rank nothing
    assert choose(RECORDS, CPU, max_drop=1.0, retimed=partial).candidate == "a"


def test_one_clear_winner_or_nothing_within_budget_has_no_contenders():
    assert contenders([RECORDS[0], RECORDS[1], RECORDS[3]], CPU, max_drop=1.0) == []
    assert contenders(RECORDS, CPU, max_drop=-1.0) == []
    assert contenders(RECORDS, TARGETS["jetson-orin"], max_drop=1.0) == []  # TensorRT: measured on the device
    with pytest.raises(InputError, match="no candidate of the run is within the -1 pt budget"):
        choose(RECORDS, CPU, max_drop=-1.0)


def test_a_clear_winner_timed_noisily_is_timed_again_beside_its_runner_up():
    import dataclasses

    noisy = dataclasses.replace(RECORDS[1], latency_ms_p50=0.6, latency_verdict="noisy: p90 60% above p50")
    rows = [RECORDS[0], noisy, RECORDS[3]]
    assert [r.candidate for r in contenders(rows, CPU, max_drop=1.0)] == ["a", "c"]
    # and the re-timing decides: a's 0.6 ms was the noise
    assert choose(rows, CPU, max_drop=1.0, retimed={timing_key(noisy): 1.5, timing_key(RECORDS[3]): 1.3}).candidate \
        == "c"


def test_the_run_s_retiming_is_read_back_only_for_its_target_and_budget(tmp_path):
    (tmp_path / "stages").mkdir()
    marker = tmp_path / "stages" / "deploy.json"
    assert retimed_in_run(tmp_path, CPU, 1.0) is None
    marker.write_text(json.dumps({"retimed": {"target": "cpu-x86", "budget_pt": 1.0, "p50_ms": {"k": 0.9}}}))
    assert retimed_in_run(tmp_path, CPU, 1.0) == {"k": 0.9}
    assert retimed_in_run(tmp_path, CPU, 2.0) is None and retimed_in_run(tmp_path, TARGETS["cpu-arm"], 1.0) is None
    for damaged in ('{"retimed": {"target": "cpu-x86", "budget_pt": 1.0, "p50_ms": {"k": "fast"}}}', "{not json",
                    '["retimed"]'):
        marker.write_text(damaged)
        assert retimed_in_run(tmp_path, CPU, 1.0) is None
