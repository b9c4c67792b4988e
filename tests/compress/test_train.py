import numpy as np
import pytest
import torch

from calibration.datasets import Subset, digits_source, make_splits
from calibration.preprocess import Preprocess
from compress.train.loop import augment, cosine_lr, train
from compress.model.vit import ViTConfig, VisionTransformer

DIGITS = dict(image_size=8, in_chans=1, patch_size=2, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=10)


@pytest.fixture(scope="module")
def digits_train():
    source = digits_source()
    splits = make_splits(source, calib_size=0)
    return Subset(source, splits.train[:512], Preprocess(crop_size=8, in_chans=1, mean=(0.5,), std=(0.5,)))


def test_cosine_schedule():
    assert cosine_lr(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_augment_crops_and_flips_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(augment(x, padding=0, flip=False, generator=g), x)
    out = augment(x, padding=2, flip=True, generator=g)
    assert out.shape == x.shape
    flipped = augment(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    for i in range(2):  # every sample is either itself or its mirror image
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_training_lowers_the_loss(digits_train):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**DIGITS))
    seen = []
    train(model, digits_train, epochs=6, batch_size=32, lr=1e-3, warmup_epochs=1, crop_padding=0, flip=False,
          label_smoothing=0.0, progress=lambda p: seen.append(p.loss))
    assert np.mean(seen[-8:]) < np.mean(seen[:8]) - 0.3
    assert not model.training


class Interrupt(Exception):
    pass


def test_resume_mid_epoch_reproduces_an_uninterrupted_run(tmp_path, digits_train):
    options = dict(epochs=2, batch_size=64, lr=2e-3, warmup_epochs=0.5, crop_padding=1, flip=False, seed=1)
    torch.manual_seed(0)
    straight = VisionTransformer(ViTConfig(**DIGITS))
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, digits_train, **options)

    resumed = VisionTransformer(ViTConfig(**DIGITS))
    resumed.load_state_dict(init)

    def stop(p):
        if p.step == 11:  # mid-way through epoch 2 (8 steps an epoch), after that step's checkpoint
            raise Interrupt

    ckpt = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        train(resumed, digits_train, **options, checkpoint_path=ckpt, checkpoint_minutes=1e-9, progress=stop)
    assert torch.load(ckpt, weights_only=True)["step"] == 11
    fresh = VisionTransformer(ViTConfig(**DIGITS))  # weights come from the checkpoint
    train(fresh, digits_train, **options, checkpoint_path=ckpt)
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, fresh.state_dict()[key], atol=1e-6), key


def test_resume_with_other_options_is_refused(tmp_path, digits_train):
    from compress.errors import InputError

    model = VisionTransformer(ViTConfig(**DIGITS))
    train(model, digits_train, epochs=0.25, batch_size=64, checkpoint_path=tmp_path / "state.pt")
    with pytest.raises(InputError, match="other options"):
        train(model, digits_train, epochs=0.5, batch_size=64, checkpoint_path=tmp_path / "state.pt")


@pytest.mark.parametrize("content, message", [
    (b"\x80" + bytes(range(256)) * 4, "cannot be read as an interrupted run's state \\(truncated or corrupt\\)"),
    (b"", "cannot be read as an interrupted run's state \\(truncated or corrupt\\)"),  # an empty file
    (None, "is not an interrupted run's state \\(no options, model"),  # a tensor file of something else
])
def test_a_damaged_resume_state_is_one_line_and_left_as_it_was(tmp_path, digits_train, content, message):
    from compress.errors import InputError

    state = tmp_path / "state.pt"
    if content is None:
        torch.save({"weight": torch.zeros(2)}, state)
    else:
        state.write_bytes(content)
    before = state.read_bytes()
    with pytest.raises(InputError, match=message + ".*delete it to train from the start, or choose a new --out"):
        train(VisionTransformer(ViTConfig(**DIGITS)), digits_train, epochs=0.25, batch_size=64, checkpoint_path=state)
    assert state.read_bytes() == before


def test_micro_batches_give_the_same_update_with_less_memory(digits_train):
    from compress.train.loop import auto_micro_batch

    models = []
    for micro in (None, 8):
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig(**DIGITS))
        teacher = VisionTransformer(ViTConfig(**DIGITS)).eval()
        train(model, digits_train, epochs=0.5, batch_size=32, crop_padding=1, teacher=teacher, kd_alpha=0.5,
              micro_batch_size=micro)
        models.append(model.state_dict())
    assert max(float((models[0][k] - models[1][k]).abs().max()) for k in models[0]) < 1e-5
    vit_b = ViTConfig(image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072)
    assert auto_micro_batch(VisionTransformer(vit_b), 128) == 16  # ~2 GB of activations per piece
    assert auto_micro_batch(VisionTransformer(ViTConfig(**DIGITS)), 128) == 128  # small models: the whole batch


