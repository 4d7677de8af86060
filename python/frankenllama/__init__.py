"""frankenllama: run a GGUF model with its decoder blocks in any order, in llama.cpp.

Import frankenllama before llama_cpp: importing it makes llama_cpp load frankenllama's patched
llama.cpp library (and checks that it did).

    from frankenllama import Llama
    llm = Llama("model.gguf", layer_order="0-15,8-23,16-31")
"""
from __future__ import annotations

from . import _native

_native.bind()

from ._native import LAYER_ORDER_VERSION, native_library_path  # noqa: E402
from ._version import LLAMA_CPP_COMMIT, __version__  # noqa: E402
from .llama import GenerationInterruptedError, LayerOrderChangedError, Llama, StateMismatchError  # noqa: E402
from .order import LayerOrderError  # noqa: E402
from .state_cache import OrderKeyedCache  # noqa: E402
from .scanning import ScanError, scan  # noqa: E402

__llama_cpp_commit__ = LLAMA_CPP_COMMIT

__all__ = ["Llama", "LayerOrderError", "StateMismatchError", "LayerOrderChangedError", "GenerationInterruptedError", "OrderKeyedCache", "scan", "ScanError", "native_library_path", "LAYER_ORDER_VERSION", "__version__", "__llama_cpp_commit__"]
