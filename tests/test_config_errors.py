"""Every error the config models can raise, cross-field rules included, stops `compress run` before the run
directory exists: one line, exit code 1, nothing created.

The invalid values are generated from the models themselves (each field's choices and bounds), so a field added
later is covered without editing this file; the cross-field rules are listed by hand.
"""

import typing

import annotated_types
import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.config import RunConfig

CROSS_FIELD = {
    "two prune targets": ["prune.target_macs=0.5", "prune.target_latency_ms=3.0"],
    "iterations with a target": ["prune.target_macs=0.5", "prune.iterations=2"],
    "shares with a target": ["prune.heads=0.25", "prune.target_macs=0.5"],
    "rearrangement without the search": ["prune.rearrange=true", "prune.importance='fisher'"],
    "EViT layers and depths": ["tokens.layers=[1]", "tokens.depths=[0.5]"],
    "a setting of the other token method": ["tokens.method='tome'", "tokens.keep_rate=0.5"],
    "a stage listed twice": ['pipeline.stages=["prune", "prune"]', "prune.heads=0.25"],
    "recover before prune": ['pipeline.stages=["recover", "prune"]', "recover.epochs=1", "prune.heads=0.25"],
    "recover without epochs": ['pipeline.stages=["prune", "recover"]', "prune.heads=0.25"],
    "a float stage after quantize": ['pipeline.stages=["quantize", "tokens"]'],
    "deploy not last": ['pipeline.stages=["deploy", "quantize"]'],
    "pruning with nothing to prune": ["prune.enabled=true"],
    "unknown key": ["prune.head=0.25"],
    "unknown section": ["prunning.heads=0.25"],
}


def _bad_values(annotation, metadata) -> list:
    """Values the field must refuse: outside its bounds, or not one of its choices."""
    bad = []
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            bad.append(m.ge - 1)
        elif isinstance(m, annotated_types.Gt):
            bad.append(m.gt)
        elif isinstance(m, annotated_types.Le):
            bad.append(m.le + 1)
        elif isinstance(m, annotated_types.Lt):
            bad.append(m.lt)
        elif isinstance(m, annotated_types.MinLen) and m.min_length > 0:
            bad.append([])
    if typing.get_origin(annotation) is typing.Literal:
        bad.append("not-a-choice")
    if annotation is bool:
        bad.append("'maybe'")
    return bad


def _generated() -> dict[str, list[str]]:
    cases = {}
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            continue
        for name, info in model.model_fields.items():
            annotation = info.annotation
            inner = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
            for candidate in inner:
                for value in _bad_values(candidate, info.metadata):
                    text = value if isinstance(value, str) else repr(value).replace("'", '"')
                    cases[f"{section}.{name}={text}"] = [f"{section}.{name}={text}"]
                if typing.get_origin(candidate) is list:  # each element's own bounds and choices
                    (element,) = typing.get_args(candidate)
                    base = typing.get_args(element)[0] if typing.get_origin(element) is typing.Annotated else element
                    meta = [m for a in typing.get_args(element)[1:] for m in getattr(a, "metadata", [a])] \
                        if typing.get_origin(element) is typing.Annotated else []
                    for value in _bad_values(base, meta):
                        text = f'["{value}"]' if isinstance(value, str) else f"[{value!r}]"
                        cases[f"{section}.{name}={text}"] = [f"{section}.{name}={text}"]
    return cases


GENERATED = _generated()


def test_the_generator_covers_every_section():
    sections = {case.split(".")[0] for case in GENERATED}
    assert {"preprocess", "data", "train", "export", "measure", "prune", "recover", "tokens", "quantize",
            "pipeline"} <= sections, sections
    assert len(GENERATED) > 60


@pytest.mark.parametrize("settings", list(GENERATED.values()) + list(CROSS_FIELD.values()),
                         ids=list(GENERATED) + list(CROSS_FIELD))
def test_a_bad_recipe_fails_before_the_run_directory_exists(tmp_path, settings):
    out = tmp_path / "run"
    args = ["run", str(tmp_path / "model.safetensors"), "--data", "builtin:digits", "--out", str(out)]
    for item in settings:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: config"), result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
