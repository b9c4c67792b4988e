"""Recipes: stages in order under one budget, the built-in recipes, bad orders, and a budget no chain meets."""

import json

import pytest

from compress.deploy.runner import verify
from compress.config import load_config
from compress.errors import ConfigError
from compress.run.pipeline import budget_unsure, run_pipeline
from compress.recipes import BUILTIN_RECIPES

FAST = ['data.path="builtin:digits"', "data.calib_size=128", "quantize.calib_size=64", "measure.iterations=3",
        "measure.max_seconds=0.3", "measure.warmup=1", "measure.batch_sizes=[1]", "data.eval_limit=128",
        'measure.runtimes=["onnxruntime", "openvino"]', "prune.importance=l2", "recover.batch_size=64",
        'quantize.quantizers=["onnxruntime-static"]', "tokens.finetune_epochs=0", "tokens.macs=[0.8]"]


def test_builtin_recipes_load_and_chain_every_stage():
    for name, recipe in BUILTIN_RECIPES.items():
        config = load_config(name)
        before = {"cpu-training-free": ["prune", "tokens"], "cpu-quick-finetune": ["tokens"]}.get(
            name, ["prune", "recover", "tokens"])
        assert config.stage_order() == [*before, "quantize", "deploy"]
        assert config.pipeline.max_drop == 1.0 and config.pipeline.target == recipe["pipeline"]["target"]
    free = load_config("cpu-training-free")
    assert free.prune.search and free.prune.search_targets() == [0.9, 0.85, 0.8] and free.recover.epochs == 0
    assert free.tokens.finetune_epochs == 0 and free.tokens.r is None  # searched, judged as they are
    # one merge, in the second block (BENCHMARKS.md, "Where the one merge goes")
    assert (free.tokens.method, free.tokens.schedule, free.tokens.layers, free.tokens.align) == ("tome", "layers", [1],
                                                                                                 16)
    assert free.tokens.similarity == "tokens" and free.tokens.macs == [0.82, 0.75, 0.7]
    # one epoch at a quarter of the MACs, in a lower working resolution: not the training-free recipe's token lever
    quick = load_config("cpu-quick-finetune")
    assert (quick.tokens.method, quick.tokens.macs, quick.tokens.align) == ("resolution", [0.25], 1)
    assert quick.tokens.finetune_epochs == 1 and quick.tokens.finetune_each and quick.data.train_limit == 8000
    assert load_config("jetson-latency").quantize.activations == "int8"  # TensorRT reads symmetric INT8 only


@pytest.mark.parametrize("stages, message", [
    (["prune", "distill"], r"config pipeline.stages: unknown value 'distill'; choose from 'prune', 'recover', "
                           r"'tokens', 'quantize' or 'deploy'"),
    (["prune", "prune"], "config: pipeline.stages lists 'prune' twice; list each stage once"),
    (["recover", "prune"], "puts 'recover' before 'prune'"),
    (["tokens", "recover"], "puts 'recover' before 'prune' \\(or has no 'prune'\\)"),
    (["quantize", "tokens"], "puts 'tokens' after 'quantize'"),
    (["deploy", "quantize"], "puts 'quantize' after 'deploy'"),
])
def test_impossible_orders_and_unknown_stages_are_one_clear_error(stages, message):
    with pytest.raises(ConfigError, match=message):  # when the config is read, before anything runs
        load_config(None, [f"pipeline.stages={json.dumps(stages)}", "recover.epochs=1"])


def test_recover_listed_without_epochs_is_refused():
    with pytest.raises(ConfigError, match="lists 'recover' but recover.epochs is 0"):
        load_config(None, ['pipeline.stages=["prune", "recover"]'])


