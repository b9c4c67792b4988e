"""The few CUDA runtime calls a TensorRT engine needs, through ctypes on libcudart: no extra Python packages.

Device and pinned host memory, asynchronous copies, streams, events (for GPU-side timing) and the device's name
and compute capability, the way Polygraphy's own ``polygraphy.cuda`` wraps libcudart. Handles (pointers,
streams, events) are plain ints, which is what TensorRT's ``set_tensor_address`` and ``execute_async_v3`` take.
libcudart is found on the loader path, in the CUDA toolkit, or in the ``nvidia-cuda-runtime`` wheels that
``pip install tensorrt`` brings; on a Jetson it is wherever JetPack put TensorRT. Where it is missing, or no GPU
is visible, ``CudaUnavailableError`` says so in one line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys
from collections.abc import Sequence

import numpy as np

from runtimes.errors import RuntimeUnavailableError

LIBCUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
LIBCUDART_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib", "/usr/lib/aarch64-linux-gnu",
                  "/usr/lib/x86_64-linux-gnu")

HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
ATTR_COMPUTE_CAPABILITY_MAJOR, ATTR_COMPUTE_CAPABILITY_MINOR = 75, 76  # cudaDeviceAttr
_PROPS_BYTES = 16384  # cudaDeviceProp is ~1 KB in CUDA 12 and 13; its first field is ``char name[256]``

_p_void = ctypes.POINTER(ctypes.c_void_p)
_p_int = ctypes.POINTER(ctypes.c_int)
# name -> argtypes; every pointer and handle is c_void_p so 64-bit addresses are never truncated to C int
_SIGNATURES: dict[str, list] = {
    "cudaGetErrorString": [ctypes.c_int],
    "cudaRuntimeGetVersion": [_p_int],
    "cudaDriverGetVersion": [_p_int],
    "cudaGetDeviceCount": [_p_int],
    "cudaSetDevice": [ctypes.c_int],
    "cudaDeviceGetAttribute": [_p_int, ctypes.c_int, ctypes.c_int],
    "cudaMalloc": [_p_void, ctypes.c_size_t],
    "cudaFree": [ctypes.c_void_p],
    "cudaMallocHost": [_p_void, ctypes.c_size_t],
    "cudaFreeHost": [ctypes.c_void_p],
    "cudaMemcpyAsync": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p],
    "cudaStreamCreate": [_p_void],
    "cudaStreamSynchronize": [ctypes.c_void_p],
    "cudaStreamDestroy": [ctypes.c_void_p],
    "cudaEventCreate": [_p_void],
    "cudaEventRecord": [ctypes.c_void_p, ctypes.c_void_p],
    "cudaEventSynchronize": [ctypes.c_void_p],
    "cudaEventDestroy": [ctypes.c_void_p],
}
# Symbols renamed between CUDA versions: CUDA 12 exports cudaGetDeviceProperties_v2 (the header maps the plain
# name to it), CUDA 13 only the plain name; cudaEventElapsedTime_v2 exists from 12.8 on.
_ALIASES: dict[str, tuple[str, ...]] = {
    "cudaGetDeviceProperties": ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties"),
    "cudaEventElapsedTime": ("cudaEventElapsedTime", "cudaEventElapsedTime_v2"),
}


class CudaUnavailableError(RuntimeUnavailableError):
    """No CUDA runtime library, or no CUDA GPU visible to this process."""


class CudaError(RuntimeError):
    """A CUDA runtime call that failed on a machine that has a GPU."""


def _wheel_dirs() -> list[str]:
    """lib folders of the nvidia-* wheels (nvidia/cuda_runtime/lib, nvidia/cu13/lib, ...) on sys.path."""
    found = []
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib")))
    return found


def load_cudart(names: Sequence[str] | None = None, dirs: Sequence[str] | None = None) -> CudaRuntime:
    """libcudart, tried by ``names`` on the loader path, then in ``dirs``: the first that sees a GPU, else the
    first that loads; raises ``CudaUnavailableError`` naming what was tried when none loads. The defaults: the
    usual sonames and what ``ctypes.util`` finds, then CUDA_HOME, the usual CUDA folders and the nvidia wheels."""
    if names is None:
        found = ctypes.util.find_library("cudart")
        names = [*LIBCUDART_NAMES, *([found] if found else [])]
    if dirs is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        dirs = [*([os.path.join(home, "lib64"), os.path.join(home, "lib")] if home else []), *LIBCUDART_DIRS,
                *_wheel_dirs()]
    tried = list(names)
    for folder in dirs:
        tried += sorted(glob.glob(os.path.join(folder, "libcudart.so*")), reverse=True)
    fallback = None
    for candidate in dict.fromkeys(tried):
        try:
            runtime = CudaRuntime(ctypes.CDLL(candidate), candidate)
        except (OSError, CudaUnavailableError):
            continue
        if runtime.device_count() > 0:  # a toolkit newer than the driver loads but sees no GPU: try the next
            return runtime
        fallback = fallback or runtime
    if fallback is not None:
        return fallback
    raise CudaUnavailableError(
        f"no CUDA runtime: libcudart was not found (tried {', '.join(dict.fromkeys(tried))}); TensorRT needs it: "
        "on a Jetson it comes with JetPack, on x86 with the CUDA toolkit or pip install nvidia-cuda-runtime-cu12"
    )


@functools.cache
def cudart() -> CudaRuntime:
    """The process's libcudart, loaded once."""
    return load_cudart()


