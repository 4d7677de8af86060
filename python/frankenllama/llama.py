"""``frankenllama.Llama``: ``llama_cpp.Llama`` with a layer order.

Everything but ``layer_order`` (and :meth:`Llama.set_layer_order`) is llama-cpp-python 0.3.36's
own behaviour: the order travels to the patched llama.cpp as the model KV override
``<arch>.layer_order`` and the library remaps the decoder blocks at load time.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Iterator, Sequence

import llama_cpp
import llama_cpp._internals as internals

from . import _native
from .gguf_info import read_gguf_info
from .order import format_spec, override_keys
from .recipes import Recipe, resolve
from .rpc import add_rpc_servers


def _load_error(log: list[tuple[int, str]]) -> str:
    """The most specific line of a failed load: the layer_order message, else the first error."""
    errors = _native.log_errors(log)
    for line in errors:
        if "layer_order:" in line:
            return line[line.index("layer_order:"):]
    return errors[0] if errors else "see the llama.cpp log above"


class Llama(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` whose decoder blocks run in ``layer_order``.

    Args:
        model_path: path to a GGUF model.
        layer_order: ``None`` for the file's own order, or any recipe that
            :func:`frankenllama.recipes.resolve` accepts: a list of weight-layer indices
            (``[0, 1, 2, 1, 2, 3]``), a spec string (``"0-15,8-23,16-31"``), exllamav3 ranges
            (``"0..15,8..23"``), half-open tuples (``[(0, 16), (8, 24)]``), or the path of a
            mergekit passthrough YAML or a Llama Blocks block file.  Execution position ``p`` runs
            weight layer ``order[p]``; each position has its own KV cache and a repeated layer shares
            its weights.  Weight layers the order does not run are not loaded.
        rpc_servers: llama.cpp RPC servers (``"host:port"``) to register as devices before loading,
            like llama.cpp's ``--rpc``; ``n_gpu_layers`` then offloads weight layers to them.
        **kwargs: every other ``llama_cpp.Llama`` argument, unchanged.

    Raises:
        ValueError: the order is malformed or out of range, conflicts with ``kv_overrides``, or
            the model cannot run it (the message names the problem).
        ConnectionError: an RPC server does not answer.
    """

    def __init__(self, model_path: str, *, layer_order: Recipe | None = None,
                 rpc_servers: Sequence[str] | None = None, **kwargs: Any) -> None:
        self._stack = contextlib.ExitStack()  # llama_cpp.Llama.__del__ needs it if we raise before super()
        self._closes_current_ctx = False
        if rpc_servers:
            add_rpc_servers(rpc_servers)
        requested: list[int] | None = None
        if layer_order is not None:
            info = read_gguf_info(model_path)
            requested = resolve(layer_order, info.n_layer)
            kwargs["kv_overrides"] = _merge_overrides(kwargs.get("kv_overrides"), override_keys(info.arch, requested))

        with _native.capture_llama_log() as errors:
            try:
                super().__init__(model_path, **kwargs)
            except ValueError as err:
                if "Failed to load model" in str(err):
                    raise ValueError(f"{err}: {_load_error(errors)}") from None
                raise

        if self.lora_path and not self._lora_adapter:
            # llama-cpp-python 0.3.36 tests the adapter against None, so a failed load (a NULL
            # pointer) would be registered and crash the first decode
            self.close()
            raise ValueError(f"failed to load the LoRA adapter {self.lora_path}: {_load_error(errors)}")

        if requested is not None:
            applied = self.layer_order
            if applied != requested:
                raise RuntimeError(
                    f"the native library did not apply the layer order (asked {format_spec(requested)}, "
                    f"running {format_spec(applied)}): is LLAMA_CPP_LIB_PATH pointing at a stock llama.cpp?"
                )

    @property
    def n_weight_layers(self) -> int:
        """Decoder blocks in the file (what ``n_gpu_layers`` counts)."""
        _, lib = _native.ffi_lib()
        return int(lib.llama_model_n_layer_weights(_native.model_ptr(self._model)))

    @property
    def layer_order(self) -> list[int]:
        """The order the model runs: weight layer of each execution position."""
        ffi, lib = _native.ffi_lib()
        model = _native.model_ptr(self._model)
        n = lib.llama_model_n_layer(model)
        order = ffi.new("int32_t[]", n)
        lib.llama_model_get_layer_order(model, order, n)
        return list(order)

    def layer_devices(self) -> list[str]:
        """Name of the device of each execution position: where its weights live and where its K/V
        cache is allocated (``CPU``, ``CUDA0``, ``RPC0``, ...)."""
        ffi, lib = _native.ffi_lib()
        model = _native.model_ptr(self._model)
        return [ffi.string(lib.llama_model_dev_layer_name(model, p)).decode()
                for p in range(lib.llama_model_n_layer(model))]

    def kv_devices(self) -> list[str]:
        """Device of each execution position's K/V cache (the device of its weight layer)."""
        return self.layer_devices()

    def set_layer_order(self, layer_order: Recipe | None) -> None:
        """Switch to another order without reloading the weights.

        The context and its KV cache are rebuilt for the new depth, so the conversation state is
        dropped (as after ``reset()``).  ``None`` restores the file's order.  Only weight layers that
        were loaded can run: a model loaded with an order that leaves layers out cannot run them.

        Raises:
            ValueError: the order is malformed, out of range, unsupported, or uses unloaded layers.
        """
        ffi, lib = _native.ffi_lib()
        model = _native.model_ptr(self._model)
        n_weights = self.n_weight_layers
        order = [] if layer_order is None else resolve(layer_order, n_weights)
        missing = [il for il in order if not lib.llama_model_layer_is_loaded(model, il)]
        if missing:
            raise ValueError(
                f"weight layer(s) {format_spec(sorted(set(missing)))} were not loaded, because the order "
                "given at load time does not run them; load the model without layer_order to re-order freely"
            )

        self._ctx.close()
        with _native.capture_llama_log() as errors:
            rc = lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", order), len(order))
        self._ctx = internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
        if not self._closes_current_ctx:
            # close() frees whichever context is current, before the model (the stack unwinds LIFO)
            self._stack.callback(lambda: self._ctx.close())
            self._closes_current_ctx = True
        if self._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales)
        self.n_tokens = 0
        self._sampler = None
        self.metadata = self._model.metadata()  # "<arch>.layer_order" follows the order
        if rc != 0:
            raise ValueError(f"could not set the layer order: {_load_error(errors)}")


def _merge_overrides(user: dict[str, Any] | None, order_keys: dict[str, str]) -> dict[str, Any]:
    """Add the order's override keys to the user's kv_overrides; a second order is an error."""
    merged = dict(user or {})
    base = next(iter(order_keys))
    clash = sorted(k for k in merged if k == base or k.startswith(base + "."))
    if clash:
        raise ValueError(
            f"layer_order conflicts with kv_overrides {clash}: give the order once, "
            "either as layer_order or as kv_overrides"
        )
    merged.update(order_keys)
    return merged
