"""What a head and an MLP unit cost in milliseconds on the target, for a mask search under a latency constraint.

Kwon et al. (NeurIPS 2022, "A Fast Post-Training Pruning Framework for Transformers") search the mask under either
a FLOPs or a latency constraint; for latency they time the target's layers at a range of head and neuron counts and
find the cost close to linear in each. On a CPU the two kinds of item do not cost in proportion to their MACs: on
the 2-core AMX machine, in NNCF INT8 on OpenVINO, halving every layer's heads of DINOv2 ViT-S/14 saved more time than
halving its MLP units (7.3 against 5.9 ms of 30.7) for two thirds of their MACs, so a head costs about 1.85x its
share of the MACs next to a unit (BENCHMARKS.md). Attention's softmax, products, reshapes and transposes scale with
the heads but do not run at INT8 GEMM speed. A mask searched under MACs removes units where removing heads would
buy more latency.

``fit_latency_model`` times the model itself, not a table of another machine's: copies with half of every layer's
heads, half of its units, and both removed are exported, made ready in the chain's final precision, and timed beside
the whole model in interleaved rounds. Least squares over the four gives the fixed cost and the cost of one head and
one unit; within each kind, a layer's cost is scaled by its share of that kind's MACs (after token reduction, later
layers see fewer tokens). The fit's residuals are reported; a slope that comes out non-positive (noise larger than
the effect) falls back to MAC-proportional costs, and the notes say so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress.model.vit import VisionTransformer
from compress.prune.structured import ItemCosts, mac_costs, remove, structure

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationSet

log = logging.getLogger(__name__)

# A function that times models side by side: {name: model} -> {name: median latency in ms}.
TimeModels = Callable[[Mapping[str, VisionTransformer]], Mapping[str, float]]


@contextlib.contextmanager
def timing_engines(models: Mapping[str, VisionTransformer], export: Callable[[VisionTransformer, Path], object],
                   precision: str, *, runtime: str, threads: int, calib: CalibrationSet | None = None,
                   smooth_quant: bool = False, progress: Callable[[int, int], None] | None = None
                   ) -> Iterator[dict[str, object]]:
    """An engine of each model, while the block lasts: exported by ``export(model, path)`` to a temporary ONNX file
    and made ready at ``precision`` on ``runtime`` (``compress.run.timing.timing_engine``: INT8 by ``nncf.quantize``
    on ``calib``)."""
    from compress.run.timing import timing_engine

    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for i, (name, model) in enumerate(models.items()):
            if progress is not None:
                progress(i, len(models))
            path = Path(tmp) / f"copy{i}.onnx"
            export(model, path)
            engines[name] = timing_engine(path, precision, calib, threads=threads, runtime=runtime,
                                          smooth_quant=smooth_quant)
        if progress is not None:
            progress(len(models), len(models))
        yield engines


def timer(export: Callable[[VisionTransformer, Path], object], precision: str, x: np.ndarray, *, runtime: str,
          threads: int, calib: CalibrationSet | None = None, smooth_quant: bool = False,
          progress: Callable[[int, int], None] | None = None) -> TimeModels:
    """A ``TimeModels`` on a real engine: each model's ``timing_engines`` timed on ``x`` in interleaved rounds
    (``runtimes.noise.interleaved``)."""
    from runtimes.noise import interleaved

    def time_models(models: Mapping[str, VisionTransformer]) -> Mapping[str, float]:
        with timing_engines(models, export, precision, runtime=runtime, threads=threads, calib=calib,
                            smooth_quant=smooth_quant, progress=progress) as engines:
            return interleaved(engines, x, threads=threads)

    return time_models


def uniform_copies(model: VisionTransformer, *, mlp_round_to: int = 1) -> dict[str, VisionTransformer]:
    """The model and three copies: half of every layer's heads kept, half its units, and both (the first of each;
    for latency, which ones does not matter). Unit counts stay multiples of ``mlp_round_to`` where they can."""
    depth = len(model.blocks)
    widths = structure(model)
    heads, units = widths["heads"], widths["mlp"]
    half_heads = [list(range(max(1, h // 2))) for h in heads]
    half_units = [list(range(max(mlp_round_to, (u // 2) // mlp_round_to * mlp_round_to) if u > mlp_round_to
                             else max(1, u // 2))) for u in units]
    all_heads = [list(range(h)) for h in heads]
    all_units = [list(range(u)) for u in units]
    copies = {"whole": model}
    for name, keep_heads, keep_units in (("half heads", half_heads, all_units), ("half units", all_heads, half_units),
                                         ("half both", half_heads, half_units)):
        if [len(k) for k in keep_heads] == heads and [len(k) for k in keep_units] == units:
            continue  # nothing left to halve (one head, one unit)
        copies[name] = remove(copy.deepcopy(model), keep_heads[:depth], keep_units[:depth])
    return copies


def fit_latency_model(model: VisionTransformer, time_models: TimeModels, *, mlp_round_to: int = 1,
                      label: str = "") -> ItemCosts:
    """Item costs in milliseconds for ``model``, fitted on the latencies ``time_models`` measures for
    ``uniform_copies`` of it (see the module's docstring). ``label`` names the runtime and precision in the notes."""
    macs = mac_costs(model)
    copies = uniform_copies(model, mlp_round_to=mlp_round_to)
    measured = dict(time_models(copies))
    # Each copy as (1, head MACs kept, unit MACs kept): the columns least squares weighs.
    rows, times = [], []
    for name, m in copies.items():
        widths = structure(m)
        rows.append([1.0, sum(n * c for n, c in zip(widths["heads"], macs.head)),
                     sum(n * c for n, c in zip(widths["mlp"], macs.unit))])
        times.append(measured[name])
    a, t = np.asarray(rows), np.asarray(times)
    scale = a.max(axis=0)  # columns of MACs are ~1e9; scaled, the system is well conditioned
    coef, *_ = np.linalg.lstsq(a / scale, t, rcond=None)
    fixed, per_head_mac, per_unit_mac = coef / scale
    points = [{"copy": name, "heads": sum(structure(m)["heads"]), "mlp_units": sum(structure(m)["mlp"]),
               "latency_ms": round(measured[name], 4), "fitted_ms": round(float(row @ coef), 4)}
              for (name, m), row in zip(copies.items(), a / scale)]
    notes = {"timed": label, "points": points,
             "max_residual_ms": round(max(abs(p["latency_ms"] - p["fitted_ms"]) for p in points), 4)}
    whole = measured["whole"]
    if per_head_mac <= 0 or per_unit_mac <= 0 or len(copies) < 4:
        # Noise larger than the effect (or a model with nothing to halve): costs in proportion to MACs, scaled to
        # the measured whole model, so the search still runs and its target still reads as a share of latency.
        ratio = whole / macs.full
        log.warning("prune: the latency model could not be fitted (ms per MAC: heads %.3g, units %.3g); costs in "
                    "proportion to MACs instead", per_head_mac, per_unit_mac)
        notes["fallback"] = "non-positive slope: costs in proportion to MACs"
        return ItemCosts([c * ratio for c in macs.head], [c * ratio for c in macs.unit], whole, "latency", notes)
    head = [c * per_head_mac for c in macs.head]
    unit = [c * per_unit_mac for c in macs.unit]
    notes |= {"fixed_ms": round(float(fixed), 4), "head_ms": round(float(np.mean(head)), 5),
              "unit_ms": round(float(np.mean(unit)), 7),
              "head_vs_unit_per_mac": round(float(per_head_mac / per_unit_mac), 3)}
    log.info("prune: latency model (%s): one head %.3f ms, one MLP unit %.5f ms, fixed %.2f ms; a head costs %.2fx "
             "its MACs' share next to a unit; worst residual %.2f ms of %.2f", label, notes["head_ms"],
             notes["unit_ms"], fixed, notes["head_vs_unit_per_mac"], notes["max_residual_ms"], whole)
    # The costs are the fit's; the whole model's cost is the fit's too, so that fractions of it add up.
    kept = structure(model)
    full = float(fixed) + sum(h * c for h, c in zip(kept["heads"], head)) + sum(
        u * c for u, c in zip(kept["mlp"], unit))
    return ItemCosts(head, unit, full, "latency", notes)

