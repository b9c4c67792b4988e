"""Head and MLP-unit pruning on the real trained digits ViT and the tiny random ViT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from calibration.datasets import Subset, digits_source, make_splits
from compress.model.macs import count_macs, count_params
from compress.prune.structured import (
    Importance, PruneError, check_layout, item_macs, l2_importance, mac_costs, prune_by_ratio, prune_to_target,
    rearrange_mask, remove, search_mask, select, structure, taylor_importance,
)
from export.onnx_export import export_onnx


def _data(ckpt, n=128):
    source = digits_source()
    splits = make_splits(source, calib_size=128, seed=0)
    return Subset(source, splits.calib[:n], ckpt.preprocess)


def test_ratio_zero_leaves_outputs_identical(tiny_vit):
    pruned = prune_by_ratio(tiny_vit, l2_importance(tiny_vit), heads=0.0, mlp=0.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pruned(x), tiny_vit(x))
    assert structure(pruned) == structure(tiny_vit)


def test_pruning_keeps_the_output_shape_and_removes_the_expected_parameters_and_macs(tiny_vit):
    # tiny: depth 2, dim 64, 4 heads of 16, MLP 128. Remove 2 of 8 heads and 64 of 256 units.
    heads_keep = [[0, 1, 2], [1, 2, 3]]
    units_keep = [list(range(96)), list(range(32, 128))]
    pruned = remove(tiny_vit, heads_keep, units_keep)
    assert structure(pruned) == {"heads": [3, 3], "mlp": [96, 96]}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert pruned(x).shape == tiny_vit(x).shape
    # per removed head: 3*16 qkv rows of 64 weights + biases, 16 proj columns of 64; per removed unit: fc1 row
    # (64 + bias) and fc2 column (64)
    expected = 2 * (3 * 16 * 64 + 3 * 16 + 16 * 64) + 64 * (64 + 1 + 64)
    assert count_params(tiny_vit) - count_params(pruned) == expected
    tokens = (32 // 8) ** 2 + 1
    head_macs = tokens * (3 * 16 * 64 + 16 * 64) + 2 * tokens * tokens * 16  # projections + q.k and attn.v
    unit_macs = tokens * 2 * 64
    assert count_macs(tiny_vit, (1, 3, 32, 32)) - count_macs(pruned, (1, 3, 32, 32)) == 2 * head_macs + 64 * unit_macs


def test_kept_heads_compute_what_they_computed_before(tiny_vit):
    """Removing a head whose output projection is zero changes nothing: the slicing keeps the right rows."""
    model = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 16:32] = 0  # head 1 of block 0 contributes nothing
        model.blocks[1].mlp.fc2.weight[:, 5] = 0  # unit 5 of block 1 contributes nothing
    pruned = remove(model, [[0, 2, 3], [0, 1, 2, 3]], [list(range(128)), [u for u in range(128) if u != 5]])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)


@pytest.mark.parametrize("method", ["l2", "taylor"])
def test_a_zeroed_head_and_unit_rank_last(digits_model, method):
    model = copy.deepcopy(digits_model.model)
    with torch.no_grad():
        attn = model.blocks[1].attn
        hd = attn.head_dim
        for part in range(3):
            attn.qkv.weight[part * attn.num_heads * hd + 2 * hd: part * attn.num_heads * hd + 3 * hd] = 0
            attn.qkv.bias[part * attn.num_heads * hd + 2 * hd: part * attn.num_heads * hd + 3 * hd] = 0
        attn.proj.weight[:, 2 * hd: 3 * hd] = 0
        model.blocks[2].mlp.fc1.weight[7] = 0
        model.blocks[2].mlp.fc1.bias[7] = 0
        model.blocks[2].mlp.fc2.weight[:, 7] = 0
    if method == "l2":
        importance = l2_importance(model).normalised()
    else:
        importance = taylor_importance(model, _data(digits_model).batches(32)).normalised()
    heads = [(float(s), layer, h) for layer, scores in enumerate(importance.heads) for h, s in enumerate(scores)]
    units = [(float(s), layer, u) for layer, scores in enumerate(importance.units) for u, s in enumerate(scores)]
    assert min(heads)[1:] == (1, 2) and min(heads)[0] == 0
    assert min(units)[1:] == (2, 7) and min(units)[0] == 0


def test_taylor_without_labels(digits_model):
    data = _data(digits_model, 64)
    model = digits_model.model
    labels = taylor_importance(model, data.batches(32), targets="labels")
    predictions = taylor_importance(model, data.batches(32), targets="predictions")
    assert predictions.method == "taylor-predictions" and all(np.all(s > 0) for s in predictions.heads)
    assert not np.allclose(labels.heads[0], predictions.heads[0])
    # soft targets of the model itself have zero gradient: they fall back to its predictions
    assert taylor_importance(model, data.batches(32), targets="soft").method == "taylor-predictions"
    pruned = prune_by_ratio(model, l2_importance(model), heads=0.25, mlp=0.25)
    soft = taylor_importance(pruned, data.batches(32), targets="soft", teacher=model)
    assert soft.method == "taylor-soft" and all(np.all(s > 0) for s in soft.heads)


def test_global_selection_respects_the_minimum_and_rejects_impossible_ratios():
    scores = [np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.01, 0.02, 0.9, 0.95])]
    assert select(scores, 0.5, minimum=1, what="heads") == [[2, 3], [2, 3]]
    assert select(scores, 0.75, minimum=1, what="heads") == [[3], [3]]
    with pytest.raises(PruneError, match="would leave a layer with fewer than 1; at most 75%"):
        select(scores, 0.9, minimum=1, what="heads")
    with pytest.raises(PruneError, match=r"must be in \[0, 1\)"):
        select(scores, 1.0, minimum=1, what="heads")
    assert select(scores, 0.75, minimum=1, what="units", round_to=2) == [[2, 3], [2, 3]]  # 1 kept -> 2


def test_layer_scope_removes_the_same_share_from_every_layer():
    scores = [np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 0.8, 0.7, 0.6])]
    # Globally the four lowest are all in layer 0; per layer each loses its own two lowest.
    assert select(scores, 0.5, minimum=1, what="heads") == [[3], [0, 1, 2]]
    assert select(scores, 0.5, minimum=1, what="heads", scope="layer") == [[2, 3], [0, 1]]
    assert select(scores, 0.75, minimum=1, what="heads", scope="layer") == [[3], [0]]
    with pytest.raises(PruneError, match="unknown pruning scope 'row'"):
        select(scores, 0.5, minimum=1, what="heads", scope="row")


def test_layer_scope_gives_every_layer_the_same_width(digits_model):
    model = digits_model.model
    pruned = prune_by_ratio(model, l2_importance(model), heads=0.5, mlp=0.5, scope="layer")
    shape = structure(pruned)
    assert len(set(shape["heads"])) == 1 and len(set(shape["mlp"])) == 1
    assert shape["heads"][0] == structure(model)["heads"][0] // 2


@pytest.mark.slow
def test_pruned_model_exports_and_matches_in_onnxruntime_and_openvino(digits_model, tmp_path):
    from runtimes import get_runtime

    model = digits_model.model
    pruned = prune_by_ratio(model, l2_importance(model), heads=0.25, mlp=0.25)
    assert sum(structure(pruned)["heads"]) == 12 and sum(structure(pruned)["mlp"]) == 384
    x = next(_data(digits_model).batches(32))[0]
    result = export_onnx(pruned, tmp_path / "pruned.onnx", example=torch.from_numpy(x[:2]), parity_inputs=x)
    assert result.parity.max_abs_diff < 1e-4
    with torch.no_grad():
        expected = pruned(torch.from_numpy(x)).numpy()
    got = get_runtime("openvino").build(tmp_path / "pruned.onnx", precision="fp32", threads=2).run(x)
    assert np.abs(got - expected).max() < 1e-4
    assert count_macs(pruned, (1, 1, 8, 8)) < count_macs(model, (1, 1, 8, 8))


def test_mac_target_prunes_until_met_and_says_how_close_it_got(tiny_vit):
    full = count_macs(tiny_vit, (1, 3, 32, 32))
    importance = l2_importance(tiny_vit)
    result = prune_to_target(tiny_vit, importance, lambda m: count_macs(m, (1, 3, 32, 32)) / full, 0.8,
                             what="MAC", unit="x", log_fn=lambda m: None)
    assert result.value <= 0.8 and result.ratio > 0
    with pytest.raises(PruneError, match=r"the MAC target 0.01 x cannot be met .* the closest was"):
        prune_to_target(tiny_vit, importance, lambda m: count_macs(m, (1, 3, 32, 32)) / full, 0.01,
                        what="MAC", unit="x", log_fn=lambda m: None)


def test_unexpected_attention_layout_is_refused(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    model.blocks[0].attn.qkv = torch.nn.Linear(64, 100)  # not 3 x heads x head_dim
    with pytest.raises(PruneError, match="blocks.0.attn does not have the fused layout"):
        check_layout(model)


# ---------------------------------------------------------------------------------------------- mask search
def _random_importance(model, seed=0) -> Importance:
    rng = np.random.default_rng(seed)
    return Importance([rng.random(b.attn.num_heads) for b in model.blocks],
                      [rng.random(b.mlp.fc1.out_features) for b in model.blocks], "fisher-predictions")


@pytest.mark.parametrize("plan", [None, "tome", "evit", "resolution"])
def test_the_search_counts_the_macs_count_macs_counts(tiny_vit, plan):
    """The search prices heads and units per layer; a pruned model's MACs, with any token plan, are exactly that."""
    from compress.tokens import apply, evit, resolution, tome

    model = copy.deepcopy(tiny_vit)
    depth = model.config.depth
    plans = {"tome": lambda: tome(3, depth), "evit": lambda: evit(0.5, depth, [1]),
             "resolution": lambda: resolution(16, model.config)}
    if plan is not None:
        apply(model, plans[plan]())
    result = search_mask(model, _random_importance(model), 0.6)
    pruned = remove(model, result.heads_keep, result.units_keep)
    if plan is not None:
        apply(pruned, model.token_reduction)
    full, kept = count_macs(model, (1, 3, 32, 32)), count_macs(pruned, (1, 3, 32, 32))
    assert result.macs_fraction == pytest.approx(kept / full, abs=1e-12) and kept <= 0.6 * full
    heads, units = item_macs(model)
    assert len(heads) == len(units) == depth and all(h > 0 for h in heads)


