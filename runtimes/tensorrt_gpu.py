"""TensorRT on an NVIDIA GPU or a Jetson (GPU, optionally DLA): ONNX -> serialized engine -> logits and latency.

Engines are built, loaded and run through NVIDIA's Polygraphy (``NetworkFromOnnxPath``, ``CreateConfig``,
``EngineBytesFromNetwork``, ``TrtRunner``), which owns device memory, streams and copies; the GPU's name, compute
capability and CUDA version come from ``cuda-python``. What is ours is the policy around them, tested without a
GPU: which precision a file can build at (``plan_network``), the batch profile (``batch_profile``), and the
metadata that ties an engine to the device that built it (``check_engine_metadata``). The traps it is built around:
- an engine is tied to the GPU model and the TensorRT version that built it: ``build_engine`` writes
  ``<engine>.json`` with both, ``load_engine`` refuses an engine built elsewhere. Build on the target, from ONNX.
- precision comes from the ONNX file. Networks are strongly typed where TensorRT has it (always in 11): FP16 from
  an FP16 ONNX (LayerNorm fused and kept FP32; a decomposed one overflows), INT8 only from Q/DQ nodes (explicit
  quantization; implicit calibrators are deprecated since 10.1 and gone in 11). TensorRT 10 can still make FP16
  from a float32 ONNX with ``BuilderFlag.FP16`` on a weakly typed network (the flag is refused on strongly typed
  ones); 11 removed the flag.
- TF32 is switched off so an fp32 engine computes in FP32 and matches ONNX Runtime (NVIDIA/TensorRT#4492).
Latency is reported as trtexec does: end to end with the host-device copies, and the GPU compute apart (the
input already on the device, outputs left there: execute and synchronize).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.base import default_threads, measure_latency
from runtimes.errors import RuntimeNotInstalledError, RuntimeUnavailableError
from runtimes.files import sha256_file, write_bytes_atomic

_log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson it ships with JetPack 6 (sudo apt install nvidia-jetpack, or "
    "python3-libnvinfer for the Python bindings), on x86 with an NVIDIA GPU pip install tensorrt; engines must be "
    "built on the device that runs them"
)
REBUILD = "rebuild it on this device with `compress build-engine BUNDLE`"
PRECISIONS = ("fp32", "fp16", "int8")
METADATA_KEYS = ("tensorrt", "gpu", "compute_capability")  # what an engine is tied to
METADATA_FORMAT = 1


class EngineBuildError(RuntimeUnavailableError):
    """TensorRT cannot build an engine from this ONNX file with these options."""


class EngineMismatchError(RuntimeUnavailableError):
    """An engine built with another TensorRT version or on another GPU, or one whose metadata is missing."""


class CudaUnavailableError(RuntimeUnavailableError):
    """No CUDA runtime bindings (cuda-python), or no CUDA GPU visible to this process."""


POLYGRAPHY_HINT = ("TensorRT engines are built and run through NVIDIA's Polygraphy, which is not installed: "
                   "pip install polygraphy")
CUDA_PYTHON_HINT = ("no CUDA runtime bindings: pip install cuda-python (the major version of the CUDA that "
                    "TensorRT uses; on a Jetson, JetPack 6's CUDA 12: pip install 'cuda-python<13')")


# --- TensorRT and the device -----------------------------------------------------------------------------------
def _tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the bindings are there but libnvinfer is not
        raise RuntimeNotInstalledError(INSTALL_HINT) from e
    return trt


def _polygraphy():
    try:
        import polygraphy
    except ImportError as e:
        raise RuntimeNotInstalledError(POLYGRAPHY_HINT) from e
    return polygraphy


def _cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` since 12.8, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise CudaUnavailableError(CUDA_PYTHON_HINT) from e
    return runtime


def gpu_info(device: int = 0) -> dict[str, str]:
    """{"gpu": name, "compute_capability": "8.7", "cuda_runtime": "12.6"} of ``device``; raises
    ``CudaUnavailableError`` in one line when there are no CUDA bindings or no GPU."""
    cudart = _cudart()
    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != ok or count == 0:
        reason = getattr(err, "name", str(err)) if err != ok else "0 devices"
        raise CudaUnavailableError(f"no CUDA GPU is visible to this process (cudaGetDeviceCount: {reason}); "
                                   "check the driver and CUDA_VISIBLE_DEVICES")
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != ok:
        raise CudaUnavailableError(f"cannot read the properties of CUDA device {device} ({getattr(err, 'name', err)})")
    _, version = cudart.cudaRuntimeGetVersion()
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name.split("\x00")[0].strip(), "compute_capability": f"{prop.major}.{prop.minor}",
            "cuda_runtime": f"{version // 1000}.{version % 1000 // 10}"}


def tensorrt_version() -> str | None:
    try:
        return _tensorrt().__version__
    except RuntimeUnavailableError:
        return None


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def current_environment() -> dict[str, str]:
    """{"tensorrt", "gpu", "compute_capability", "cuda_runtime"} here; one line of RuntimeUnavailableError when
    TensorRT does not import or no CUDA GPU is visible."""
    trt = _tensorrt()
    _polygraphy()
    try:
        info = gpu_info()
    except CudaUnavailableError as e:
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} is installed but {e}; engines must be built "
                                      "and run on an NVIDIA GPU or Jetson") from e
    return {"tensorrt": trt.__version__, **info}


def check_engine_metadata(metadata: Mapping[str, Any], current: Mapping[str, Any], *, engine: str = "engine") -> None:
    """Raise ``EngineMismatchError`` (one line) unless ``metadata`` says the engine was built with the TensorRT
    version, GPU and compute capability of ``current``."""
    missing = [key for key in METADATA_KEYS if not metadata.get(key)]
    if missing:
        raise EngineMismatchError(f"{engine} metadata lacks {', '.join(missing)}, so it cannot be matched to this "
                                  f"device; {REBUILD}")
    if any(str(metadata[key]) != str(current.get(key)) for key in METADATA_KEYS):
        raise EngineMismatchError(
            f"{engine} built with TensorRT {metadata['tensorrt']} on GPU {metadata['gpu']} (compute capability "
            f"{metadata['compute_capability']}), but this device has TensorRT {current.get('tensorrt')} on "
            f"{current.get('gpu')} ({current.get('compute_capability')}); {REBUILD}"
        )


def _trt_logger():
    """Polygraphy's TensorRT logger: TensorRT keeps the first logger a process gives it, and Polygraphy's builder
    gives it first, so the runtime that loads engines shares it (messages go to Polygraphy's log)."""
    from polygraphy.backend.trt import util as trt_util

    return trt_util.get_trt_logger()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- what to build ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxSummary:
    has_fp16: bool  # FP16 initializers or casts to FP16: an FP16 artifact
    has_qdq: bool  # QuantizeLinear/DequantizeLinear nodes: explicit INT8


def inspect_onnx(path: Path) -> OnnxSummary:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    half = onnx.TensorProto.FLOAT16
    has_fp16 = any(t.data_type == half for t in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in graph.node)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    return OnnxSummary(has_fp16, has_qdq)


@dataclass(frozen=True)
class NetworkPlan:
    strongly_typed: bool
    flags: tuple[str, ...]  # names of the BuilderFlag precision flags to set


def plan_network(
    precision: str, onnx: OnnxSummary, *, strong_typing: bool, builder_flags: set[str] | frozenset[str], version: str,
    dla: bool = False,
) -> NetworkPlan:
    """How to type the network for ``precision``, given the ONNX file and what this TensorRT offers:
    ``strong_typing`` (NetworkDefinitionCreationFlag.STRONGLY_TYPED, or 11+ where it is the only mode) and
    ``builder_flags`` (which of FP16/INT8 BuilderFlag still exists). ``dla``: for a DLA core, which TensorRT
    10 drives with the FP16/INT8 flags on a weakly typed network (trtexec's --useDLACore --fp16 path). Raises
    ``EngineBuildError`` in one line when the combination cannot give that precision."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"TensorRT builds {', '.join(PRECISIONS)} engines, not {precision}")
    if precision == "int8" and not onnx.has_qdq:
        raise EngineBuildError("INT8 engines come only from a Q/DQ ONNX (explicit quantization; TensorRT "
                               "calibrators are not used): quantize the model first")
    if precision != "int8" and onnx.has_qdq:
        raise EngineBuildError(f"this ONNX holds Q/DQ nodes, so it builds as int8, not {precision}")
    if precision == "fp32" and onnx.has_fp16:
        raise EngineBuildError("this ONNX holds FP16 tensors, which a typed network keeps in FP16: build it as fp16")
    flag = {"fp16": "FP16", "int8": "INT8"}.get(precision)
    if dla and flag in builder_flags:
        return NetworkPlan(False, (flag,))
    if precision == "int8":  # TensorRT 8.x: a Q/DQ network needs the flag (never a calibrator)
        return NetworkPlan(True, ()) if strong_typing else NetworkPlan(False, ("INT8",))
    if precision == "fp16":
        if onnx.has_fp16:
            return NetworkPlan(True, ()) if strong_typing else NetworkPlan(False, ("FP16",))
        if "FP16" in builder_flags:
            return NetworkPlan(False, ("FP16",))  # TensorRT <= 10: weakly typed, FP16 kernels where it chooses
        raise EngineBuildError(f"TensorRT {version} takes FP16 only from an FP16 ONNX (strong typing; "
                               "BuilderFlag.FP16 was removed in 11): build the fp16 candidate's file instead")
    return NetworkPlan(strong_typing, ())


def batch_profile(
    shape: Sequence[int], min_batch: int, opt_batch: int, max_batch: int,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) input shapes of the optimization profile over the batch axis, the axes after it static;
    None when the ONNX input has a static batch equal to the range. Raises ``EngineBuildError`` in one line."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineBuildError(f"the batch range needs 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    dims = tuple(int(d) for d in shape)
    if len(dims) < 2 or any(d < 0 for d in dims[1:]):
        raise EngineBuildError(f"the ONNX input shape {list(dims)} is not (batch, C, H, W) with static C, H, W; "
                               "export it with a fixed image size")
    rest = dims[1:]  # (C, H, W)
    if dims[0] >= 0:
        if (min_batch, opt_batch, max_batch) != (dims[0],) * 3:
            raise EngineBuildError(f"the ONNX input has a fixed batch of {dims[0]}, so it cannot serve batches "
                                   f"{min_batch}-{max_batch}; export it with a dynamic batch axis")
        return None
    return (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)


def _strong_typing(trt) -> bool:
    return _major(trt) >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


# --- building --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineBuild:
    path: Path
    metadata: dict[str, Any]


def metadata_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 64,
    workspace_mb: int = 1024,
    timing_cache: Path | None = None,
    dla_core: int | None = None,
    log: Callable[[str], None] | None = None,
) -> EngineBuild:
    """Build a serialized engine from ``onnx_path`` on this device and write it, with ``<engine>.json``, atomically.

    One optimization profile covers batches ``min_batch``..``max_batch``, tuned for ``opt_batch``.
    ``timing_cache`` is read when it exists and written back, so later builds skip kernel timing they have done.
    ``dla_core`` builds for that DLA core of a Jetson, with GPU fallback for layers the DLA cannot run.
    """
    say = log or _log.info
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"no ONNX file at {onnx_path}")
    env = current_environment()
    trt = _tensorrt()
    version = trt.__version__
    flags_here = frozenset(name for name in ("FP16", "INT8") if hasattr(trt.BuilderFlag, name))
    plan = plan_network(precision, inspect_onnx(onnx_path), strong_typing=_strong_typing(trt),
                        builder_flags=flags_here, version=version, dla=dla_core is not None)

    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    try:  # a path, so that external data next to the file is found
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan.strongly_typed)()
    except PolygraphyException as e:
        raise EngineBuildError(f"TensorRT {version} could not parse {onnx_path.name}: {_one_line(e)}") from None
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path.name} has {network.num_inputs} inputs; a ViT takes one image batch")
    image = network.get_input(0)
    shapes = batch_profile(tuple(image.shape), min_batch, opt_batch, max_batch)
    cache = Path(timing_cache) if timing_cache is not None else None
    config = CreateConfig(
        tf32=False,  # FP32 means FP32 (TF32 is on by default)
        fp16="FP16" in plan.flags, int8="INT8" in plan.flags,
        profiles=[Profile().add(image.name, min=shapes[0], opt=shapes[1], max=shapes[2])] if shapes else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20},
        load_timing_cache=str(cache) if cache is not None and cache.is_file() else None,
        # layer names, types and precisions kept in the engine for its inspector (TensorRtEngine.profile)
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
    )(builder, network)
    if dla_core is not None:
        _use_dla(trt, builder, config, dla_core, precision, say)

    say(f"TensorRT {version}: building a {precision} engine of {onnx_path.name} for batch {min_batch}-{max_batch} "
        f"on {env['gpu']}" + (f", DLA core {dla_core}" if dla_core is not None else ""))
    start = time.perf_counter()
    try:
        serialized = EngineBytesFromNetwork((builder, network, parser), config=config,
                                            save_timing_cache=str(cache) if cache is not None else None)()
    except PolygraphyException as e:
        raise EngineBuildError(f"TensorRT {version} could not build {onnx_path.name} at {precision}: "
                               f"{_one_line(e)}") from None
    seconds = time.perf_counter() - start

    batch = (shapes[0][0], shapes[1][0], shapes[2][0]) if shapes else (int(image.shape[0]),) * 3
    metadata = {
        "format": METADATA_FORMAT, **env, "precision": precision, "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.flags), "input": {"name": image.name, "shape": [int(d) for d in image.shape]},
        "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "dla_core": dla_core,
        "workspace_mb": workspace_mb, "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
        "build_seconds": round(seconds, 3), "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # The metadata goes last: an engine whose <engine>.json exists is whole and is the one that file describes.
    metadata_path(engine_path).unlink(missing_ok=True)
    write_bytes_atomic(engine_path, serialized)
    write_bytes_atomic(metadata_path(engine_path), (json.dumps(metadata, indent=2) + "\n").encode())
    say(f"TensorRT: built {engine_path.name} in {seconds:.1f} s")
    return EngineBuild(engine_path, metadata)


def _use_dla(trt, builder, config, dla_core: int, precision: str, say: Callable[[str], None]) -> None:
    cores = builder.num_DLA_cores
    if not 0 <= dla_core < cores:
        raise EngineBuildError(f"dla_core={dla_core}, but this device has {cores} DLA cores" + (
            f" (0..{cores - 1})" if cores else " (DLA exists on Jetson AGX Orin and Orin NX, with TensorRT 10.x up to "
            "10.7 or 11.4.1+; 11.0-11.3 have none)"))
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if precision == "fp32":
        say("DLA runs FP16 and INT8 layers only: an fp32 network falls back to the GPU (build fp16 or int8)")


# --- running ---------------------------------------------------------------------------------------------------
class TensorRtEngine:
    """A deserialized engine behind Polygraphy's ``TrtRunner`` (its execution context, CUDA stream and buffers).

    ``run`` is synchronous like every other runtime's engine (copy in, execute, copy out, wait), so the common
    ``measure_latency`` times it end to end; ``measure`` adds the GPU compute time, with the input already on the
    device and the outputs left there.
    """

    def __init__(self, serialized: bytes, metadata: Mapping[str, Any], *, name: str = "engine") -> None:
        trt = _tensorrt()
        _polygraphy()
        from polygraphy.backend.trt import TrtRunner

        self.metadata, self.name = dict(metadata), name
        self._runner = None
        runtime = trt.Runtime(_trt_logger())
        if self.metadata.get("dla_core") is not None:
            runtime.DLA_core = int(self.metadata["dla_core"])
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise EngineMismatchError(f"TensorRT {trt.__version__} could not load {name} (its log above says why); "
                                      f"{REBUILD}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise EngineMismatchError(f"{name} has inputs {inputs} and outputs {outputs}; a ViT engine has one image "
                                      "input and a logits output")
        self.input_name = inputs[0]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        shape = tuple(engine.get_tensor_shape(self.input_name))  # (B or -1, C, H, W)
        self.sample_shape = shape[1:]
        if shape[0] < 0:
            low, _, high = engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        self._engine = engine
        self._runner = TrtRunner(engine, name=name)
        self._runner.activate()

    def _feed(self, x: np.ndarray) -> np.ndarray:
        """``x`` checked against the engine's input and cast to its type (float16 for an FP16 ONNX without float32
        I/O)."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"{self.name} takes (B, {', '.join(map(str, self.sample_shape))}) inputs, not {x.shape}")
        if not self.min_batch <= len(x) <= self.max_batch:
            raise ValueError(f"{self.name} takes batches {self.min_batch}-{self.max_batch}, not {len(x)}")
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits (B, classes) of ``x`` (B, C, H, W); batches above the profile run in chunks."""
        x = np.asarray(x)
        if len(x) > self.max_batch:
            return np.concatenate([self.run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        outputs = self._runner.infer({self.input_name: self._feed(x)})
        return np.array(outputs[self.output_name], dtype=np.float32)  # a copy: the runner reuses its buffers

    def measure(
        self, x: np.ndarray, *, warmup: int = 5, iterations: int = 50, max_seconds: float = 10.0,
        min_iterations: int = 5,
    ) -> dict[str, float | int]:
        """``LatencyStats`` of ``run`` end to end (H2D copy, compute, D2H copy, sync) plus
        ``gpu_compute_ms_p50/p90/p99/mean``: execute and synchronize alone, the input already on the device."""
        from polygraphy import cuda

        stats = measure_latency(self, x, threads=1, warmup=warmup, iterations=iterations, max_seconds=max_seconds,
                                min_iterations=min_iterations).to_dict()
        feed = self._feed(np.asarray(x))
        on_device = cuda.DeviceArray(shape=feed.shape, dtype=feed.dtype)
        try:
            on_device.copy_from(feed, stream=self._runner.stream)
            self._runner.stream.synchronize()
            compute_ms: list[float] = []
            for i in range(warmup + stats["iterations"]):
                self._runner.infer({self.input_name: on_device}, copy_outputs_to_host=False)
                if i >= warmup:
                    compute_ms.append(self._runner.last_inference_time() * 1000)
        finally:
            on_device.free()
        gpu = np.asarray(compute_ms)
        return stats | {"gpu_compute_ms_p50": float(np.percentile(gpu, 50)),
                        "gpu_compute_ms_p90": float(np.percentile(gpu, 90)),
                        "gpu_compute_ms_p99": float(np.percentile(gpu, 99)), "gpu_compute_ms_mean": float(gpu.mean())}

    def profile(self, x: np.ndarray, runs: int = 20) -> list:
        """Per-layer times of ``runs`` inferences of ``x`` (``runtimes.profile.NodeTime``, execution order) from
        TensorRT's ``IProfiler``, on an execution context of its own so the timed one stays unprofiled; each
        layer's type and precision from the engine inspector (``ProfilingVerbosity.DETAILED``, set at build).
        TensorRT fuses a transformer into few layers (often one ``Myelin`` foreign node), so the profile is as
        fine as the engine is."""
        import json

        from polygraphy.backend.trt import TrtRunner

        from runtimes.profile import NodeTime

        trt = _tensorrt()
        times: dict[str, float] = {}

        class _Profiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:  # called in execution order
                times[layer_name] = times.get(layer_name, 0.0) + ms

        runner = TrtRunner(self._engine, name=f"{self.name} (profiled)")
        runner.activate()
        try:
            runner.context.profiler = _Profiler()
            feed = {self.input_name: self._feed(np.asarray(x))}
            for _ in range(3):
                runner.infer(feed)
            times.clear()  # the warm-up's layers are not counted
            for _ in range(runs):
                runner.infer(feed)
        finally:
            runner.deactivate()
        layers = {}
        try:
            inspector = self._engine.create_engine_inspector()
            described = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
            for layer in described.get("Layers", []):
                if isinstance(layer, dict) and "Name" in layer:
                    layers[layer["Name"]] = layer
        except Exception:  # an engine built without detailed verbosity describes names only
            layers = {}
        return [NodeTime(name, str(layers.get(name, {}).get("LayerType", "?")), _layer_precision(layers.get(name)),
                         ms / runs) for name, ms in times.items()]

    def close(self) -> None:
        """Release the runner's context, buffers and stream (also done when collected)."""
        if self._runner is not None and self._runner.is_active:
            self._runner.deactivate()
        self._runner = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown or a lost device: nothing left to release safely
            pass