class CudaRuntime:
    """Thin typed wrappers over libcudart; every failing call raises ``CudaError`` with CUDA's own message."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        self._aliased = {}
        for name, symbols in _ALIASES.items():
            fn = next((getattr(lib, s) for s in symbols if hasattr(lib, s)), None)
            if fn is None:
                raise CudaUnavailableError(f"{path} lacks {name} (looked for {', '.join(symbols)}); it is not a "
                                           "CUDA runtime this code knows")
            fn.restype = ctypes.c_int
            self._aliased[name] = fn
        self._aliased["cudaGetDeviceProperties"].argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._aliased["cudaEventElapsedTime"].argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                                          ctypes.c_void_p]
        self.no_device_reason = ""

    def error_string(self, code: int) -> str:
        text = self.lib.cudaGetErrorString(code)
        return text.decode(errors="replace") if text else f"CUDA error {code}"

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            raise CudaError(f"{call} failed: {self.error_string(code)} (cudaError {code})")

    @staticmethod
    def _version(value: int) -> str:
        return f"{value // 1000}.{value % 1000 // 10}"

    def runtime_version(self) -> str:
        v = ctypes.c_int(0)
        self._check(self.lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        return self._version(v.value)

    def driver_version(self) -> str | None:
        """The CUDA version the driver supports; None when there is no driver."""
        v = ctypes.c_int(0)
        return self._version(v.value) if self.lib.cudaDriverGetVersion(ctypes.byref(v)) == 0 and v.value else None

    # --- devices -------------------------------------------------------------------------------------------
    def device_count(self) -> int:
        """CUDA GPUs visible to this process; 0 (with ``no_device_reason`` set) when there is none or no driver."""
        n = ctypes.c_int(0)
        code = self.lib.cudaGetDeviceCount(ctypes.byref(n))
        if code != 0:
            self.no_device_reason = f"cudaGetDeviceCount: {self.error_string(code)}"
            return 0
        if n.value == 0:
            self.no_device_reason = "cudaGetDeviceCount found 0 devices"
        return n.value

    def require_gpu(self) -> None:
        if self.device_count() == 0:
            raise CudaUnavailableError(f"no CUDA GPU is visible to this process ({self.no_device_reason}; runtime "
                                       f"{self.path})")

    def set_device(self, device: int) -> None:
        self._check(self.lib.cudaSetDevice(device), f"cudaSetDevice({device})")

    def device_name(self, device: int = 0) -> str:
        props = ctypes.create_string_buffer(_PROPS_BYTES)
        self._check(self._aliased["cudaGetDeviceProperties"](props, device), "cudaGetDeviceProperties")
        return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")

    def compute_capability(self, device: int = 0) -> tuple[int, int]:
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), ATTR_COMPUTE_CAPABILITY_MAJOR, device),
                    "cudaDeviceGetAttribute(major)")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), ATTR_COMPUTE_CAPABILITY_MINOR, device),
                    "cudaDeviceGetAttribute(minor)")
        return major.value, minor.value

    # --- memory --------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return ptr.value or 0

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it are truly asynchronous and run at full bus speed."""
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMallocHost(ctypes.byref(ptr), nbytes), f"cudaMallocHost({nbytes})")
        return ptr.value or 0

    def free_host(self, ptr: int) -> None:
        self._check(self.lib.cudaFreeHost(ptr), "cudaFreeHost")

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst, src, nbytes, HOST_TO_DEVICE, stream), "cudaMemcpyAsync(H2D)")

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst, src, nbytes, DEVICE_TO_HOST, stream), "cudaMemcpyAsync(D2H)")

    # --- streams and events --------------------------------------------------------------------------------
    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return stream.value or 0

    def stream_synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self._check(self.lib.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self) -> int:
        event = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreate(ctypes.byref(event)), "cudaEventCreate")
        return event.value or 0

    def event_record(self, event: int, stream: int) -> None:
        self._check(self.lib.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_synchronize(self, event: int) -> None:
        self._check(self.lib.cudaEventSynchronize(event), "cudaEventSynchronize")

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float(0.0)
        self._check(self._aliased["cudaEventElapsedTime"](ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)

    def event_destroy(self, event: int) -> None:
        self._check(self.lib.cudaEventDestroy(event), "cudaEventDestroy")


class PinnedBuffer:
    """Page-locked host memory seen as a flat numpy array; ``view(shape, dtype)`` gives a typed window on it."""

    def __init__(self, cuda: CudaRuntime, nbytes: int) -> None:
        self.cuda, self.nbytes = cuda, nbytes
        self.ptr = cuda.malloc_host(nbytes)
        self._bytes = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.ptr))

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert count <= self.nbytes, (shape, dtype, self.nbytes)
        return self._bytes[:count].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._bytes = None
            self.cuda.free_host(self.ptr)
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, cuda: CudaRuntime, nbytes: int) -> None:
        self.cuda, self.nbytes = cuda, nbytes
        self.ptr = cuda.malloc(nbytes)

    def free(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0


def gpu_info(device: int = 0) -> dict[str, str]:
    """{"gpu": name, "compute_capability": "8.7", "cuda_runtime": "12.6"} of ``device``; raises
    ``CudaUnavailableError`` in one line when there is no CUDA runtime or no GPU."""
    cuda = cudart()
    cuda.require_gpu()
    major, minor = cuda.compute_capability(device)
    return {"gpu": cuda.device_name(device), "compute_capability": f"{major}.{minor}",
            "cuda_runtime": cuda.runtime_version()}