def test_the_search_keeps_more_importance_than_one_share_for_both(tiny_vit):
    """Where the MLP units matter and the heads do not, the search gives up heads, which one share cannot."""
    rng = np.random.default_rng(1)
    importance = Importance([rng.random(b.attn.num_heads) * 1e-3 for b in tiny_vit.blocks],
                            [1 + rng.random(b.mlp.fc1.out_features) for b in tiny_vit.blocks], "fisher-labels")
    full = count_macs(tiny_vit, (1, 3, 32, 32))
    found = search_mask(tiny_vit, importance, 0.75)
    assert all(len(u) == b.mlp.fc1.out_features for u, b in zip(found.units_keep, tiny_vit.blocks))  # every unit
    assert sum(map(len, found.heads_keep)) < sum(b.attn.num_heads for b in tiny_vit.blocks)
    one_share = prune_to_target(tiny_vit, importance, lambda m: count_macs(m, (1, 3, 32, 32)) / full, 0.75,
                                what="MAC", unit="x", log_fn=lambda m: None).model
    kept_units = sum(b.mlp.fc1.out_features for b in one_share.blocks)
    assert kept_units < sum(map(len, found.units_keep))


def test_the_search_honours_the_floor_and_rounding_and_refuses_what_it_cannot_reach(tiny_vit):
    importance = _random_importance(tiny_vit)
    found = search_mask(tiny_vit, importance, 0.5, min_heads=2, mlp_round_to=16)
    assert all(len(h) >= 2 for h in found.heads_keep)
    assert all(len(u) % 16 == 0 for u in found.units_keep) and found.macs_fraction <= 0.5
    with pytest.raises(PruneError, match=r"the MAC target 0.05 is below what pruning can reach: .* keeps 0\.\d+ of"):
        search_mask(tiny_vit, importance, 0.05)
    with pytest.raises(PruneError, match="L2 norms"):
        search_mask(tiny_vit, l2_importance(tiny_vit), 0.5)
    width = tiny_vit.blocks[0].mlp.fc1.out_features  # rounding to the full width keeps every unit: over budget
    with pytest.raises(PruneError, match=f"no mask with MLP widths rounded to {width} fits 0.5 of the MACs"):
        search_mask(tiny_vit, importance, 0.5, mlp_round_to=width)


