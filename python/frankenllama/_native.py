"""Load frankenllama's patched llama.cpp library into ``llama_cpp`` and bind the functions the patch adds.

``llama_cpp`` loads its native library once, at import time, from the folder named by
``LLAMA_CPP_LIB_PATH``.  :func:`bind` points that variable at the libraries packaged in
``frankenllama/lib`` before importing ``llama_cpp``, then checks that the loaded library really
is the patched one: a stock library silently ignores the ``<arch>.layer_order`` override.

The few C functions the patch adds are bound with cffi (ABI mode) on the same library file;
everything else goes through ``llama_cpp``.  :func:`open_native_library` opens the other packaged
libraries (ggml's GGUF reader, the RPC backend) by name.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import cffi

#: LLAMA_LAYER_ORDER_VERSION this package expects from the library
LAYER_ORDER_VERSION = "1"

_LIB_DIR_ENV = "FRANKENLLAMA_LIB_DIR"  # use another build of the patched library (development)

#: ggml_log_level (ggml.h): llama_cpp._logger documents an older numbering
GGML_LOG_LEVEL_ERROR = 4

_CDEF = """
struct llama_model;
int32_t      llama_model_n_layer(const struct llama_model * model);
int32_t      llama_model_n_layer_weights(const struct llama_model * model);
int32_t      llama_model_get_layer_order(const struct llama_model * model, int32_t * order, int32_t n_order_max);
int32_t      llama_model_set_layer_order(struct llama_model * model, const int32_t * order, int32_t n_order);
int32_t      llama_model_set_layer_program(struct llama_model * model, const char * spec);
bool         llama_model_layer_is_loaded(const struct llama_model * model, int32_t il);
const char * llama_model_dev_layer_name(const struct llama_model * model, int32_t il);
int32_t      llama_layer_order_parse(const char * spec, int32_t n_layer, int32_t * order, int32_t n_order_max,
                                     char * err, size_t err_size);
const char * llama_layer_order_version(void);
"""


#: file name of a packaged library per platform, from its CMake target name (``llama``, ``ggml``,
#: ``ggml-base``): one unversioned file each (CMakeLists.txt); ``lib{}.so`` elsewhere
_LIBRARY_FILE_NAME = {"win32": "{}.dll", "darwin": "lib{}.dylib"}


def native_library_dir() -> Path:
    """The folder holding frankenllama's libllama and ggml libraries."""
    override = os.environ.get(_LIB_DIR_ENV)
    return Path(override).resolve() if override else Path(__file__).resolve().parent / "lib"


def native_library_file(name: str) -> Path:
    """Path of the packaged library ``name`` (``llama``, ``ggml``, ``ggml-base``, ...)."""
    return native_library_dir() / _LIBRARY_FILE_NAME.get(sys.platform, "lib{}.so").format(name)


def native_library_path() -> Path:
    """Path of the patched libllama that ``llama_cpp`` uses."""
    return native_library_file("llama")


#: written by a CUDA build next to its libraries (cmake/cuda_runtime.json.in): the CUDA runtime
#: libraries libggml-cuda needs, and where NVIDIA's wheels install them in site-packages
CUDA_RUNTIME_FILE = "cuda_runtime.json"

#: the CUDA runtime libraries :func:`load_cuda_runtime` preloaded from NVIDIA's wheels ([]: none
#: needed, libggml-cuda's RUNPATH reached them, or this build has no CUDA)
cuda_runtime_preloaded: list[str] = []


def cuda_runtime_info() -> dict[str, Any] | None:
    """What the packaged CUDA backend needs at run time; None for a build without CUDA."""
    lib_dir = native_library_dir()
    if not native_library_file("ggml-cuda").is_file():
        return None
    info_file = lib_dir / CUDA_RUNTIME_FILE
    return json.loads(info_file.read_text()) if info_file.is_file() else {}


def _cuda_wheel_dir(info: dict[str, Any]) -> Path | None:
    """The first ``site-packages/nvidia/cuNN/lib`` on sys.path holding every library in ``info``."""
    if not info.get("wheel_lib_dir"):
        return None
    for entry in sys.path:
        folder = Path(entry or ".") / info["wheel_lib_dir"]
        if all((folder / name).is_file() for name in info.get("libraries", ())):
            return folder.resolve()
    return None


