"""Quantization: candidates from several libraries, each fitted to an accuracy budget.

- ``base``: the context every quantizer gets, the ``Candidate`` it returns, the default layer selection;
- ``onnxruntime_ptq``: ONNX Runtime ``quantize_static`` (QDQ; MinMax / Entropy / Percentile) and ``quantize_dynamic``;
- ``openvino_nncf``: NNCF on the OpenVINO model, plain and with ``quantize_with_accuracy_control``;
- ``neural_compressor_pt2e``: neural-compressor PT2E static INT8 and ``autotune``, exported to QDQ ONNX;
- ``fp16``: FP16 ONNX with LayerNorm in float32 (BF16 is an OpenVINO precision hint, see ``stage``);
- ``qdq``: tidy, inspect and check QDQ graphs, and return layers to float;
- ``sensitivity`` and ``budget``: rank layers by their quantization error, and find the fewest to keep in float;
- ``stage``: run the configured quantizers for ``compress run``.

Every library is imported inside the function that uses it, so a missing one fails only when asked for.
"""
