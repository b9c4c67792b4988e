"""Errors of the data layer: a dataset that is missing, empty or unusable."""


class DatasetError(ValueError):
    """A dataset that is missing, has no images or a single class, or images the model cannot take."""