# ------------------------------------------------------------------------------------------ latency model
def _linear_time(per_head_mac: float, per_unit_mac: float, fixed: float):
    """Times a model as fixed + its heads' MACs and its units' MACs, each at its own price: the costs a fit must
    find again."""
    def time_models(models):
        out = {}
        for name, m in models.items():
            heads, units = item_macs(m)
            out[name] = fixed + per_head_mac * sum(b.attn.num_heads * c for b, c in zip(m.blocks, heads)) + \
                per_unit_mac * sum(b.mlp.fc1.out_features * c for b, c in zip(m.blocks, units))
        return out
    return time_models


def test_the_latency_model_finds_the_costs_it_was_timed_with_and_the_search_spends_them(tiny_vit):
    from compress.prune.latency import fit_latency_model

    costs = fit_latency_model(tiny_vit, _linear_time(3e-6, 1e-6, 0.5), label="linear")
    macs = mac_costs(tiny_vit)
    assert costs.what == "latency" and len(costs.notes["points"]) == 4 and costs.notes["max_residual_ms"] < 1e-6
    assert costs.notes["head_vs_unit_per_mac"] == pytest.approx(3.0, rel=1e-6)
    assert costs.head[0] == pytest.approx(3e-6 * macs.head[0], rel=1e-6)
    assert costs.notes["fixed_ms"] == pytest.approx(0.5, abs=1e-6)
    # Heads three times dearer than their MACs: the same importance, searched under latency, gives up more heads
    # for the same share than under MACs, and the kept cost is within the target on its own scale.
    rng = np.random.default_rng(0)
    importance = Importance([1 + rng.random(b.attn.num_heads) for b in tiny_vit.blocks],
                            [rng.random(b.mlp.fc1.out_features) * 0.05 for b in tiny_vit.blocks], "fisher-labels")
    under_macs = search_mask(tiny_vit, importance, 0.7)
    under_latency = search_mask(tiny_vit, importance, 0.7, costs=costs)
    assert under_latency.cost_fraction <= 0.7 and under_macs.cost_fraction <= 0.7
    assert sum(map(len, under_latency.heads_keep)) < sum(map(len, under_macs.heads_keep))
    assert under_latency.macs_fraction == pytest.approx(
        count_macs(remove(tiny_vit, under_latency.heads_keep, under_latency.units_keep), (1, 3, 32, 32))
        / count_macs(tiny_vit, (1, 3, 32, 32)), abs=1e-12)
    with pytest.raises(PruneError, match=r"the latency target 0.01 is below what pruning can reach: .* of its latency"):
        search_mask(tiny_vit, importance, 0.01, costs=costs)