def test_bf16_on_a_cpu_without_bf16_units_trains_in_fp32_and_says_so(digits_train, caplog):
    """Emulated BF16 is slower than FP32: a recipe's bf16 switch must not cost a machine without the units."""
    from compress.env import cpu_has_bf16

    if cpu_has_bf16() is not False:
        pytest.skip("this CPU has BF16 units (or its flags cannot be read): BF16 autocast runs natively here")
    torch.manual_seed(0)
    asked, plain = VisionTransformer(ViTConfig(**DIGITS)), VisionTransformer(ViTConfig(**DIGITS))
    plain.load_state_dict(asked.state_dict())
    options = dict(epochs=0.25, batch_size=64, crop_padding=0, flip=False)
    with caplog.at_level("WARNING", logger="compress.train.loop"):
        train(asked, digits_train, **options, bf16=True)
    assert "no BF16 units" in caplog.text and "training in FP32" in caplog.text
    train(plain, digits_train, **options, bf16=False)
    assert all(torch.equal(a, b) for a, b in zip(asked.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("frozen_blocks", [1, 2])  # 2 = the depth: a linear probe on cached pooled features
def test_a_frozen_prefix_is_cached_once_and_left_untouched(digits_train, frozen_blocks):
    from compress.train.frozen import FrozenPrefix

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**DIGITS | {"layer_scale_init": 0.5, "pool": "cls_mean"}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = FrozenPrefix(model, frozen_blocks)
    x = torch.from_numpy(next(digits_train.batches(16))[0])
    with torch.inference_mode():  # the tail on the cached outputs is the whole model (float16 storage aside)
        cached = prefix.encode(x) if prefix.probe else prefix.encode(x).half()
        assert (prefix.tail(cached) - model(x)).abs().max() < 2e-2
    on_runtime = prefix.cache(digits_train)  # the one pass runs on ONNX Runtime or OpenVINO, checked here too
    assert on_runtime.shape[0] == len(digits_train) and (on_runtime[:16].float() - cached.float()).abs().max() < 1e-2
    phases, seen = set(), []
    train(model, digits_train, epochs=4, batch_size=32, lr=5e-3, warmup_epochs=0, frozen=prefix,
          progress=lambda p: (phases.add(p.phase), p.phase == "train" and seen.append(p.loss)))
    assert phases == {"frozen features (training)", "train"} and np.mean(seen[-4:]) < np.mean(seen[:4])
    after = model.state_dict()
    frozen = ["patch_embed.", "cls_token", "pos_embed", *[f"blocks.{i}." for i in range(frozen_blocks)],
              *(["norm."] if frozen_blocks == 2 else [])]
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        assert changed != name.startswith(tuple(frozen)), name  # the frozen part kept, all the rest trained
    assert all(p.requires_grad for p in model.parameters())  # the model goes on whole


def test_a_model_is_scored_on_a_compiled_engine_that_agrees_with_pytorch(digits_train, caplog):
    """What the train job scores a fully trained model with: exported, checked and run on OpenVINO or ONNX
    Runtime, whichever is faster here."""
    import logging

    from compress.train.frozen import compiled

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**DIGITS)).eval()
    images = next(digits_train.batches(128))[0]
    with caplog.at_level(logging.INFO, logger="compress.train.frozen"):
        run = compiled(model, images[:8], what="the evaluation images")
    assert run is not None and "the evaluation images run on " in caplog.text
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
    got = run(images)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_frozen_blocks_run_where_asked_and_the_same_twice(digits_train, runtime):
    """``train.frozen_runtime``: a pinned runtime is used and said, and it computes the same cache bit for bit on a
    second pass (what a reproducible build of the reference model needs; ``auto`` may pick either by a timing)."""
    from compress.train.frozen import FrozenPrefix

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**DIGITS | {"pool": "cls_mean"}))
    first = FrozenPrefix(model, 1, runtime=runtime)
    cached = first.cache(digits_train)
    assert first.ran_on == runtime
    again = FrozenPrefix(model, 1, runtime=runtime).cache(digits_train)
    assert torch.equal(cached, again)
    in_torch = FrozenPrefix(model, 1, runtime="torch")
    assert (in_torch.cache(digits_train).float() - cached.float()).abs().max() < 1e-2 and in_torch.ran_on == "torch"


def test_a_frozen_runtime_that_is_not_there_is_one_line(digits_train, monkeypatch):
    from compress.errors import InputError
    from compress.train import frozen

    monkeypatch.setattr(frozen, "compiled", lambda *a, **k: None)  # as when the runtime is not installed
    prefix = frozen.FrozenPrefix(VisionTransformer(ViTConfig(**DIGITS)), 1, runtime="onnxruntime")
    with pytest.raises(InputError, match="cannot run on onnxruntime here .* set train.frozen_runtime to 'auto'"):
        prefix.cache(digits_train)


def test_freezing_more_blocks_than_the_model_has_is_one_line(digits_train):
    from compress.errors import InputError

    with pytest.raises(InputError, match=r"train.frozen_blocks=3, but the model has 2 blocks; give 1 to 2"):
        train(VisionTransformer(ViTConfig(**DIGITS)), digits_train, epochs=1, frozen_blocks=3)


def test_the_training_device_is_resolved_and_cuda_without_a_gpu_is_one_line():
    from compress.errors import InputError
    from compress.train.distributed import device

    assert device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert device("auto").type == device("cuda").type == "cuda"
        return
    assert device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="train.device=cuda.*sees no CUDA GPU") as e:
        device("cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown training device"):
        device("tpu")


def test_training_on_the_gpu_matches_the_cpu_and_returns_the_model_to_the_cpu(digits_train):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (PyTorch sees none): the GPU path of train.device runs on a machine with one")
    models = []
    for where in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig(**DIGITS))
        result = train(model, digits_train, epochs=1, batch_size=64, lr=1e-3, device=where, crop_padding=0,
                       flip=False)
        assert result.steps == len(digits_train) // 64
        assert all(p.device.type == "cpu" for p in model.parameters())
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)  # the same steps, up to the GPU's float sums