@pytest.mark.slow
def test_the_chain_spends_one_budget_chooses_for_the_target_and_deploys(tmp_path, digits_model):
    config = load_config(None, [*FAST, 'pipeline.stages=["prune", "recover", "tokens", "quantize", "deploy"]',
                                "pipeline.max_drop=5", "prune.heads=0.25", "recover.epochs=1"])
    run = tmp_path / "run"
    result = run_pipeline(digits_model, "digits", config, run)
    chain = json.loads((run / "stages" / "pipeline.json").read_text())
    assert [s["stage"] for s in chain["per_stage"]] == ["baseline", "prune", "recover", "tokens"]
    assert chain["per_stage"][1]["judged"] is False  # prune is judged after its recovery
    recover_drop = chain["per_stage"][2]["drop_pt"]
    tokens = json.loads((run / "stages" / "tokens.json").read_text())["notes"]
    assert tokens["budget_pt"] == pytest.approx(5 - max(0.0, recover_drop))  # what recovery left of the budget
    quantize = json.loads((run / "stages" / "quantize.json").read_text())
    tokens_drop = chain["per_stage"][3]["drop_pt"]
    assert quantize["max_drop"] == pytest.approx(5 - max(0.0, tokens_drop))
    # the choice is the fastest row on the target's runtimes within budget, and it is on the Pareto set
    rows = [r for r in result.records if r.status == "ok" and r.artifact and r.batch_size == 1
            and r.runtime in ("openvino", "onnxruntime") and r.top1_drop <= 5]
    fastest = min(rows, key=lambda r: r.latency_ms_p50)
    retimed = "latency_ms_p50_interleaved" in chain["selected"]  # contenders were timed again by the deploy stage
    if retimed:  # one of those: within 10% of the fastest, or noisily timed (runtimes.noise.too_close_to_call)
        from compress.deploy.bundle import TARGETS, contenders

        picked = [(r.latency_ms_p50, r.top1) for r in contenders(result.records, TARGETS["cpu-x86"], max_drop=5)]
        assert (chain["selected"]["latency_ms_p50"], chain["selected"]["top1"]) in picked
    else:
        assert chain["selected"]["latency_ms_p50"] == fastest.latency_ms_p50
    front = chain["pareto"]
    every = [r for r in result.records if r.status == "ok" and r.artifact and r.batch_size == 1
             and r.runtime in ("openvino", "onnxruntime")]
    assert front[0]["latency_ms_p50"] == min(r.latency_ms_p50 for r in every)  # the fastest is never dominated
    assert all(a["latency_ms_p50"] <= b["latency_ms_p50"] and a["top1"] < b["top1"] for a, b in zip(front, front[1:]))
    # nothing faster is also more accurate, so the fastest row within budget is on the front (by single medians)
    assert retimed or (chain["selected"]["latency_ms_p50"], chain["selected"]["top1"]) in {
        (p["latency_ms_p50"], p["top1"]) for p in front}
    assert set(chain["stage_seconds"]) == {"baseline", "prune", "recover", "tokens", "quantize", "deploy"}
    ci = chain["selected"]["top1_drop_ci95"]  # the choice carries its interval; past the budget, a caution says so
    assert ci[0] <= chain["selected"]["top1_drop"] <= ci[1] and chain["selected"]["eval_samples"] > 0
    assert ("budget_unsure" in chain) == (ci[1] > 5)
    scored = every_drop_has_its_interval(result.records)
    assert {r.stage for r in scored} >= {"baseline", "prune", "recover", "tokens", "quantize"}
    assert sum(r.stage == "tokens" and r.candidate is not None for r in scored) >= 2
    manifest = verify(run / chain["bundle"])
    assert manifest["selected"]["top1"] == chain["selected"]["top1"]
    report = (run / "report.md").read_text()
    assert "## The chain" in report and "Pareto set" in report and "## Token reduction" in report
    from compress.report.html import write_report

    html = write_report([run], out=tmp_path / "report").html.read_text()
    assert "The chain" in html and f"Chosen for cpu-x86: <b>{chain['selected']['candidate']}</b>" in html
    again = run_pipeline(digits_model, "digits", config, run)  # resumes: every stage done, the bundle kept
    assert again.resumed_stages == ["baseline", "prune", "recover", "tokens", "quantize", "deploy"]
    assert json.loads((run / "stages" / "pipeline.json").read_text())["selected"] == chain["selected"]