def test_a_latency_fit_that_noise_defeats_falls_back_to_macs(tiny_vit):
    from compress.prune.latency import fit_latency_model

    # units that seem to cost nothing (a slope of 0): the fit cannot price them, so costs follow MACs, scaled
    costs = fit_latency_model(tiny_vit, _linear_time(3e-6, 0.0, 0.5))
    assert "fallback" in costs.notes
    macs = mac_costs(tiny_vit)
    assert costs.head[0] / costs.unit[0] == pytest.approx(macs.head[0] / macs.unit[0])


def test_the_latency_model_times_real_engines(tiny_vit, tmp_path):
    """Fitted on OpenVINO's own timings of the four copies: every copy exported and timed, and the search runs on
    whatever the fit found (a noisy machine may leave the fallback)."""
    from compress.prune.latency import fit_latency_model, uniform_copies
    from runtimes import get_runtime
    from runtimes.noise import interleaved

    x = torch.randn(1, 3, 32, 32)

    def time_models(models):
        engines = {}
        for name, m in models.items():
            path = tmp_path / f"{name.replace(' ', '-')}.onnx"
            export_onnx(m, path, example=x, parity_inputs=x.numpy())
            engines[name] = get_runtime("openvino").build(path, precision="fp32", threads=1)
        return interleaved(engines, x.numpy(), threads=1, rounds=3)

    assert list(uniform_copies(tiny_vit)) == ["whole", "half heads", "half units", "half both"]
    costs = fit_latency_model(tiny_vit, time_models, label="openvino FP32")
    assert [p["copy"] for p in costs.notes["points"]] == ["whole", "half heads", "half units", "half both"]
    assert all(p["latency_ms"] > 0 for p in costs.notes["points"])
    # On a model this small the fixed work is most of the time: aim between what pruning can reach and the whole
    depth = len(tiny_vit.blocks)
    floor = costs.of(tiny_vit, [1] * depth, [1] * depth) / costs.full
    target = (floor + 1) / 2
    found = search_mask(tiny_vit, _random_importance(tiny_vit), target, costs=costs)
    assert floor < found.cost_fraction <= target


# ------------------------------------------------------------------------------------------ rearrangement
def _cost(gram: np.ndarray, keep: list[int]) -> float:
    removed = np.setdiff1d(np.arange(len(gram)), keep)
    return float(gram[np.ix_(removed, removed)].sum())


