"""``frankenllama.Llama``: ``llama_cpp.Llama`` with a layer order.

Everything but ``layer_order`` (and :meth:`Llama.set_layer_order`) is llama-cpp-python 0.3.36's
own behaviour: the order travels to the patched llama.cpp as the model KV override
``<arch>.layer_order`` and the library remaps the decoder blocks at load time.

Around that core this class keeps llama-cpp-python's stateful API free of silent wrong answers:

- one object is used by one thread at a time: generation steps, ``eval``, embeddings, state
  calls, ``reset``, ``close`` and re-ordering hold a per-object lock;
- :meth:`Llama.set_layer_order` is transactional, and a generation running when it happens
  stops with :class:`LayerOrderChangedError` at its next token instead of going on in the new,
  empty context; a generation resumed after any other call changed the context stops with
  :class:`GenerationInterruptedError`;
- a state that cannot be restored (saved under another order, or by another library) is refused
  with :class:`StateMismatchError` before anything changes, and prompt caches are keyed by the
  order (:mod:`frankenllama.state_cache`), an unrestorable entry being a miss;
- pickling rebuilds the order the model runs now.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import sys
import threading
import weakref
from typing import Any, Generator, Iterator, Sequence

import llama_cpp
import llama_cpp._internals as internals
import numpy as np
from llama_cpp.llama import LlamaState

from . import _native
from .gguf_info import check_header
from .gguf_tools import file_layer_order
from .order import format_spec
from .program import LayerProgram, program_override_keys
from .recipes import ProgramRecipe, resolve_program
from . import rpc
from .state_cache import OrderKeyedCache, order_namespace


class StateMismatchError(RuntimeError):
    """A saved state this model cannot restore: saved under another layer order, by another
    library version (stock llama-cpp-python), or for another model.  The model is unchanged."""


class GenerationInterruptedError(RuntimeError):
    """A generation (a stream, or a ``generate()`` iterator) went on after another call changed
    the model's context under it: ``eval``, another generation, ``load_state``, ``reset``,
    ``embed``, or ``set_layer_order``.  Its next tokens would be computed from the wrong cache."""


class LayerOrderChangedError(GenerationInterruptedError):
    """A generation was running when :meth:`Llama.set_layer_order` replaced its context."""


def _load_error(log: list[tuple[int, str]]) -> str:
    """The most specific line of a failed load: the layer_order message, else the first error."""
    errors = _native.log_errors(log)
    for line in errors:
        if "layer_order:" in line:
            return line[line.index("layer_order:"):]
    return errors[0] if errors else "see the llama.cpp log above"


def _order_key_names(kv_overrides: dict[str, Any] | None) -> list[str]:
    """The keys of ``kv_overrides`` that carry a layer order (``<arch>.layer_order[.N]``)."""
    return [k for k in (kv_overrides or {}) if k.split(".")[-1] == "layer_order"
            or (".layer_order." in k and k.rsplit(".", 1)[-1].isdigit())]


_open_models: "weakref.WeakSet[Llama]" = weakref.WeakSet()


@atexit.register
def _close_models_at_exit() -> None:
    """Free the models still open while the interpreter is whole.

    Left to the interpreter's shutdown, a model on an RPC server that died would log the loss from
    ggml-rpc's own thread through a Python callback that can never run any more: the process would
    hang instead of exiting.  Models of plain llama_cpp.Llama objects can't be reached from here,
    so with RPC servers in use llama.cpp logs to stderr from now on.
    """
    for llm in list(_open_models):
        with contextlib.suppress(Exception):
            llm.close()
    if rpc.registered():
        _native.log_to_stderr()


def _forget_models_in_forked_child() -> None:
    """A forked child inherits the parent's models but not llama.cpp's threads (ggml-rpc's
    connection threads): freeing them, at its exit or when collected, could wait forever.  In the
    child they are closed without freeing anything native (that memory stays the parent's)."""
    for llm in list(_open_models):
        for owner in (llm, getattr(llm, "_model", None), getattr(llm, "_ctx", None), getattr(llm, "_batch", None)):
            for name in ("_stack", "_exit_stack"):
                if hasattr(owner, name):
                    setattr(owner, name, contextlib.ExitStack())
        llm._model = None  # every later call raises "closed" (_check_open)
    _open_models.clear()


os.register_at_fork(after_in_child=_forget_models_in_forked_child)


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
        rpc_timeout: seconds an RPC connection waits to connect or for a reply (default 300).
        **kwargs: every other ``llama_cpp.Llama`` argument, unchanged.

    Raises:
        ValueError: the model file does not exist, the order is malformed or out of range,
            conflicts with ``kv_overrides``, or the model cannot run it (the message names the
            problem).
        ConnectionError: an RPC server does not answer, or fails while the model loads.  A server
            that fails later makes every decode of the model raise ConnectionError (never a crash).
    """

    def __init__(self, model_path: str, *, layer_order: ProgramRecipe | None = None,
                 rpc_servers: Sequence[str] | str | None = None, rpc_timeout: float | None = None,
                 **kwargs: Any) -> None:
        self._lock = threading.RLock()  # first: close() and __del__ take it
        self._stack = contextlib.ExitStack()  # llama_cpp.Llama.__del__ needs it if we raise before super()
        self._closes_current_ctx = False
        self._order_epoch = 0  # bumped whenever the context is replaced: running generations stop
        self._context_changes = 0  # bumped by every call that changes the context's contents
        self._cache_view: OrderKeyedCache | None = None
        self._rpc_servers = [rpc_servers] if isinstance(rpc_servers, str) else list(rpc_servers or []) or None
        self._rpc_timeout = rpc_timeout
        self._rpc_failures: dict[str, int] = {}
        self._rpc_used: list[str] = []  # endpoints holding this model's layers
        self._file_order: list[int] | None = None
        self._user_kv_overrides = kwargs.get("kv_overrides")
        _open_models.add(self)
        # before llama.cpp sees the file: a block count it would assert on, a misspelled order override
        info = check_header(model_path, kwargs.get("kv_overrides"))
        if self._rpc_servers or rpc_timeout is not None:
            rpc.add_rpc_servers(self._rpc_servers or [], timeout=rpc_timeout)
        self._rpc_failures = rpc.failures()  # failed connections before the load: later ones are this model's
        devices, self._rpc_used = rpc.load_devices(self._rpc_servers, kwargs.get("n_gpu_layers", 0))
        # NULL-terminated; the model_params setter puts it in the params llama_cpp builds
        self._load_devices = None if devices is None else (ctypes.c_void_p * (len(devices) + 1))(*devices)
        requested: LayerProgram | None = None
        self._program: LayerProgram | None = None  # the program run now, if it is not a plain order
        if layer_order is not None:
            if kwargs.get("vocab_only"):
                raise ValueError("vocab_only=True loads no decoder blocks, so a layer_order has nothing to "
                                 "run: leave layer_order out for a vocabulary-only model")
            requested = resolve_program(layer_order, info.n_layer)
            kwargs["kv_overrides"] = _merge_overrides(kwargs.get("kv_overrides"), program_override_keys(info.arch, requested))

        with _native.capture_llama_log() as errors:
            try:
                super().__init__(model_path, **kwargs)
            except ValueError as err:
                failed = rpc.failed_servers(self._rpc_failures, list(self._rpc_failures))
                if failed:
                    raise ConnectionError(f"RPC server {', '.join(failed)} failed while the model loaded: "
                                          f"{_load_error(errors)}") from None
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
            if applied != list(requested.order):
                raise RuntimeError(
                    f"the native library did not apply the layer order (asked {requested}, "
                    f"running {format_spec(applied)}): is LLAMA_CPP_LIB_PATH pointing at a stock llama.cpp?"
                )
            self._program = None if requested.is_plain else requested
        self._state_prefix = self._read_state_prefix()
        self._model_identity = self._read_identity()  # the file as loaded, and the settings
        self._check_rpc("loading the model")

    @property
    def model_params(self) -> llama_cpp.llama_model_params:
        """llama_cpp's model parameters; their device list is the one :func:`rpc.load_devices` chose."""
        return self._model_params

    @model_params.setter
    def model_params(self, params: llama_cpp.llama_model_params) -> None:
        # llama_cpp.Llama.__init__ assigns the params first, then fills them field by field
        if getattr(self, "_load_devices", None) is not None:
            params.devices = ctypes.cast(self._load_devices, ctypes.c_void_p)
        self._model_params = params

    # -- the order -------------------------------------------------------------------------------

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

    @property
    def layer_program(self) -> LayerProgram:
        """The layer program the model runs (:mod:`frankenllama.program`); for a plain order, the
        program with default routing and scales, whose ``spec`` is the order's."""
        return self._program or LayerProgram.from_order(self.layer_order)

    def file_layer_order(self) -> list[int]:
        """The order the file itself runs: the order it stores (``<arch>.layer_order``), else every
        weight layer once, in file order."""
        if self._file_order is None:  # read once: the header is the one this model was loaded from
            self._file_order = file_layer_order(self.model_path)
        return list(self._file_order)

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

    def set_layer_order(self, layer_order: ProgramRecipe | None) -> None:
        """Switch to another order without reloading the weights.

        The context and its KV cache are rebuilt for the new depth, so the conversation state is
        dropped (as after ``reset()``), and a generation that is running (a partly consumed stream,
        or one in another thread) stops with :class:`LayerOrderChangedError` at its next token.
        ``None`` restores the file's own order (:meth:`file_layer_order`).  Only weight layers that
        were loaded can run: a model loaded with an order that leaves layers out cannot run them.

        The switch is transactional: if the new order is refused, or its context cannot be
        allocated, the model keeps running its previous order (with an empty conversation).

        Raises:
            ValueError: the order is malformed, out of range, unsupported, uses unloaded layers, or
                needs more memory than a context can get.
            ConnectionError: an RPC server this model uses has failed.
        """
        with self._lock:
            self._check_open()
            if self.model_params.vocab_only:
                raise ValueError("a vocab_only=True model has no decoder blocks to re-order")
            self._check_rpc("changing the layer order")
            try:
                self._switch_order(layer_order)
            except ValueError:
                # a context on a dead server can't be allocated: say why, not "out of memory"
                error = self._rpc_error("changing the layer order")
                if error is not None:
                    raise error from None
                raise

    def _switch_order(self, layer_order: ProgramRecipe | None) -> None:
        """set_layer_order's work, under the lock."""
        ffi, lib = _native.ffi_lib()
        model = _native.model_ptr(self._model)
        program = (LayerProgram.from_order(self.file_layer_order()) if layer_order is None
                   else resolve_program(layer_order, self.n_weight_layers))
        order = list(program.order)
        missing = [il for il in order if not lib.llama_model_layer_is_loaded(model, il)]
        if missing:
            raise ValueError(
                f"weight layer(s) {format_spec(sorted(set(missing)))} were not loaded, because the order "
                "given at load time does not run them; load the model without layer_order to re-order freely"
            )
        previous = self.layer_program
        self._order_epoch += 1
        self._context_changes += 1
        switched = False
        try:
            self._ctx.close()
            with _native.capture_llama_log() as errors:
                rc = _native.set_layer_program(model, program)
            if rc != 0:
                raise ValueError(f"could not set the layer order: {_load_error(errors)}")
            self._program = None if program.is_plain else program
            try:
                self._open_context()
            except ValueError as err:
                _native.set_layer_program(model, previous)
                self._program = None if previous.is_plain else previous
                raise ValueError(
                    f"could not create a context for the layer order {program} "
                    f"({len(order)} positions, n_ctx={self.context_params.n_ctx}): {err}; "
                    "the model keeps its previous order"
                ) from None
            switched = True
        finally:
            if self._ctx.ctx is None:
                if self.layer_program != previous:  # interrupted between the native calls
                    _native.set_layer_program(model, previous)
                    self._program = None if previous.is_plain else previous
                self._open_context()  # the previous order's context (empty conversation)
            self.n_tokens = 0
            self._requires_eval = True
            self._sampler = None
            self.metadata = self._model.metadata()  # "<arch>.layer_order" follows the order
            self._state_prefix = self._read_state_prefix()
            stale = _order_key_names(self.kv_overrides)
            if switched and stale:  # the load-time order no longer describes the model (pickle, repr)
                kept = {k: v for k, v in self.kv_overrides.items() if k not in stale}
                self.kv_overrides = kept or None

    def _open_context(self) -> None:
        """Create the context for the model's current order (raises ValueError if it can't)."""
        ctx = internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
        # LlamaContext registers its close() on the model's exit stack, which would keep every
        # replaced context alive until the model is freed; this object closes the current one itself
        callbacks = self._model._exit_stack._exit_callbacks
        for entry in list(callbacks):
            if getattr(entry[1], "__wrapped__", None) == ctx.close:
                callbacks.remove(entry)
        self._ctx = ctx
        if not self._closes_current_ctx:
            # close() frees whichever context is current, before the model (the stack unwinds LIFO)
            self._stack.callback(lambda: self._ctx.close())
            self._closes_current_ctx = True
        if self._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales)

    # -- one thread at a time, generations that notice a change under them -----------------------

    def _check_open(self) -> None:
        """Raise instead of letting a call reach freed native objects (a segfault)."""
        if getattr(self, "_model", None) is None or self._model.model is None or self._ctx.ctx is None:
            raise RuntimeError("this Llama was closed (close()); load the model again")

    def _changing_context(self) -> None:
        """Before a call that changes the context's contents: running generations must stop."""
        self._check_open()
        self._context_changes += 1

    def eval(self, tokens: Sequence[int]) -> None:
        with self._lock:
            self._changing_context()
            try:
                super().eval(tokens)
            except RuntimeError:
                self._requires_eval = True
                self._check_rpc("decoding")  # a failed server is why decode failed: say so
                raise
            except BaseException:
                # interrupted (Ctrl-C) between the decode and its bookkeeping: the logits left in the
                # context are not those of input_ids[:n_tokens], so the next call must decode again
                self._requires_eval = True
                raise
            self._check_rpc("decoding")

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._changing_context()
            try:
                result = super().embed(*args, **kwargs)
            except BaseException:
                # embed() clears the cache and decodes its own text: the conversation is gone
                self._ctx.kv_cache_clear()
                self.n_tokens = 0
                self._requires_eval = True
                if isinstance(sys.exc_info()[1], RuntimeError):
                    self._check_rpc("computing embeddings")
                raise
            self._check_rpc("computing embeddings")
            return result

    def reset(self) -> None:
        with self._lock:
            self._changing_context()
            super().reset()

    def _check_rpc(self, doing: str) -> None:
        """Raise ConnectionError if an RPC server this model uses failed since it was loaded (its
        outputs since then are garbage: they must never reach a caller)."""
        if not self._rpc_used:
            return
        if self._ctx.ctx is not None:
            llama_cpp.llama_synchronize(self._ctx.ctx)  # let queued RPC work finish or fail
        error = self._rpc_error(doing)
        if error is not None:
            if doing == "loading the model":
                self.close()
            raise error

    def _rpc_error(self, doing: str) -> ConnectionError | None:
        """The ConnectionError to raise if an RPC server this model uses has failed, else None."""
        failed = rpc.failed_servers(self._rpc_failures, self._rpc_used)
        if not failed:
            return None
        return ConnectionError(
            f"RPC server {', '.join(failed)} failed (connection lost, timed out or malformed reply) "
            f"while {doing}; this model can't use it any more: load it again once the server is back")

    def close(self) -> None:
        with self._lock:
            self._order_epoch += 1  # a stream of a closed model stops instead of touching freed memory
            self._context_changes += 1
            super().close()

    def tokenize(self, *args: Any, **kwargs: Any) -> list[int]:
        self._check_open()
        return super().tokenize(*args, **kwargs)

    def detokenize(self, *args: Any, **kwargs: Any) -> bytes:
        self._check_open()
        return super().detokenize(*args, **kwargs)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``llama_cpp.Llama.generate``, one token at a time under the object's lock.

        Raises (from the iterator):
            LayerOrderChangedError: ``set_layer_order`` (or ``close``) ran since its last token.
            GenerationInterruptedError: another call changed the context since its last token.
        """
        return self._locked_steps(super().generate(tokens, *args, **kwargs))

    def _create_completion(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        # every completion (streamed or not, chat too) is this generator: a plain completion runs it
        # in one locked step; a stream resumes it chunk by chunk, each chunk checked and locked
        return self._locked_steps(super()._create_completion(*args, **kwargs))

    def _locked_steps(self, inner: Generator[Any, Any, None]) -> Generator[Any, Any, None]:
        epoch = changes = None  # taken at the first step: nothing ran before it
        sent: Any = None
        try:
            while True:
                with self._lock:
                    if epoch is not None and self._order_epoch != epoch:
                        raise LayerOrderChangedError(
                            "set_layer_order() (or close()) replaced the context while this generation was "
                            "running; start the generation again")
                    if changes is not None and self._context_changes != changes:
                        raise GenerationInterruptedError(
                            "another call (eval, a generation, load_state, reset or embed) changed the "
                            "context since this generation's last token; start the generation again")
                    if epoch is None:
                        self._check_open()
                        epoch = self._order_epoch
                    try:
                        item = inner.send(sent)
                    except StopIteration:
                        return
                    changes = self._context_changes  # this generation's own evals
                sent = yield item
        finally:
            inner.close()

    # -- states and prompt caches ----------------------------------------------------------------

    def _read_state_prefix(self) -> bytes:
        """The leading bytes of this context's saved states (architecture and order fingerprint);
        a state with other leading bytes was saved under another order or by another library."""
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buf, size)
        data = bytes(buf[:written])
        arch_len = int.from_bytes(data[:4], "little")
        return data[:4 + arch_len + 8]

    def _read_identity(self) -> str:
        """What, besides the order, a state's K/V depends on: the model file and the settings that
        change its K/V (LoRA, RoPE scaling, K/V types, other overrides)."""
        try:
            stat = os.stat(self.model_path)
            file_id = (os.path.realpath(self.model_path), stat.st_size, stat.st_mtime_ns)
        except OSError:
            file_id = (self.model_path,)
        params = self.context_params
        overrides = sorted((k, repr(v)) for k, v in (self._user_kv_overrides or {}).items()
                           if k not in _order_key_names(self._user_kv_overrides))
        settings = (file_id, self.lora_path, self.lora_scale, params.rope_freq_base, params.rope_freq_scale,
                    params.yarn_ext_factor, params.yarn_attn_factor, params.yarn_beta_fast, params.yarn_beta_slow,
                    params.yarn_orig_ctx, params.type_k, params.type_v, overrides)
        return hashlib.sha256(repr(settings).encode()).hexdigest()

    def save_state(self) -> LlamaState:
        """llama-cpp-python's ``save_state``; the state also records which model and settings it
        belongs to (``frankenllama_model``), so that another model refuses it."""
        with self._lock:
            self._check_open()
            self._check_rpc("saving the state")  # a dead server's buffers would be saved as zeros
            state = super().save_state()
            self._check_rpc("saving the state")  # and one that died unnoticed shows now
            state.frankenllama_model = self._model_identity
            return state

    def load_state(self, state: LlamaState) -> None:
        """Restore a state saved by :meth:`save_state`.

        Raises:
            StateMismatchError: the state was saved under another layer order, by another library
                version (stock llama-cpp-python writes another format), for another model or
                settings, or for another context size; nothing was changed.  If llama.cpp fails
                beyond those checks, the conversation is reset (never half-restored).
        """
        with self._lock:
            self._check_open()
            problem = self._state_problem(state)
            if problem:
                raise StateMismatchError(problem)
            self._context_changes += 1
            size = int(state.llama_state_size)
            try:
                buffer = (ctypes.c_uint8 * size).from_buffer_copy(bytes(state.llama_state))
                if llama_cpp.llama_state_set_data(self._ctx.ctx, buffer, size) != size:
                    raise StateMismatchError("llama.cpp could not restore this state (corrupt?); "
                                             "the conversation was reset")
                # llama-cpp-python's load_state, after the native call instead of before it
                self.scores[: state.n_tokens, :] = state.scores
                rest = self.scores[state.n_tokens:, :]
                rest[rest > 0] = 0.0
                self.input_ids[:] = state.input_ids
                self.n_tokens = state.n_tokens
                self._requires_eval = True
                self._seed = state.seed
            except BaseException:
                self._ctx.kv_cache_clear()
                self.n_tokens = 0
                self._requires_eval = True
                raise

    def _state_problem(self, state: LlamaState) -> str | None:
        """Why this model can't restore ``state`` (None if it can), found before anything changes."""
        data = bytes(state.llama_state)
        if data[:len(self._state_prefix)] != self._state_prefix or int(state.llama_state_size) != len(data):
            return ("this state can't be restored here: it was saved under another layer order, by another "
                    f"library version (e.g. stock llama-cpp-python), or for another model; this model runs "
                    f"layer order {format_spec(self.layer_order)}. Restore it on a model with the order it "
                    "was saved under, or compute the prompt again")
        saved_for = getattr(state, "frankenllama_model", None)
        if saved_for is not None and saved_for != self._model_identity:
            return ("this state was saved for another model file or other settings (LoRA, RoPE scaling, "
                    "K/V types, kv_overrides); restore it on the model it was saved with")
        if state.input_ids.shape != self.input_ids.shape or not 0 <= state.n_tokens <= len(self.input_ids):
            return (f"this state was saved with n_ctx={len(state.input_ids)} (n_tokens={state.n_tokens}); "
                    f"this model has n_ctx={len(self.input_ids)}: use the same n_ctx")
        try:
            np.broadcast_to(state.scores, self.scores[: state.n_tokens, :].shape)
        except ValueError:
            return (f"this state's scores {state.scores.shape} don't fit this model's "
                    f"{self.scores[: state.n_tokens, :].shape}: use the same n_batch and logits_all")
        return None

    @property
    def cache(self) -> OrderKeyedCache | None:
        """The prompt cache (``set_cache``), seen through a view whose keys carry the model and its
        layer order; the cache you passed is ``llm.cache.inner``."""
        return self._cache_view

    @cache.setter
    def cache(self, value: Any) -> None:
        if isinstance(value, OrderKeyedCache):
            value = value.inner
        self._cache_view = None if value is None else OrderKeyedCache(
            value, self._cache_namespace, lambda state: self._state_problem(state) is None)

    def _cache_namespace(self) -> tuple[int, ...]:
        return order_namespace(self._model_identity, self.n_weight_layers, self.layer_order,
                               "" if self._program is None else self._program.spec)

    # -- pickling ----------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """llama-cpp-python's constructor arguments, with the order the model runs *now*."""
        state = super().__getstate__()
        overrides = {k: v for k, v in (self._user_kv_overrides or {}).items()
                     if k not in _order_key_names(self._user_kv_overrides)}
        state["kv_overrides"] = overrides or None
        current = self.layer_order
        state["layer_order"] = (self._program.spec if self._program is not None
                                else None if current == self.file_layer_order() else current)
        state["rpc_servers"] = self._rpc_servers
        state["rpc_timeout"] = self._rpc_timeout
        return state


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
