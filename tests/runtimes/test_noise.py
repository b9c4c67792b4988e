"""Latency verdicts, and engines too close to call re-timed interleaved."""

import numpy as np

from compress.records import StageRecord
from compress.run.measure import mark_repeats
from runtimes.noise import interleaved, repeat_verdict, spread_verdict


def test_verdicts_from_one_measurements_spread():
    assert spread_verdict(1.0, 1.1, 1.02) == "stable"
    assert spread_verdict(1.0, 1.6, 1.2) == "noisy: p90 60% above p50"
    # the torch batch-8 row that started this: p50 9.43 ms beside a mean of 47.9 ms
    assert spread_verdict(9.43, 11.0, 47.9) == "noisy: mean 5.1x p50 (outliers)"


def test_the_same_artifact_timed_twice_and_disagreeing_is_marked_on_both_records():
    assert repeat_verdict([0.81, 0.84]) is None
    base = dict(runtime="openvino", precision="bf16", batch_size=1, artifact="artifacts/baseline.onnx",
                latency_verdict="stable")
    records = [StageRecord(stage="baseline", latency_ms_p50=0.81, **base),
               StageRecord(stage="quantize", candidate="ov-bf16", latency_ms_p50=1.90, **base),
               StageRecord(stage="quantize", candidate="other", latency_ms_p50=3.0, **base | {"artifact": "b.onnx"})]
    marked = mark_repeats(records)
    assert marked[0].latency_verdict == marked[1].latency_verdict == (
        "noisy: the same artifact timed 2 times in this run, p50 0.810 to 1.900 ms")
    assert marked[2].latency_verdict == "stable"


class _Logged:
    """An engine that notes each call in a shared log."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def run(self, x):
        self.log.append(self.name)
        return x


def test_interleaved_timing_takes_every_engine_in_every_round_in_alternating_order():
    log: list = []
    medians = interleaved({"a": _Logged("a", log), "b": _Logged("b", log)}, np.zeros((1, 1), np.float32),
                          threads=1, rounds=4, iterations=3, warmup=1)
    assert set(medians) == {"a", "b"} and all(v > 0 for v in medians.values())
    blocks = [log[i] for i in range(0, len(log), 4)]  # each timing: 1 warm-up call, then 3 timed
    assert blocks == ["a", "b", "b", "a", "a", "b", "b", "a"]  # every round both, the first one alternating


def test_token_settings_too_close_to_call_are_timed_again_before_one_is_chosen():
    from types import SimpleNamespace

    from compress.tokens.stage import _fastest

    log: list = []
    fits = [{"candidate": "tome r=2", "latency_ms_p50": 1.00}, {"candidate": "evit 0.7", "latency_ms_p50": 1.05},
            {"candidate": "unreduced", "latency_ms_p50": 2.00}]
    engines = {f["candidate"]: _Logged(f["candidate"], log) for f in fits}
    chosen = _fastest(fits, engines, np.zeros((1, 1), np.float32), SimpleNamespace(threads=1))
    assert chosen["candidate"] in ("tome r=2", "evit 0.7") and "unreduced" not in log
    assert all("latency_ms_p50_interleaved" in f for f in fits[:2]) and "latency_ms_p50_interleaved" not in fits[2]
