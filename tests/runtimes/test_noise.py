"""Latency verdicts, and engines too close to call re-timed interleaved."""

import numpy as np

from compress.records import StageRecord
from compress.run.measure import mark_repeats
from runtimes.noise import interleaved, repeat_verdict, retimed_verdict, spread_verdict, too_close_to_call


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


def test_a_record_whose_re_timing_agreed_is_not_marked_noisy_again():
    base = dict(runtime="openvino", precision="bf16", batch_size=1, artifact="artifacts/baseline.onnx")
    records = [StageRecord(stage="baseline", latency_ms_p50=0.81, latency_verdict="stable", **base),
               StageRecord(stage="quantize", latency_ms_p50=1.90, **base,
                           latency_verdict="stable: re-timed interleaved over 7 rounds, p50 0.820 ms")]
    marked = mark_repeats(records)
    assert marked[0].latency_verdict.startswith("noisy: the same artifact timed 2 times")
    assert marked[1].latency_verdict.startswith("stable: re-timed")


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
    assert all(f["latency_verdict"].startswith(("stable: re-timed", "noisy: still")) for f in fits[:2])


def test_a_noisy_timing_is_always_timed_again_and_never_alone():
    p50 = {"a": 1.0, "b": 1.05, "c": 2.0, "d": 3.0}
    noisy = {"c"}
    assert too_close_to_call(list(p50), p50.get) == ["a", "b"]
    # c's median may be far off either way: it is timed again with the close ones
    assert too_close_to_call(list(p50), p50.get, lambda k: k in noisy) == ["a", "b", "c"]
    # a noisy fastest that stands out is timed again beside the next fastest, its reference
    p50 = {"a": 0.81, "b": 1.90, "c": 3.0}
    assert too_close_to_call(list(p50), p50.get, lambda k: k == "a") == ["a", "b"]
    assert too_close_to_call(list(p50), p50.get) == ["a"]  # a stable one that stands out needs no second look
    assert too_close_to_call(["a"], p50.get, lambda k: True) == ["a"]  # nothing to compare it with
    # the deploy stage of a run on the reference ViT-S: two BF16 rows timed noisy, the INT8 row stable at 14.4 ms.
    # Only the two BF16 rows were timed again (13.6 ms), and BF16 was packed; in interleaved rounds afterwards the
    # INT8 engine ran at 7.5 ms. The fastest stable row is always among those timed again.
    p50 = {"baseline bf16": 31.1, "tokens bf16": 8.9, "nncf int8": 14.35, "tokens fp32": 24.4, "baseline fp32": 82.8}
    noisy = {"baseline bf16", "tokens bf16"}
    assert too_close_to_call(list(p50), p50.get, lambda k: k in noisy) == ["baseline bf16", "tokens bf16", "nncf int8"]


def test_the_verdict_after_re_timing_says_whether_the_rounds_agreed():
    assert retimed_verdict([1.0, 1.02, 0.99, 1.01, 1.0]) == "stable: re-timed interleaved over 5 rounds, p50 1.000 ms"
    verdict = retimed_verdict([1.0, 1.0, 1.0, 2.0, 2.1])
    assert verdict.startswith("noisy: still after being re-timed interleaved over 5 rounds, p50 1.000 ms")


def test_a_noisy_token_setting_far_behind_is_timed_again_before_the_choice():
    from types import SimpleNamespace

    from compress.tokens.stage import _fastest

    log: list = []
    fits = [{"candidate": "unreduced", "latency_ms_p50": 1.00, "latency_verdict": "stable"},
            {"candidate": "tome r=8", "latency_ms_p50": 1.90, "latency_verdict": "noisy: p90 60% above p50"}]
    engines = {f["candidate"]: _Logged(f["candidate"], log) for f in fits}
    _fastest(fits, engines, np.zeros((1, 1), np.float32), SimpleNamespace(threads=1))
    assert {"unreduced", "tome r=8"} <= set(log)  # both timed again, interleaved: the choice is by that
    assert all("latency_ms_p50_interleaved" in f for f in fits)


def test_the_quantize_stage_times_a_noisy_winner_again_before_choosing_it():
    from compress.quantize.stage import fastest_within

    def row(candidate, p50, verdict="stable"):
        return StageRecord(stage="quantize", runtime="openvino", precision="int8", batch_size=1, top1=0.9,
                           candidate=candidate, artifact=f"artifacts/{candidate}.xml", latency_ms_p50=p50,
                           latency_verdict=verdict)

    rows = [row("a", 0.5, "noisy: mean 2.0x p50 (outliers)"), row("b", 1.0), row("c", 3.0)]
    asked = []

    def retime(contenders):
        asked.append([r.candidate for r in contenders])
        return [1.2 if r.candidate == "a" else 1.0 for r in contenders]

    selected = fastest_within(rows, 0.9, 1.0, 1, retime=retime)
    assert asked == [["a", "b"]] and selected["candidate"] == "b" and selected["latency_ms_p50_interleaved"] == 1.0
