"""Errors of the export layer."""


class ExportError(RuntimeError):
    """A model that could not be exported to ONNX."""


class ParityError(ExportError):
    """An exported model whose outputs disagree with the PyTorch model beyond tolerance."""