def _layer_precision(layer: Mapping[str, Any] | None) -> str:
    """The precision a layer computed in, from its first input's format in the engine inspector's JSON
    (``"Row major linear Int8"``, ``"... FP16 ..."`` / ``Half``, ``"... FP32 ..."`` / ``Float``)."""
    tensors = (layer or {}).get("Inputs") or []
    text = str(tensors[0].get("Format/Datatype", "")).lower() if tensors and isinstance(tensors[0], dict) else ""
    for marks, precision in ((("int8",), "int8"), (("fp16", "half"), "fp16"), (("bf16",), "bf16"),
                             (("fp32", "float"), "fp32")):
        if any(m in text for m in marks):
            return precision
    return "?"


def load_engine(engine_path: Path, *, current: Mapping[str, Any] | None = None) -> TensorRtEngine:
    """The engine at ``engine_path``, after checking its ``<engine>.json`` against ``current`` (default: this
    device); refuses, in one line, an engine built with another TensorRT or on another GPU."""
    engine_path = Path(engine_path)
    meta = metadata_path(engine_path)
    if not engine_path.is_file():
        raise RuntimeUnavailableError(f"no TensorRT engine at {engine_path}; build it on this device with "
                                      "`compress build-engine BUNDLE`")
    if not meta.is_file():
        raise EngineMismatchError(f"{engine_path.name} has no {meta.name}, so the TensorRT version and GPU it was "
                                  f"built for are unknown; {REBUILD}")
    metadata = json.loads(meta.read_text())
    check_engine_metadata(metadata, current if current is not None else current_environment(),
                          engine=engine_path.name)
    return TensorRtEngine(engine_path.read_bytes(), metadata, name=engine_path.name)


