"""Least-squares repair of a pruned ViT from calibration images: whole weights, or Kwon et al.'s mask tuning."""

import copy

import numpy as np
import pytest
import torch

from compress.model.vit import ViTConfig, VisionTransformer
from compress.prune.reconstruct import reconstruct
from compress.prune.structured import PruneError, l2_importance, prune_by_ratio


def _model(**switches) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                       num_classes=10, **switches)).eval()


def _images(n: int = 64) -> list[np.ndarray]:
    x = np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)
    return [x[i : i + 16] for i in range(0, n, 16)]


@pytest.mark.parametrize("weights", [False, True])
def test_an_unpruned_model_is_left_as_it_was(weights):
    model = _model(layer_scale_init=0.5)
    same = copy.deepcopy(model)
    assert reconstruct(same, model, _images(), weights=weights)["fit"] == ("weights" if weights else "scales")
    for a, b in zip(same.state_dict().values(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4)


def test_a_pruned_model_follows_the_unpruned_stream_more_closely():
    model = _model()
    pruned = prune_by_ratio(model, l2_importance(model), heads=0.5, mlp=0.5)
    shape = {k: v.shape for k, v in pruned.state_dict().items()}
    info = reconstruct(pruned, model, _images())
    assert info["stream_mse_after"] < info["stream_mse_before"] and info["images"] == 64
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shape  # scales fold in: the same shapes


def test_post_norm_blocks_are_refused_in_one_line():
    model = _model(pre_norm=False)
    with pytest.raises(PruneError, match="pre-norm blocks"):
        reconstruct(copy.deepcopy(model), model, _images(16))


def test_refitting_whole_weights_follows_the_stream_more_closely_than_scales_with_the_same_shapes():
    model = _model(layer_scale_init=0.5)
    pruned = prune_by_ratio(model, l2_importance(model), heads=0.5, mlp=0.5)
    scaled, refitted = copy.deepcopy(pruned), copy.deepcopy(pruned)
    by_scales = reconstruct(scaled, model, _images(), weights=False)
    by_weights = reconstruct(refitted, model, _images(), weights=True)
    assert by_weights["stream_mse_after"] < by_scales["stream_mse_after"] < by_scales["stream_mse_before"]
    assert {k: v.shape for k, v in refitted.state_dict().items()} == {k: v.shape
                                                                      for k, v in pruned.state_dict().items()}


def test_the_kept_heads_and_units_are_found_in_the_unpruned_block_and_the_repair_is_the_same_either_way(
        monkeypatch):
    """Removal leaves the kept heads' and units' weights untouched, so their outputs are columns of the unpruned
    block's (computed once for the target and the fit); a block whose weights moved (fine-tuned after pruning) is
    not matched, and its own outputs are computed instead, to the same repair."""
    from compress.prune import reconstruct as module
    from compress.prune.structured import remove

    model = _model(layer_scale_init=0.5)
    pruned = remove(model, [[0, 2], [3]], [[1, 5, 9] + list(range(20, 60)), list(range(100, 256, 3))])
    # heads 0 and 2 of 4, 16 wide: columns 0-15 and 32-47 of the unpruned block's per-head outputs
    assert module._kept_head_columns(pruned.blocks[0], model.blocks[0]).tolist() == [*range(16), *range(32, 48)]
    assert module._kept_head_columns(pruned.blocks[1], model.blocks[1]).tolist() == list(range(48, 64))
    assert module._kept_units(pruned.blocks[1], model.blocks[1]).tolist() == list(range(100, 256, 3))
    moved = copy.deepcopy(pruned)
    with torch.no_grad():
        moved.blocks[0].attn.qkv.weight[0, 0] += 1e-3
        moved.blocks[0].mlp.fc1.bias[0] += 1e-3
    assert module._kept_head_columns(moved.blocks[0], model.blocks[0]) is None
    assert module._kept_units(moved.blocks[0], model.blocks[0]) is None

    found = copy.deepcopy(pruned)
    reconstruct(found, model, _images())
    monkeypatch.setattr(module, "_kept_head_columns", lambda *a: None)
    monkeypatch.setattr(module, "_kept_units", lambda *a: None)
    computed = copy.deepcopy(pruned)
    reconstruct(computed, model, _images())
    for a, b in zip(found.state_dict().values(), computed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
