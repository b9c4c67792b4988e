"""The run's plan as data: each stage an entry with what it takes, and records that cannot lose a field."""

import pytest

from compress.config import load_config
from compress.records import StageRecord
from compress.run.measure import Recorder
from compress.run.plan import build_plan


def test_the_demo_recipe_is_a_plan_of_typed_entries():
    plan = build_plan(load_config("digits-demo"))
    assert [(s.name, s.takes) for s in plan] == [
        ("baseline", "torch"), ("prune", "torch"), ("recover", "torch"), ("tokens", "torch"), ("quantize", "onnx"),
        ("deploy", "records")]
    # what a stage's content hash covers: its options, and for a model stage the export settings it is exported with
    assert set(plan[1].options) == {"options", "export"} and set(plan[4].options) == {"options", "budget"}


def test_switches_decide_the_plan_without_a_listed_order():
    plan = build_plan(load_config(None, ["prune.enabled=true", "prune.heads=0.25", "quantize.enabled=false"]))
    assert [s.name for s in plan] == ["baseline", "prune"]


def test_a_misspelt_record_field_is_an_error_not_a_silent_loss():
    record = Recorder({"stage": "tokens", "stage_key": "k", "env": {"versions": {}}}, None)
    row = record(runtime="onnxruntime", precision="fp32", batch_size=1, top1=0.9)
    assert isinstance(row, StageRecord) and row.stage == "tokens" and row.top1 == 0.9
    with pytest.raises(TypeError, match="top1_dorp"):
        record(runtime="onnxruntime", precision="fp32", batch_size=1, top1_dorp=0.5)


def test_a_stage_key_covers_the_graph_form_its_files_are_exported_in():
    """"auto" is resolved before it enters a stage's content hash: a run whose first runtime changes exports another
    graph, so it must not resume from the other form's files."""
    runtimes = ['measure.runtimes=["openvino", "onnxruntime"]', 'measure.runtimes=["onnxruntime", "openvino"]']
    on_openvino, on_onnxruntime = (build_plan(load_config("digits-demo", [r]))[1] for r in runtimes)
    assert on_openvino.options["export"]["graph"] == "openvino"
    assert on_onnxruntime.options["export"]["graph"] == "standard"
    pinned = build_plan(load_config("digits-demo", [runtimes[0], "export.graph=standard"]))[1]
    assert pinned.options["export"]["graph"] == "standard"
