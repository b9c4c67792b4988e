import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.errors import ExportError, ParityError
from export.onnx_export import check_parity, export_onnx

ATOL = 1e-4  # FP32 logits, PyTorch against ONNX Runtime


@pytest.mark.slow
def test_export_parity_and_fused_layernorm(tmp_path, tiny_vit):
    result = export_onnx(tiny_vit, tmp_path / "m.onnx", example=torch.randn(2, 3, 32, 32),
                         parity_inputs=np.random.randn(16, 3, 32, 32).astype(np.float32))
    assert result.parity.max_abs_diff < ATOL and result.parity.agreement == 1.0
    ops = collections.Counter(n.op_type for n in onnx.load(result.path).graph.node)
    assert ops["LayerNormalization"] == 2 * 2 + 1  # norm1, norm2 per block, final norm
    assert "ReduceMean" not in ops and "Pow" not in ops
    assert result.nodes_final <= result.nodes_exported
    assert onnx.load(result.path).opset_import[0].version >= 17


def test_dynamic_batch_axis(tmp_path, tiny_vit):
    path = export_onnx(tiny_vit, tmp_path / "m.onnx", example=torch.randn(2, 3, 32, 32)).path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = np.random.randn(batch, 3, 32, 32).astype(np.float32)
        got = session.run(None, {"pixel_values": x})[0]
        assert np.abs(got - tiny_vit(torch.from_numpy(x)).detach().numpy()).max() < ATOL


def test_resized_position_embedding_exports(tmp_path, tiny_vit):
    tiny_vit.set_image_size(48)
    result = export_onnx(tiny_vit, tmp_path / "m48.onnx", example=torch.randn(1, 3, 48, 48),
                         parity_inputs=np.random.randn(4, 3, 48, 48).astype(np.float32))
    assert result.parity.max_abs_diff < ATOL


def test_parity_failure_is_an_error_and_leaves_no_file(tmp_path, tiny_vit):
    path = export_onnx(tiny_vit, tmp_path / "m.onnx", example=torch.randn(1, 3, 32, 32)).path
    with torch.no_grad():
        tiny_vit.head.bias += 1.0  # the file no longer matches the module
    with pytest.raises(ParityError, match="disagrees"):
        check_parity(tiny_vit, path, np.random.randn(2, 3, 32, 32).astype(np.float32), atol=ATOL, min_agreement=0.99)


def test_old_opset_is_refused(tmp_path, tiny_vit):
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(tiny_vit, tmp_path / "m.onnx", example=torch.randn(1, 3, 32, 32), opset=13)
    assert not (tmp_path / "m.onnx").exists()
