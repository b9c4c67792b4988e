"""The run configuration: defaults < TOML recipe < ``--set section.key=value``, validated by pydantic.

One model with a sub-model per stage, every field defaulted, unknown keys an error (as fastapi-cli does
with its settings). ``[model]`` is the exception: it holds overrides of the checkpoint's own hyper-parameters
(``ViTConfig``), since most of them come from the checkpoint; they are checked when the model is built.
The resolved config is saved beside the results of every run.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import ConfigError
from runtimes import RUNTIME_NAMES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)




class PreprocessConfig(Section):
    """Overrides of the checkpoint's preprocessing; unset fields keep the checkpoint's (or the defaults)."""

    crop_size: int | None = Field(None, ge=1)
    resize_size: int | None = Field(None, ge=1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    mean: list[float] | None = Field(None, min_length=1, max_length=4)  # one value per input channel
    std: list[float] | None = Field(None, min_length=1, max_length=4)
    # Their values are checked once, where every source of preprocessing meets: ``Preprocess`` (positive std, one
    # value per channel, resize no smaller than crop), raised as a ConfigError by ``resolve_preprocess``.


class DataConfig(Section):
    path: str | None = None  # ImageFolder or idx directory, or "builtin:digits"
    calib_size: int = Field(512, ge=0)
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # used when the dataset has no test split of its own
    eval_limit: int | None = Field(None, ge=1)  # evaluate on N images of the evaluation split (a random sample)
    train_limit: int | None = Field(None, ge=1)  # train on N images of the training split (stratified sample)
    seed: int = 0


class TrainConfig(Section):
    epochs: float = Field(10, gt=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    bf16: bool = False  # BF16 autocast: on CPUs with BF16 units (AVX-512 BF16, AMX) and on CUDA GPUs that have it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a CUDA GPU when PyTorch sees one, else the CPU
    seed: int = 0
    checkpoint_minutes: float = Field(5.0, gt=0)
    eval_every_epochs: int = Field(0, ge=0)  # 0: evaluate only at the end
    micro_batch_size: int | None = Field(None, ge=1)  # gradient accumulation pieces; None: sized to ~2 GB
    # freeze the embedding and the first N blocks, computing their outputs once per image (compress.train.frozen);
    # N = the model's depth trains the head alone on cached features: a linear probe
    frozen_blocks: int = Field(0, ge=0)
    # where those outputs are computed: "auto" takes whichever of OpenVINO and ONNX Runtime is faster on one timed
    # call, so two builds can differ in the last bits of every cached feature (and the trained weights' SHA-256);
    # name one for a build that must be reproduced bit for bit
    frozen_runtime: Literal["auto", "openvino", "onnxruntime", "torch"] = "auto"


class ExportConfig(Section):
    opset: int = Field(18, ge=17)
    # PyTorch's TorchScript-based exporter (several times faster here), falling back to the dynamo exporter
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    simplify: Literal["onnxslim", "none"] = "onnxslim"
    atol: float = Field(1e-4, gt=0)  # parity tolerance on logits, FP32 against PyTorch
    min_agreement: float = Field(0.99, ge=0, le=1)
    # with ToMe or PiToMe merging, the tolerance instead (top-1 must still agree on min_agreement of the inputs):
    # their matching picks among near-equal similarities, and float rounding that differs by 1e-7 between runtimes
    # can flip such a pick (seen: 0.04 on the reference ViT-S at r=13); each runtime's accuracy is measured on that
    # runtime
    merge_atol: float = Field(0.1, gt=0)
    # the graph the model is written as before export (compress.model.runtime_graph): "openvino" splits the fused
    # qkv, folds LayerScale and writes the attention scores as an einsum, which OpenVINO runs faster (NNCF INT8 of
    # the reference ViT-S: about 0.9x; BENCHMARKS.md) and ONNX Runtime slower; "standard" is the model as it is;
    # "auto" takes "openvino" when the first runtime of measure.runtimes that runs ONNX files is OpenVINO
    graph: Literal["auto", "standard", "openvino"] = "auto"

    def atol_for(self, model) -> float:
        """The logit tolerance for exporting ``model``: ``merge_atol`` where it merges tokens, else ``atol``."""
        plan = getattr(model, "token_reduction", None)
        merges = plan is not None and plan.method in ("tome", "pitome") and any(plan.r)
        return max(self.atol, self.merge_atol) if merges else self.atol


class MeasureConfig(Section):
    runtimes: list[Literal[RUNTIME_NAMES]] = Field(["torch", "onnxruntime", "openvino"], min_length=1)
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field([1, 8], min_length=1)
    threads: int | None = Field(None, ge=1)  # None: every core of this machine
    warmup: int = Field(5, ge=0)
    iterations: int = Field(50, ge=1)
    max_seconds: float = Field(10.0, gt=0)  # per (runtime, precision, batch); stops earlier iterations
    eval_batch_size: int = Field(64, ge=1)
    # a model is scored on the whole evaluation split on the first runtime and precision of measure.runtimes that
    # runs it; every other one scores the split's first N images (a random sample: the split is shuffled) and its
    # top-1 is that full score moved by the paired difference on the sample. 0: every runtime on the whole split
    agreement_sample: int = Field(300, ge=0)
    # a runtime agreeing with the fully scored one on less than this share of the sample is scored in full
    sample_min_agreement: float = Field(0.99, ge=0, le=1)
    profile: bool = True  # per-layer profile (runtimes.profile) of every engine at the first batch size
    # The float precision a float model is judged in: scored on the whole split in it (the baseline's reference,
    # every stage's drop, the settings a stage tries), the other precision checked on a sample. bf16 scores the
    # reference ViT-S 3.6-4.1x faster than fp32 on a CPU with AMX (8.8 against 36.3 ms an image as loaded;
    # bench/judge_precision.py), so a run can judge on the whole split in the time fp32 takes for a quarter of it.
    # "auto": bf16 where the first of
    # measure.runtimes runs bf16 natively (OpenVINO on a CPU with AVX-512 BF16 or AMX, where OpenVINO itself
    # defaults to it and runs an INT8 model's float parts in it), else fp32.
    judge_precision: Literal["fp32", "bf16", "auto"] = "fp32"


class PruneConfig(Section):
    """Head and MLP-unit pruning. Either ratios, or a MAC or latency target that sets one ratio for both, or (with
    ``search``) a MAC or latency target (or several, tried under a budget) within which the heads and units kept are
    chosen to keep the most importance."""

    enabled: bool = False
    heads: float = Field(0.0, ge=0, lt=1)  # share of all attention heads removed
    mlp: float = Field(0.0, ge=0, lt=1)  # share of all MLP hidden units removed
    importance: Literal["taylor", "fisher", "l2"] = "taylor"  # fisher: squared per-image gradients (Kwon et al.)
    # Taylor loss against: the labels, the unpruned model's top-1 predictions, or its soft predictions
    targets: Literal["labels", "predictions", "soft"] = "labels"
    importance_samples: int = Field(256, ge=1)  # images of the calibration split scored for Taylor importance
    # after each pruning, repair each block by per-layer least squares on 256 calibration images, no training
    # (compress.prune.reconstruct), fitting what reconstruct_fit says
    reconstruct: bool = False
    # what the repair fits: the whole weight and bias of each block's attn.proj and mlp.fc2, or one scale per kept
    # head and unit (Kwon et al.'s mask tuning); on the reference ViT-S at 0.8x the MACs, 0.4 pt lost against 4.8
    reconstruct_fit: Literal["scales", "weights"] = "weights"
    min_heads_per_layer: int = Field(1, ge=1)
    mlp_round_to: int = Field(1, ge=1)  # keep a multiple of this many MLP units per layer (aligned GEMM widths)
    scope: Literal["global", "layer"] = "global"  # rank all layers together, or remove the same share from each
    # fraction of the unpruned model's MACs; with search, also a list of them: see target_latency
    target_macs: float | list[float] | None = None
    # with search: fraction of the unpruned model's latency on target_runtime in time_precision, as a latency model
    # fitted on the model predicts it (compress.prune.latency: a head and an MLP unit cost unlike their MACs on a CPU).
    # A list (of either target): the targets are bisected, each tried one searched, repaired and scored in FP32 on
    # target_runtime, and the most cut within max_drop (under a chain budget, budget_share of what is left) goes on
    target_latency: float | list[float] | None = None
    # with target_macs or target_latency: Kwon et al.'s mask search (compress.prune.structured.search_mask): how many
    # heads and how many MLP units to keep, and where, all layers ranked together by raw Fisher or Taylor importance;
    # off: one share of heads and units alike, raised until the MAC target is met
    search: bool = False
    # with search and importance='fisher': Kwon et al.'s mask rearrangement (compress.prune.structured.rearrange_mask):
    # within each layer, exchange kept and removed heads (units) so the removed ones cost the least together, by the
    # Fisher information between their masks; the counts, so the MACs, stay as searched
    rearrange: bool = False
    target_latency_ms: float | None = Field(None, gt=0)  # on target_runtime at target_batch, FP32
    target_runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    target_batch: int = Field(1, ge=1)
    # the precision target_latency is timed in: "auto" is the chain's final one on OpenVINO (INT8 when the quantize
    # stage runs NNCF, BF16 when it offers only bf16), else FP32
    time_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    time_calib_size: int = Field(32, ge=1)  # images the timing-only nncf.quantize calibrates on
    max_drop: float = Field(1.0, ge=0)  # with a list of targets: top-1 points against the stage's input model
    budget_share: float = Field(1.0, gt=0, le=1)  # with a list of targets, under a chain budget: as tokens.budget_share
    iterations: int = Field(1, ge=1)  # prune a little, recover, repeat (recovery split evenly)

    def search_targets(self) -> list[float]:
        """The search's targets, each once, the mildest (largest fraction) first."""
        target = self.target_latency if self.target_latency is not None else self.target_macs
        return sorted(set(target if isinstance(target, list) else [target]), reverse=True)

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [n for n in ("target_macs", "target_latency_ms", "target_latency") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"set one of prune.{given[0]} and prune.{given[1]}, not both")
        if given and (self.heads or self.mlp):
            raise ValueError("a MAC or latency target sets how much is pruned, so prune.heads and prune.mlp would be "
                             "ignored; set the shares or the target, not both (prune.heads=0 prune.mlp=0 clears them)")
        if self.target_latency is not None and not self.search:
            raise ValueError("prune.target_latency is a share of the latency the mask search keeps; set "
                             "prune.search=true (with prune.importance='fisher' or 'taylor')")
        for name in ("target_macs", "target_latency"):
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                raise ValueError(f"prune.{name} is an empty list; give a fraction or a list of them, e.g. [0.8, 0.7]")
            bad = [v for v in (value if isinstance(value, list) else [value]) if value is not None and not 0 < v < 1]
            if bad:
                of = "MACs" if name == "target_macs" else "latency"
                raise ValueError(f"prune.{name} is a fraction of the unpruned model's {of} and must be between 0 and 1 "
                                 f"(exclusive), got {bad[0]:g}; e.g. 0.8")
            if isinstance(value, list) and not self.search:
                raise ValueError(f"prune.{name} is a list of targets, which only the mask search tries; set "
                                 "prune.search=true, or give one fraction")
        if self.search and self.target_macs is None and self.target_latency is None:
            raise ValueError("prune.search chooses heads and MLP units within a MAC or latency budget; set "
                             "prune.target_macs or prune.target_latency (e.g. 0.8), or remove prune.search")
        if self.time_precision in ("bf16", "int8") and self.target_runtime != "openvino":
            raise ValueError(f"prune.time_precision={self.time_precision} times on OpenVINO; set "
                             "prune.target_runtime=openvino, or prune.time_precision=fp32")
        if self.search and self.scope == "layer":
            raise ValueError("prune.search ranks every layer's heads and units together, so prune.scope='layer' "
                             "cannot hold; remove prune.scope or prune.search")
        if self.search and self.importance == "l2":
            raise ValueError("prune.search weighs heads against MLP units by their effect on the loss, which L2 norms "
                             "do not measure; set prune.importance='fisher' (or 'taylor')")
        if self.rearrange and not self.search:
            raise ValueError("prune.rearrange refines the mask prune.search finds; set prune.search=true (with "
                             "prune.target_macs), or remove prune.rearrange")
        if self.rearrange and self.importance != "fisher":
            raise ValueError("prune.rearrange weighs masks by the Fisher information between them; set "
                             "prune.importance='fisher', or remove prune.rearrange")
        if (self.target_macs is not None or self.target_latency_ms is not None) and self.iterations > 1:
            raise ValueError("prune.iterations > 1 works with prune.heads / prune.mlp ratios, not with a MAC or "
                             "latency target; set prune.iterations=1")
        return self