# --- parity ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineParity:
    max_abs_diff: float
    agreement: float  # share of samples whose top-1 class equals ONNX Runtime's
    num_samples: int
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def parity_against_onnxruntime(engine, onnx_path: Path, x: np.ndarray, atol: float = 1e-3) -> EngineParity:
    """Compare ``engine.run(x)`` with ONNX Runtime (CPU) on ``onnx_path``: per engine, not only through accuracy,
    since TensorRT and ONNX Runtime can disagree (TF32 matmuls: NVIDIA/TensorRT#4492)."""
    from runtimes.onnxruntime_cpu import OrtEngine

    x = np.ascontiguousarray(x, dtype=np.float32)
    reference = OrtEngine(Path(onnx_path), default_threads()).run(x).astype(np.float32)  # (B, classes)
    got = engine.run(x)
    return EngineParity(max_abs_diff=float(np.abs(got - reference).max()),
                        agreement=float((got.argmax(1) == reference.argmax(1)).mean()), num_samples=len(x), atol=atol)


# --- the runtime -----------------------------------------------------------------------------------------------
class TensorRtRuntime:
    """The runtime registered as "tensorrt": ``build`` makes (or reuses) an engine in a cache folder beside the
    ONNX file, keyed by the file, the precision, the batch range and this device, and returns it loaded."""

    name = "tensorrt"
    input_kind = "onnx"
    formats = ("onnx",)
    artifact_precisions = PRECISIONS  # INT8 from Q/DQ, FP16 from FP16 files, never calibrated here

    def __init__(self, *, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 64, workspace_mb: int = 1024,
                 cache_dir: Path | None = None) -> None:
        # Never raises: the runtime is listed everywhere, and precisions()/build() say what is missing here.
        self.min_batch, self.opt_batch, self.max_batch = min_batch, opt_batch, max_batch
        self.workspace_mb, self.cache_dir = workspace_mb, cache_dir

    def precisions(self) -> list[str]:
        current_environment()
        trt = _tensorrt()
        return ["fp32", "fp16"] if hasattr(trt.BuilderFlag, "FP16") else ["fp32"]  # 11: FP16 only from FP16 files

    def build(self, source: Path, *, precision: str, threads: int) -> TensorRtEngine:
        env = current_environment()
        if precision not in self.artifact_precisions:
            raise RuntimeUnavailableError(f"TensorRT builds {', '.join(PRECISIONS)} engines, not {precision}")
        onnx_path = Path(source)
        if not onnx_path.is_file():
            raise EngineBuildError(f"no ONNX file at {onnx_path}")
        engine_path = self._engine_path(onnx_path, precision, env)
        if not (engine_path.is_file() and metadata_path(engine_path).is_file()):
            build_engine(onnx_path, engine_path, precision=precision, min_batch=self.min_batch,
                         opt_batch=self.opt_batch, max_batch=self.max_batch, workspace_mb=self.workspace_mb,
                         timing_cache=engine_path.parent / "timing.cache")
        return load_engine(engine_path, current=env)

    def _engine_path(self, onnx_path: Path, precision: str, env: Mapping[str, str]) -> Path:
        key = hashlib.sha256(json.dumps({
            "onnx": sha256_file(onnx_path), "precision": precision, "workspace_mb": self.workspace_mb,
            "batch": [self.min_batch, self.opt_batch, self.max_batch], **{k: env[k] for k in METADATA_KEYS},
        }, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(self.cache_dir) if self.cache_dir is not None else onnx_path.parent / "tensorrt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            folder = Path(tempfile.gettempdir()) / "vit-compress-tensorrt"
            folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{onnx_path.stem}-{precision}-{key}.engine"

    def versions(self) -> dict[str, str]:
        version = tensorrt_version()
        return {"tensorrt": version} if version else {}