def test_a_choice_whose_interval_reaches_past_the_budget_is_flagged():
    chosen = {"candidate": "nncf-ov", "top1_drop": 0.3, "top1_drop_ci95": [-1.1, 1.7], "eval_samples": 1000}
    unsure = budget_unsure(chosen, 1.0)
    assert "+0.30 pt is within the 1 pt budget on 1,000 images" in unsure and "reaches +1.70 pt" in unsure
    assert "data.eval_limit" in unsure
    assert budget_unsure(chosen | {"top1_drop_ci95": [-0.2, 0.9]}, 1.0) is None  # the interval fits too
    assert budget_unsure(chosen | {"top1_drop_ci95": None}, 1.0) is None  # no interval: nothing to say
    assert budget_unsure({"none": "nothing within budget"}, 1.0) is None


@pytest.mark.slow
def test_the_training_free_recipe_runs_on_calibration_data_alone(tmp_path, digits_model):
    keep = [o for o in FAST if not o.startswith(("quantize.quantizers", "tokens.macs", "prune.importance"))]
    config = load_config("cpu-training-free", [*keep, "pipeline.max_drop=5"])
    run = tmp_path / "run"
    result = run_pipeline(digits_model, "digits", config, run)
    prune = json.loads((run / "stages" / "prune.json").read_text())["notes"]
    assert prune["importance"] == "fisher-predictions" and "recovery" not in prune  # no labels, nothing trained
    assert prune["latency_model"]["timed"] == "openvino INT8, batch 1"  # timed as the chain ends
    assert prune["budget_pt"] == pytest.approx(2.5)  # half the chain's budget: the rest is left for INT8
    assert prune["trials"][0]["candidate"] == "latency 0.85"  # bisected: the middle target first
    assert all(t["reconstruct"]["fit"] == "weights" for t in prune["trials"] if t["status"] != "skipped")
    assert not (run / "stages" / "recover.json").exists()
    tokens = json.loads((run / "stages" / "tokens.json").read_text())["notes"]
    # ToMe in the second block only, to a multiple of 16 tokens: the digits model's 17 become 16 (4 blocks)
    assert [t["candidate"] for t in tokens["trials"] if t["candidate"] != "unreduced"] == ["tome r=[0,1,0,0] on tokens"]
    assert {r.candidate for r in result.records if r.stage == "quantize"} == {"nncf-ov"}
    chain = json.loads((run / "stages" / "pipeline.json").read_text())
    assert set(chain["stage_seconds"]) == {"baseline", "prune", "tokens", "quantize", "deploy"}
    every_drop_has_its_interval(result.records)


def every_drop_has_its_interval(records):
    """Every top-1 drop in the records comes with its 95% interval, the token settings tried included; only the
    baseline's own full score, the reference of the others, has none (its drop is 0 by definition)."""
    scored = [r for r in records if r.status == "ok" and r.top1 is not None]
    for r in scored:
        if r.top1_drop_ci95 is None:
            assert r.stage == "baseline" and r.sampled_against is None and r.top1_drop == 0, r
        else:
            assert r.top1_drop_ci95[0] - 1e-6 <= r.top1_drop <= r.top1_drop_ci95[1] + 1e-6, r
    return scored


@pytest.mark.slow
def test_a_budget_no_chain_meets_names_the_stage_that_broke_it(tmp_path, digits_model):
    config = load_config(None, [*FAST, 'pipeline.stages=["prune", "recover", "quantize"]', "pipeline.max_drop=0",
                                "prune.heads=0.5", "prune.mlp=0.5", "recover.epochs=0.2"])
    run = tmp_path / "run"
    run_pipeline(digits_model, "digits", config, run)
    chain = json.loads((run / "stages" / "pipeline.json").read_text())
    over = [s for s in chain["per_stage"] if s["judged"] and s["drop_pt"] > 0]
    assert over, "half the heads and MLP units with a fifth of an epoch of recovery should cost some top-1"
    assert chain["broke_at"]["stage"] == over[0]["stage"]
    report = (run / "report.md").read_text()
    assert f"**The budget broke at stage {over[0]['stage']}**" in report


def test_quantize_enabled_false_still_takes_quantization_out_of_a_listed_chain():
    config = load_config("cpu-latency", ["quantize.enabled=false"])
    assert config.stage_order() == ["prune", "recover", "tokens", "deploy"]