def load_cuda_runtime() -> Path | None:
    """Make sure a CUDA build's libggml-cuda can load; return the wheel folder preloaded from, if any.

    A build without CUDA returns None at once and loads nothing.  Otherwise libggml-cuda is opened
    as is first: its RUNPATH reaches NVIDIA's wheels installed beside frankenllama and a system
    toolkit's folder.  Only if that fails are the runtime libraries preloaded (RTLD_GLOBAL) from the
    first ``nvidia/cuNN/lib`` on sys.path (wheels in another site-packages: user site, a parent
    environment, PYTHONPATH).  Raises ImportError saying what to install when they can't be found.
    """
    info = cuda_runtime_info()
    if info is None:
        return None
    cuda_lib = native_library_file("ggml-cuda")
    try:
        ctypes.CDLL(str(cuda_lib))
        return None
    except OSError as err:
        first_error = err
    folder = _cuda_wheel_dir(info)
    if folder is not None:
        try:
            for name in info["libraries"]:
                ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
                cuda_runtime_preloaded.append(str(folder / name))
            ctypes.CDLL(str(cuda_lib))
            return folder
        except OSError as err:
            first_error = err
    version = info.get("cuda_version", "?")
    raise ImportError(
        f"this frankenllama is a CUDA build (CUDA {version}) and {cuda_lib.name} can't load: "
        f"{first_error}. Install the CUDA runtime libraries with `pip install "
        f"\"frankenllama[cuda]\"` (NVIDIA's nvidia-cuda-runtime and nvidia-cublas wheels), or a CUDA "
        f"{version.split('.')[0]} toolkit with cuBLAS whose library folder the loader finds "
        "(ldconfig or LD_LIBRARY_PATH)."
    )


def _dlopen(path: Path | str, cdef: str) -> tuple[cffi.FFI, Any]:
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi, ffi.dlopen(str(path))


@lru_cache(maxsize=None)
def open_native_library(name: str, cdef: str) -> tuple[cffi.FFI, Any]:
    """A cffi handle (ABI mode, ``cdef`` declared) on the packaged library ``name``, opened once.

    Raises ImportError when the library is missing.
    """
    path = native_library_file(name)
    if not path.is_file():
        raise ImportError(f"{path.name} not found in {path.parent}: reinstall frankenllama")
    return _dlopen(path, cdef)


def _loaded_library_path(llama_cpp_module: Any) -> str:
    return str(getattr(llama_cpp_module._lib, "_name", "?"))


def bind() -> None:
    """Make ``llama_cpp`` use the patched library and check that it does.

    Raises ImportError when ``llama_cpp`` was already imported with another library, when the
    packaged library is missing, or when the loaded library lacks the layer-order patch.
    """
    lib_dir = native_library_dir()
    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is not None:
        loaded = Path(_loaded_library_path(already)).resolve()
        if loaded.parent != lib_dir:
            raise ImportError(
                f"llama_cpp was imported before frankenllama and loaded {loaded}. "
                "Import frankenllama before llama_cpp (or start Python with "
                f"LLAMA_CPP_LIB_PATH={lib_dir}), so that llama_cpp loads the patched library."
            )
    else:
        if not native_library_path().is_file():
            raise ImportError(
                f"frankenllama's native library is missing ({native_library_path()}); "
                "reinstall frankenllama with `pip install .` from its source folder."
            )
        load_cuda_runtime()  # a CUDA build only; a CPU-only build loads nothing here
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    import llama_cpp.llama_cpp as llama_cpp_module

    check_patched(llama_cpp_module._lib, _loaded_library_path(llama_cpp_module))


def log_to_stderr() -> None:
    """From here on llama.cpp logs to stderr itself (its default), not through Python callbacks.

    For the interpreter's exit: a Python callback called from one of llama.cpp's own threads
    (ggml-rpc's connection thread logs a lost server) while the interpreter shuts down waits
    forever for it, and the process never exits.
    """
    import llama_cpp

    llama_cpp.llama_log_set(llama_cpp.llama_log_callback(0), ctypes.c_void_p(0))  # NULL: the default


def check_patched(lib: ctypes.CDLL, name: str) -> None:
    """Raise ImportError unless ``lib`` is a library with the matching layer-order patch."""
    try:
        version_fn = lib.llama_layer_order_version
    except AttributeError:
        raise ImportError(
            f"the llama.cpp library {name} is not frankenllama's patched build (it has no "
            "llama_layer_order_version); a stock library would silently ignore layer orders. "
            "Unset LLAMA_CPP_LIB_PATH/FRANKENLLAMA_LIB_DIR or reinstall frankenllama."
        ) from None
    version_fn.restype = ctypes.c_char_p
    version = version_fn().decode()
    if version != LAYER_ORDER_VERSION:
        raise ImportError(
            f"the llama.cpp library {name} has layer-order patch version {version}, "
            f"this frankenllama needs {LAYER_ORDER_VERSION}: reinstall frankenllama."
        )