class RecoverConfig(Section):
    """Fine-tuning after pruning, distilled from the unpruned model, on the training split."""

    epochs: float = Field(0.0, ge=0)  # 0: no recovery
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    kd_alpha: float = Field(0.7, ge=0, le=1)  # weight of the distillation term; the rest is cross-entropy
    kd_temperature: float = Field(2.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    bf16: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # as train.device, for recovery and token fine-tuning
    seed: int = 0
    micro_batch_size: int | None = Field(None, ge=1)  # gradient accumulation pieces; None: sized to ~2 GB


# each token reduction method's one setting (the config's and ``compress.api.reduce_tokens``' argument)
TOKEN_SETTING = {"tome": "r", "pitome": "r", "evit": "keep_rate", "resolution": "image_size"}


class TokensConfig(Section):
    """Token reduction at inference: ToMe merging, EViT pruning or a lower working resolution, chosen under an
    accuracy budget.

    Give a setting (``r`` for ToMe, ``keep_rate`` for EViT, ``image_size`` for resolution) to try just that one;
    otherwise the stage finds the settings that bring the model to each fraction of its MACs in ``macs`` and tries
    those. Every setting tried is measured (top-1 and latency on ``target_runtime``) and recorded; the fastest
    within ``max_drop`` is kept, and when none is, the model goes on unreduced.
    """

    enabled: bool = False
    method: Literal["tome", "pitome", "evit", "resolution"] = "tome"
    r: int | list[int] | None = None  # ToMe, PiToMe: tokens merged per layer (one int, or one per layer)
    # ToMe, PiToMe: how an int r is spread over the layers: every layer, 2r falling to 0, all in the first block, or
    # r in each of `layers` (or `depths`)
    schedule: Literal["constant", "decreasing", "first", "layers"] = "constant"
    # ToMe, PiToMe, searched settings: only those leaving a multiple of `align` tokens after every merging layer.
    # GEMM kernels work on tiles of rows (16 for AMX): on the 2-core AMX CPU, in NNCF INT8 on OpenVINO, DINOv2
    # ViT-S/14 with 240 tokens after its first block ran at 0.88x the latency of 257 tokens, with 241 at 0.94x,
    # and 256 at 0.96x for no MACs saved (BENCHMARKS.md)
    align: int = Field(1, ge=1)
    # ToMe, PiToMe: what the matching compares: the attention keys averaged over heads (the papers' choice) or the
    # tokens after attention themselves. On the reference ViT-S the tokens cost 0.05-0.42 pt less top-1 in each of
    # the 4 comparisons made (BENCHMARKS.md, "Where the one merge goes")
    similarity: Literal["keys", "tokens"] = "keys"
    keep_rate: float | list[float] | None = None  # EViT: share of patch tokens kept at each of `layers`
    # EViT: where to prune (default: at 1/4, 1/2 and 3/4 of the depth); ToMe, PiToMe under schedule="layers":
    # where r is merged
    layers: list[int] | None = None
    # the same as fractions of the depth, for recipes meant for any depth (2/3: layer 8 of 12, 4 of 6)
    depths: list[float] | None = None
    # resolution: the side in pixels the encoder works at (a multiple of the patch size below the input size); the
    # engine still takes the model's input size and resizes inside the graph
    image_size: int | None = Field(None, ge=1)
    macs: list[float] = [0.75, 0.6, 0.5]  # MAC fractions to find settings for when none is given
    max_drop: float = Field(1.0, ge=0)  # top-1 points against the stage's input model on target_runtime
    # under a chain budget (pipeline.max_drop): the most of what is left this stage may spend (1: all of it); less
    # leaves room for the stages after it, e.g. quantization
    budget_share: float = Field(1.0, gt=0, le=1)
    target_runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    target_batch: int = Field(1, ge=1)
    finetune_epochs: float = Field(0.0, ge=0)  # fine-tune with reduction on, distilled (recover.* settings)
    # with finetune_epochs: fine-tune every searched setting before judging it (finetune_epochs each, from the same
    # weights), as a named one is; off: searched settings are judged as they are and the chosen one is fine-tuned
    # after. On: a setting that only training brings within budget can be chosen, at the cost of training each.
    finetune_each: bool = False
    # The precision settings are timed in (top-1 is judged in FP32 either way). "auto": the one the chain will end
    # in on OpenVINO: INT8 from a quick nncf.quantize (of the settings within budget) when a later quantize stage
    # runs NNCF, BF16 when it offers only bf16, else FP32. On a CPU with AMX, ToMe that saved 6% in FP32 ran 15%
    # slower than the unreduced model in INT8 and BF16 (BENCHMARKS.md), so a choice timed in FP32 did not hold.
    time_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    time_calib_size: int = Field(32, ge=1)  # images the timing-only nncf.quantize calibrates on

    @model_validator(mode="after")
    def _one_setting(self) -> TokensConfig:
        if self.time_precision in ("bf16", "int8") and self.target_runtime != "openvino":
            raise ValueError(f"tokens.time_precision={self.time_precision} times on OpenVINO; set "
                             "tokens.target_runtime=openvino, or tokens.time_precision=fp32")
        if self.layers is not None and self.depths is not None:
            raise ValueError("set tokens.layers (layer numbers) or tokens.depths (fractions of the depth), not both")
        placed = self.layers is not None or self.depths is not None
        where = "tokens.layers and tokens.depths"
        if self.method in ("tome", "pitome") and self.schedule == "layers" and not placed:
            raise ValueError("tokens.schedule=layers merges r in the layers tokens.layers (or tokens.depths) names, "
                             "and neither is set; set tokens.layers=[1] for the second block")
        if self.method in ("tome", "pitome") and self.schedule != "layers" and placed:
            raise ValueError(f"{where} place ToMe's merges only under tokens.schedule=layers, not "
                             f"{self.schedule}; set that schedule, or remove them")
        if self.method == "resolution" and placed:
            raise ValueError(f"{where} place EViT's pruning or ToMe's merges, not a working resolution; remove them")
        if self.similarity != "keys" and self.method not in ("tome", "pitome"):
            raise ValueError(f"tokens.similarity is what ToMe and PiToMe match on, not a setting of {self.method}; "
                             "remove it, or set tokens.method=tome")
        if self.align > 1 and self.method not in ("tome", "pitome"):
            raise ValueError(f"tokens.align rounds the token counts ToMe and PiToMe leave, not {self.method}'s; "
                             "remove tokens.align, or set tokens.method=tome")
        if self.finetune_each and self.finetune_epochs == 0:
            raise ValueError("tokens.finetune_each fine-tunes each setting for tokens.finetune_epochs, which is 0; "
                             "set tokens.finetune_epochs, or remove tokens.finetune_each")
        for key in dict.fromkeys(TOKEN_SETTING.values()):
            if getattr(self, key) is not None and TOKEN_SETTING[self.method] != key:
                owners = " or ".join(repr(m) for m, k in TOKEN_SETTING.items() if k == key)
                raise ValueError(f"tokens.{key} belongs to tokens.method={owners}, not {self.method!r}; remove it, "
                                 "or switch tokens.method")
        return self


QUANTIZERS = ("onnxruntime-static", "onnxruntime-dynamic", "nncf", "neural-compressor", "fp16", "bf16")


class QuantizeConfig(Section):
    """The quantization stage: which quantizers make candidates, on what data, under what accuracy budget."""

    enabled: bool = True
    quantizers: list[Literal[QUANTIZERS]] = list(QUANTIZERS)
    max_drop: float = Field(1.0, ge=0)  # absolute top-1 points against the float model of the previous stage
    max_float_fraction: float = Field(0.5, ge=0, le=1)  # at most this share of target layers returned to float
    # Images drawn from the calibration split (class-stratified, seeded). Unset: 256, or the whole split when it
    # is smaller (with a warning); set: exactly that many, or an error.
    calib_size: int | None = Field(None, ge=1)
    calibration_data: str | None = None  # a .npy of preprocessed (N, C, H, W) inputs instead of the split
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # ONNX Runtime static
    op_types: list[Literal["MatMul", "Gemm", "Conv"]] = ["MatMul", "Gemm", "Conv"]
    exclude: list[str] = []  # layer names or glob patterns (e.g. "head", "blocks.11.*") kept in float
    # also quantize attention's activation x activation MatMuls (ONNX Runtime's Q/DQ; in OpenVINO's graph form,
    # export.graph, the scores are an einsum, which stays in float)
    attention_matmul: bool = False
    activations: Literal["int8", "uint8"] = "int8"  # int8: symmetric, readable by TensorRT; uint8: ORT's U8S8
    sensitivity_samples: int = Field(64, ge=1)
    inc_max_trials: int = Field(4, ge=0)  # neural-compressor autotune trials when over budget
    smoothquant_alpha: float | None = Field(0.5, ge=0, le=1)  # neural-compressor path; None: no SmoothQuant
    nncf_smooth_quant: bool = True  # NNCF's SmoothQuant (a Multiply before each MatMul input; off: fewer ops)
    # NNCF's accuracy control, when nncf.quantize misses the budget: the most groups of quantizers it may return to
    # float, each followed by a pass over the evaluation split (NNCF's own default has no limit)
    nncf_ac_max_iterations: int = Field(8, ge=1)
    # off: an INT8 model over the budget is dropped instead (the accuracy control ranks every quantizer group on
    # 300 images first: on a ViT-S at 224 on 2 cores, 230 of them, about 20 minutes)
    nncf_accuracy_control: bool = True
    fp16_keep_float32: list[str] = ["LayerNormalization"]


STAGES = ("prune", "recover", "tokens", "quantize", "deploy")
TARGETS = ("cpu-x86", "cpu-arm", "jetson-orin")  # compress.deploy.bundle.TARGETS describes each


class PipelineConfig(Section):
    """The chain: which stages run and in what order, one accuracy budget over all of them, and the target.

    With ``stages`` unset, the sections' own switches decide (``prune.enabled``, ``recover.epochs``,
    ``tokens.enabled``, ``quantize.enabled``), in the order prune, recover, tokens, quantize. With ``max_drop``
    set, each stage may spend what the stages before it left of the budget, and the run reports the stage that
    broke it; the final choice is the fastest candidate on the target's runtimes within it.
    """

    stages: list[Literal[STAGES]] | None = None  # e.g. ["prune", "recover", "tokens", "quantize", "deploy"]
    max_drop: float | None = Field(None, ge=0)  # top-1 points against the model as loaded, for the whole chain
    target: Literal[TARGETS] = "cpu-x86"


class RunConfig(Section):
    model: dict[str, Any] = {}
    preprocess: PreprocessConfig = PreprocessConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    measure: MeasureConfig = MeasureConfig()
    prune: PruneConfig = PruneConfig()
    recover: RecoverConfig = RecoverConfig()
    tokens: TokensConfig = TokensConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def dump(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def stage_order(self) -> list[str]:
        """The stages to run after the baseline, in order: ``pipeline.stages``, or the sections' own switches.

        ``quantize.enabled=false`` (or no quantizers) drops quantize from a listed order too, so ``--set`` wins.
        """
        order = self.pipeline.stages
        quantize = self.quantize.enabled and bool(self.quantize.quantizers)
        if order is None:
            return (["prune"] if self.prune.enabled else []) + \
                (["recover"] if self.prune.enabled and self.recover.epochs > 0 else []) + \
                (["tokens"] if self.tokens.enabled else []) + (["quantize"] if quantize else [])
        return [s for s in order if s != "quantize" or quantize]

    @model_validator(mode="after")
    def _stages_can_run(self) -> RunConfig:
        """The order of ``pipeline.stages`` works, and each stage in it has something to do."""
        order = self.pipeline.stages or []
        twice = sorted({s for s in order if order.count(s) > 1})
        if twice:
            raise ValueError(f"pipeline.stages lists {twice[0]!r} twice; list each stage once")
        position = {s: i for i, s in enumerate(order)}
        if "recover" in position and position.get("prune", len(order)) > position["recover"]:
            raise ValueError("pipeline.stages puts 'recover' before 'prune' (or has no 'prune'): recovery fine-tunes "
                             "a pruned model, so list 'prune' first")
        if "recover" in position and self.recover.epochs <= 0:
            raise ValueError("pipeline.stages lists 'recover' but recover.epochs is 0; set recover.epochs > 0")
        for stage in ("quantize", "deploy"):
            later = [s for s in order[position.get(stage, len(order)) + 1:] if s != "deploy"]
            if stage in position and later:
                raise ValueError(f"pipeline.stages puts {later[0]!r} after {stage!r}: {stage} works on the final "
                                 "float model, so list it after prune, recover and tokens")
        if "deploy" in position and position["deploy"] != len(order) - 1:
            raise ValueError("pipeline.stages: 'deploy' packs the final choice, so it comes last")
        p = self.prune
        if "prune" in self.stage_order() and not (p.heads or p.mlp or p.target_macs or p.target_latency_ms
                                                   or p.target_latency):
            raise ValueError("prune is on but there is nothing to prune: set prune.heads and/or prune.mlp, or "
                             "prune.target_macs, prune.target_latency_ms or (with prune.search) prune.target_latency")
        return self


def export_graph(config: RunConfig) -> str:
    """The graph form a run exports (``export.graph`` with "auto" resolved): "openvino" where the first runtime of
    ``measure.runtimes`` that runs ONNX files (PyTorch does not) is OpenVINO, else "standard"."""
    if config.export.graph != "auto":
        return config.export.graph
    first = next((r for r in config.measure.runtimes if r != "torch"), None)
    return "openvino" if first == "openvino" else "standard"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value), the value read as TOML (falling back to a string)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r} is not of the form section.key=value (e.g. --set train.epochs=5)")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(recipe: Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Resolve defaults < ``base`` (e.g. a built-in demo recipe) < recipe file < ``--set`` overrides.

    ``recipe`` is a TOML file or the name of a built-in recipe (``compress.recipes.BUILTIN_RECIPES``).
    """
    from compress.recipes import BUILTIN_RECIPES

    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    if recipe is not None and not Path(recipe).is_file() and str(recipe) in BUILTIN_RECIPES:
        _merge(data, json.loads(json.dumps(BUILTIN_RECIPES[str(recipe)])))
        recipe = None
    if recipe is not None:
        if not recipe.is_file():
            raise ConfigError(f"recipe {recipe} does not exist; pass the path of a TOML recipe or a built-in one "
                              f"({', '.join(BUILTIN_RECIPES)})")
        try:
            _merge(data, tomllib.loads(recipe.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {recipe} is not valid TOML: {e}") from e
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            section = first["loc"][0] if len(first["loc"]) > 1 else None
            fields = RunConfig.model_fields if section is None else RunConfig.model_fields[section].annotation.model_fields
            raise ConfigError(f"config: unknown key {where!r}; valid keys here are {sorted(fields)}") from e
        if first["type"] == "literal_error":
            expected = first["ctx"]["expected"]
            where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
            raise ConfigError(f"config {where}: unknown value {first.get('input')!r}; choose from {expected}") from e
        if first["type"] == "value_error":  # a rule of the models' own: its message names the keys and the fix
            rule = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"config {where}: {rule}" if where else f"config: {rule}") from e
        raise ConfigError(f"config {where}: {first['msg']} (got {first.get('input')!r})") from e


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