def test_the_fisher_blocks_hold_the_fisher_scores_on_their_diagonal(digits_model):
    model = digits_model.model
    data = _data(digits_model, 64)
    plain = taylor_importance(model, data.batches(32), targets="predictions", fisher=True)
    full = taylor_importance(model, data.batches(16), targets="predictions", fisher=True, gram=True)
    assert plain.head_gram is None and full.images == plain.images == 64
    for h, u, gh, gu in zip(plain.heads, plain.units, full.head_gram, full.unit_gram):
        np.testing.assert_allclose(np.diag(gh), h, rtol=1e-5)
        np.testing.assert_allclose(np.diag(gu), u, rtol=1e-5)
        assert np.allclose(gu, gu.T) and np.linalg.eigvalsh(gu).min() > -1e-9 * np.abs(gu).max()  # a Gram matrix
    with pytest.raises(PruneError, match="fisher=True"):
        taylor_importance(model, data.batches(32), gram=True)


def test_rearranging_swaps_a_unit_whose_gradient_cancels_another_into_the_removed_set():
    """Units 2 and 3 have the smallest Fisher scores, but their gradients agree, so removing both costs 4; unit 0's
    gradient cancels theirs, so removing 0 and one of them costs 0.01. The diagonal alone cannot see it."""
    w, u = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    grads = np.stack([-1.1 * w, 3 * u, w, w])  # (units, images)
    heads = np.eye(2)
    importance = Importance([np.diag(heads)], [np.diag(grads @ grads.T)], "fisher-labels", 3, [heads],
                            [grads @ grads.T])
    moved = rearrange_mask(importance, [[0, 1]], [[0, 1]])
    assert moved.units_keep in ([[1, 2]], [[1, 3]]) and moved.heads_keep == [[0, 1]] and moved.swaps == 1
    assert moved.loss_before == pytest.approx(4 / 6) and moved.loss_after == pytest.approx(0.01 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_rearranging_keeps_the_counts_never_raises_the_estimate_and_ends_where_no_swap_helps(seed):
    rng = np.random.default_rng(seed)
    sizes, keeps, grams = [12, 9, 16], [], []
    for n in sizes:
        g = rng.standard_normal((n, 6)) * rng.random((n, 1))  # correlated gradients of 6 images
        grams.append(g @ g.T)
        keeps.append(sorted(np.argsort(-np.diag(grams[-1]))[: n // 2].tolist()))  # what the search keeps
    importance = Importance([np.ones(2)] * 3, [np.diag(g) for g in grams], "fisher-labels", 6,
                            [np.eye(2)] * 3, grams)
    moved = rearrange_mask(importance, [[0, 1]] * 3, keeps, max_passes=100)
    assert moved.loss_after <= moved.loss_before + 1e-12
    for gram, before, after in zip(grams, keeps, moved.units_keep):
        assert len(after) == len(before) and len(set(after)) == len(after)
        assert _cost(gram, after) <= _cost(gram, before) + 1e-9
        removed = [i for i in range(len(gram)) if i not in after]
        for k in after:  # no single exchange of a kept and a removed unit lowers the cost
            for j in removed:
                swapped = sorted(set(after) - {k} | {j})
                assert _cost(gram, swapped) >= _cost(gram, after) - 1e-9


def test_rearranging_refuses_importance_without_fisher_blocks_or_of_another_model(tiny_vit):
    importance = _random_importance(tiny_vit)
    found = search_mask(tiny_vit, importance, 0.6)
    with pytest.raises(PruneError, match="gram=True"):
        rearrange_mask(importance, found.heads_keep, found.units_keep)
    blocks = Importance(importance.heads, importance.units, importance.method, 8,
                        [np.eye(len(h)) for h in importance.heads], [np.eye(len(u)) for u in importance.units])
    with pytest.raises(PruneError, match="score the model being pruned"):
        rearrange_mask(blocks, found.heads_keep[:1], found.units_keep[:1])
    with pytest.raises(PruneError, match="score the model being pruned"):
        rearrange_mask(blocks, found.heads_keep, [[0, 10_000]] * len(found.units_keep))


def test_a_list_of_targets_is_searched_once_each_mildest_first():
    from compress.config import load_config

    config = load_config(None, ["prune.enabled=true", "prune.search=true", "prune.importance='fisher'",
                                "prune.target_latency=[0.7, 0.9, 0.7, 0.8]"])
    assert config.prune.search_targets() == [0.9, 0.8, 0.7]


@pytest.mark.parametrize("settings, message", [
    (["prune.rearrange=true"], "set prune.search=true"),
    (["prune.search=true", "prune.target_macs=0.8", "prune.rearrange=true"], "set prune.importance='fisher'"),
    (["prune.search=true"], "set prune.target_macs"),
    (["prune.search=true", "prune.target_macs=0.8", "prune.scope='layer'"], "prune.scope='layer' cannot hold"),
    (["prune.search=true", "prune.target_macs=0.8", "prune.importance='l2'"], "L2 norms"),
    (["prune.target_latency=0.7"], "set prune.search=true"),
    (["prune.target_macs=[0.8, 0.7]"], "only the mask search tries"),
    (["prune.search=true", "prune.target_latency=[]"], "is an empty list"),
    (["prune.search=true", "prune.target_latency=[0.8, 1.2]"], r"between 0 and 1 \(exclusive\), got 1.2"),
    (["prune.search=true", "prune.target_macs=0.8", "prune.target_latency=0.7"], "set one of prune.target_macs and "
                                                                                  "prune.target_latency"),
    (["prune.search=true", "prune.target_latency=0.7", "prune.time_precision='int8'"],
     "set prune.target_runtime=openvino"),
])
def test_search_settings_that_cannot_work_are_refused_when_loaded(settings, message):
    from compress.config import load_config
    from compress.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


# --------------------------------------------------------------------------------------------- the Python API
def test_the_api_prunes_training_free_by_search_rearrangement_and_repair(digits_model):
    import compress

    model = digits_model.model
    shape = (1, model.config.in_chans, model.config.image_size, model.config.image_size)
    data = _data(digits_model)
    pruned = compress.prune_model(model, target_macs=0.7, importance="fisher", data=data, targets="predictions",
                                  search=True, rearrange=True, reconstruct=True)
    assert count_macs(pruned, shape) <= 0.7 * count_macs(model, shape)
    assert structure(model) != structure(pruned) and pruned is not model
    one_share = compress.prune_model(model, target_macs=0.7, importance="taylor", data=data)
    assert count_macs(one_share, shape) <= 0.7 * count_macs(model, shape)
    x = torch.from_numpy(next(data.batches(8))[0])
    with torch.no_grad():
        assert pruned(x).shape == one_share(x).shape == model(x).shape


@pytest.mark.slow
def test_the_api_prunes_under_a_latency_model_timed_on_openvino_in_int8(digits_model):
    """``target_latency``: the latency model is fitted on real OpenVINO INT8 engines of four copies, and the
    search keeps the mask within that share of the fitted whole. On this tiny model the fixed work is most of the
    time (pruning everything it can leaves about 0.85 of it), so the target is mild."""
    import compress

    model = digits_model.model
    data = _data(digits_model)
    pruned = compress.prune_model(model, search=True, target_latency=0.97, importance="fisher", data=data,
                                  targets="predictions", time_precision="int8", threads=2)
    assert structure(model) != structure(pruned) and pruned is not model
    x = torch.from_numpy(next(data.batches(8))[0])
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


@pytest.mark.parametrize("kwargs, message", [
    ({"target_macs": 0.7, "search": True, "rearrange": True, "importance": "taylor"}, "prune.importance='fisher'"),
    ({"heads": 0.25, "rearrange": True}, "set prune.search=true"),
    ({"heads": 0.25, "target_macs": 0.7}, "not both"),
    ({"heads": 1.5}, "prune.heads"),
    ({"heads": 0.25, "importance": "fisher"}, "Fisher importance needs images"),
    ({"heads": 0.25, "reconstruct": True}, "reconstruct needs images"),
    ({"heads": 0.25, "importance": "hessian"}, "unknown value 'hessian'"),
    ({"target_latency": 0.8, "importance": "fisher"}, "prune.target_latency is a share of the latency the mask"),
    ({"target_latency": 0.8, "search": True, "target_runtime": "onnxruntime", "time_precision": "int8"},
     "prune.time_precision=int8 times on OpenVINO"),
    ({"target_latency": 0.8, "search": True, "importance": "fisher", "time_precision": "auto"}, "prune_model has none"),
])
def test_the_api_refuses_settings_that_cannot_work_in_one_line(tiny_vit, kwargs, message):
    import compress
    from compress.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        compress.prune_model(tiny_vit, **kwargs)
    assert "\n" not in str(caught.value)