@lru_cache(maxsize=None)
def ffi_lib() -> tuple[cffi.FFI, Any]:
    """The cffi handle on the patched library (the same file ``llama_cpp`` loaded)."""
    import llama_cpp.llama_cpp as llama_cpp_module

    return _dlopen(_loaded_library_path(llama_cpp_module), _CDEF)


def model_ptr(model: Any) -> Any:
    """cffi pointer of a llama_cpp model handle (``llama_cpp._internals.LlamaModel`` or a raw pointer)."""
    ffi, _ = ffi_lib()
    raw = getattr(model, "model", model)
    address = raw.value if isinstance(raw, ctypes.c_void_p) else ctypes.cast(raw, ctypes.c_void_p).value
    if not address:
        raise ValueError("the model is not loaded (null model pointer)")
    return ffi.cast("struct llama_model *", address)


def set_layer_program(model: Any, program: Any) -> int:
    """Run ``program`` (a :class:`~frankenllama.program.LayerProgram`) on a loaded model (a cffi
    pointer); llama_model_set_layer_order's return code."""
    ffi, lib = ffi_lib()
    if program.is_plain:
        return lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", list(program.order)), len(program.order))
    return lib.llama_model_set_layer_program(model, program.spec.encode())


def parse_spec_native(spec: str, n_layers: int) -> list[int]:
    """Parse a layer-order spec with the C parser the loader uses; ValueError with its message."""
    ffi, lib = ffi_lib()
    order = ffi.new("int32_t[]", 512)
    err = ffi.new("char[]", 512)
    n = lib.llama_layer_order_parse(spec.encode(), n_layers, order, 512, err, 512)
    if n < 0:
        raise ValueError(ffi.string(err).decode())
    return list(order[0:n])


_log_lock = threading.Lock()
_log_local = threading.local()  # per thread: the record lists of the active captures, innermost last
_log_dispatcher: Any = None  # the one callback handed to llama.cpp; kept alive for the process


def _install_log_dispatcher() -> None:
    """Hand llama.cpp (once) a callback that records into the calling thread's active captures and
    forwards everything to llama_cpp's logger."""
    global _log_dispatcher
    with _log_lock:
        if _log_dispatcher is not None:
            return
        import llama_cpp
        import llama_cpp._logger as llama_logger

        forward = llama_logger.llama_log_callback

        @llama_cpp.llama_log_callback
        def dispatch(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            for records in getattr(_log_local, "captures", ()):
                records.append((level, text.decode("utf-8", errors="replace")))
            forward(level, text, user_data)

        llama_cpp.llama_log_set(dispatch, ctypes.c_void_p(0))
        _log_dispatcher = dispatch


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[tuple[int, str]]]:
    """Record llama.cpp's log as (level, text) while the block runs in this thread; it still
    reaches llama_cpp's logger.  Thread-safe: each thread records only its own messages."""
    _install_log_dispatcher()
    captures = _log_local.__dict__.setdefault("captures", [])
    records: list[tuple[int, str]] = []
    captures.append(records)
    try:
        yield records
    finally:
        # by identity: list.remove() compares contents, and nested captures can hold equal records
        del captures[next(i for i, c in enumerate(captures) if c is records)]


#: the ``__func__: `` that starts llama.cpp's log lines (``llama_model_set_layer_order: ``)
_C_FUNCTION_PREFIX = re.compile(r"(?:llama|ggml|gguf)_\w*: ")


def log_errors(records: list[tuple[int, str]]) -> list[str]:
    """The error lines of a captured log, without the name of the C function that logged them.

    Messages carry their own tag (``layer_order: ...``); the function name before it may end with
    the same words (``llama_model_set_layer_order: layer_order: ...``), which would read twice.
    """
    errors = []
    for level, text in records:
        if level == GGML_LOG_LEVEL_ERROR:
            line = text.strip()
            prefix = _C_FUNCTION_PREFIX.match(line)
            errors.append(line[prefix.end():] if prefix else line)
    return errors
