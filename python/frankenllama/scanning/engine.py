"""Score layer orders on one loaded model, resuming shared prefixes from cached hidden states.

Every configuration runs the packed decodes of a :class:`~.inputs.Dataset` and returns per-token
negative log-likelihoods, per-token KL divergences from the base order, and probe log-probabilities.

**Prefix caching.** Two orders that start with the same ``k`` positions compute the same hidden
state after position ``k - 1`` (for the same tokens).  While an order runs, llama.cpp's eval
callback (``cb_eval``) copies the outputs of chosen positions (graph tensors ``l_out-<p>``; in the
patched build ``p`` is the *execution position*: the graph's layers are remapped to positions)
out of the graph.  A later order with that prefix sets the model to the rest of its order
(``set_layer_order(order[k:])``) and decodes the cached states as input embeddings
(``llama_batch.embd``), with the same positions and sequence ids.  That is the computation a full
run does, provided the architecture feeds embedding input into the first block exactly like its
internal stream: checked in the vendored llama.cpp for :data:`PREFIX_CACHE_ARCHS` (``llama``:
``build_inp_embd`` only; ``gemma3``: scales token embeddings by sqrt(n_embd) but embedding input by
1.0, an exact no-op).  Every scan also checks it at run time: after the base order, the second
half of the base order is run again from the cached state and its logits must equal the full
run's bit for bit; otherwise the scan falls back to naive recompute and says why
(:attr:`Evaluator.prefix_note`).  Other architectures always use naive recompute.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import _native
from ..order import format_spec
from .errors import ScanError
from .inputs import Bin, Dataset

#: architectures whose graph takes embedding input exactly like its internal stream (see above)
PREFIX_CACHE_ARCHS = frozenset({"llama", "gemma3"})

_GGML_CDEF = """
struct ggml_tensor;
const char * ggml_get_name(const struct ggml_tensor * tensor);
int64_t      ggml_nelements(const struct ggml_tensor * tensor);
int64_t      ggml_nrows(const struct ggml_tensor * tensor);
size_t       ggml_nbytes(const struct ggml_tensor * tensor);
void         ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
"""


@dataclass
class Scores:
    """Raw scores of one order on one dataset."""

    nll: np.ndarray            # per text target: -log p(token), float64
    kl: np.ndarray             # per text target: KL(base || this order), float64
    probe_logprob: np.ndarray  # per probe sequence (item, continuation): sum of log p, float64
    probe_tokens: np.ndarray   # per probe sequence: continuation tokens


def _log_softmax_stats(logits: np.ndarray, base_probs: np.ndarray | None, targets: np.ndarray,
                       rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """log p(target) per row, and sum_v base_p[v] * log p[v] per row (0 without base).

    Sums are accumulated in float64 (the exponentials are float32: relative error ~1e-7 per term);
    equal logits give bit-equal results, so the base order's KL from itself is exactly 0."""
    n = logits.shape[0]
    logp_target = np.empty(n)
    cross = np.zeros(n)
    for r0 in range(0, n, rows):
        block = logits[r0:r0 + rows]
        m = block.max(axis=1)
        lse = np.log(np.exp(block - m[:, None]).sum(axis=1, dtype=np.float64)) + m
        logp_target[r0:r0 + rows] = block[np.arange(len(block)), targets[r0:r0 + rows]] - lse
        if base_probs is not None:
            cross[r0:r0 + rows] = np.einsum("ij,ij->i", base_probs[r0:r0 + rows], block, dtype=np.float64) - lse
    return logp_target, cross


class _Capture:
    """The eval callback: copies the outputs of the wanted positions (``l_out-<p>``) out of the graph."""

    def __init__(self) -> None:
        self.ffi, self.lib = _native.open_native_library("ggml-base", _GGML_CDEF)
        self.wanted: dict[bytes, int] = {}   # tensor name -> position
        self.got: dict[int, np.ndarray] = {}
        self.error: str | None = None
        self.interrupted = False  # a Ctrl-C arrived while the graph ran (re-raised after the decode)
        self.callback = _eval_callback_type()(self._call)

    def want(self, positions: Sequence[int]) -> None:
        self.wanted = {f"l_out-{p}".encode(): p for p in positions}
        self.got = {}
        self.error = None

    def _call(self, tensor: Any, ask: bool, user_data: Any) -> bool:
        try:
            return self._handle(tensor, ask)
        except KeyboardInterrupt:  # Python runs the SIGINT handler inside the callback
            self.interrupted = True
            return not ask
        except BaseException as err:  # never let an exception cross the C boundary
            self.error = f"{type(err).__name__}: {err}"
            return False

    def _handle(self, tensor: Any, ask: bool) -> bool:
        """Answer the scheduler: want this node's data (ask), or take it (not ask); True = go on."""
        if not self.wanted:
            return not ask
        t = self.ffi.cast("struct ggml_tensor *", tensor)
        name = self.ffi.string(self.lib.ggml_get_name(t))
        position = self.wanted.get(name)
        if position is None:
            return not ask
        if ask:
            return True
        n_bytes = int(self.lib.ggml_nbytes(t))
        n_rows = int(self.lib.ggml_nrows(t))
        if n_bytes != 4 * int(self.lib.ggml_nelements(t)):
            self.error = f"{name.decode()} is not float32"
            return False
        out = np.empty((n_rows, int(self.lib.ggml_nelements(t)) // n_rows), np.float32)
        self.lib.ggml_backend_tensor_get(t, self.ffi.cast("void *", out.ctypes.data), 0, n_bytes)
        self.got[position] = out
        return True


def _eval_callback_type() -> Any:
    import llama_cpp

    return llama_cpp.ggml_backend_sched_eval_callback


class _Batches:
    """The token batch and the embedding batch of one bin, allocated once."""

    def __init__(self, b: Bin, n_embd: int) -> None:
        import llama_cpp

        self.ll = llama_cpp
        tokens, pos, seq, flags = b.arrays()
        self.n = len(tokens)
        self.n_out = int(flags.sum())
        self.n_embd = n_embd
        self.tokens = llama_cpp.llama_batch_init(self.n, 0, 1)
        self.embd = llama_cpp.llama_batch_init(self.n, n_embd, 1)
        for batch in (self.tokens, self.embd):
            batch.n_tokens = self.n
            np.ctypeslib.as_array(batch.pos, shape=(self.n,))[:] = pos
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(self.n,))[:] = flags
            for i in range(self.n):
                batch.seq_id[i][0] = int(seq[i])
        np.ctypeslib.as_array(self.tokens.token, shape=(self.n,))[:] = tokens
        self._embd = np.ctypeslib.as_array(self.embd.embd, shape=(self.n, n_embd))

    def with_state(self, state: np.ndarray) -> Any:
        self._embd[:] = state
        return self.embd

    def free(self) -> None:
        for name in ("tokens", "embd"):
            batch = getattr(self, name, None)
            if batch is not None:
                self.ll.llama_batch_free(batch)
                setattr(self, name, None)


class Evaluator:
    """Scores orders on ``dataset`` with a :class:`frankenllama.Llama` prepared by :func:`prepare_llama`.

    The first order scored must be ``base`` (the model's own order): its probabilities are the
    reference of every KL divergence.
    """

    def __init__(self, llm: Any, dataset: Dataset, base: Sequence[int], *, prefix_cache: bool = True,
                 cache_bytes: int = 2 << 30) -> None:
        import llama_cpp

        self.ll = llama_cpp
        self.llm = llm
        self.dataset = dataset
        self.base = list(base)
        self.n_vocab = int(llm.n_vocab())
        self.n_embd = int(llm.n_embd())
        self.cache_bytes = cache_bytes
        self._capture: _Capture = llm._frankenllama_scan_capture
        arch = str(llm.metadata.get("general.architecture", "?"))
        self.prefix_cache = bool(prefix_cache) and arch in PREFIX_CACHE_ARCHS
        if not prefix_cache:
            self.prefix_note = "off (asked)"
        elif arch not in PREFIX_CACHE_ARCHS:
            self.prefix_note = (f"off: not verified for architecture {arch!r} (verified: "
                                f"{', '.join(sorted(PREFIX_CACHE_ARCHS))}); naive recompute")
        else:
            self.prefix_note = "on"
        self._batches = [_Batches(b, self.n_embd) for b in dataset.bins]
        self._state_bytes = sum(bt.n for bt in self._batches) * self.n_embd * 4
        self._cache: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._base_probs: list[np.ndarray] | None = None  # per bin: base probabilities of text outputs
        self._text_rows: list[tuple[int, int]] = []  # per bin: the text outputs' rows [start, stop)
        self._collecting_base = False
        self._base_cross: np.ndarray | None = None  # per text target: sum_v p_base log p_base
        self._text_targets: list[np.ndarray] = []
        self._text_index: list[np.ndarray] = []
        self._probe_rows: list[list[tuple[int, int, int]]] = []  # per bin: (probe seq index, row0, n)
        self._probe_targets: list[np.ndarray] = []
        self._probe_count = 0
        self._layout()
        self.decodes = 0          # llama_decode calls so far
        self.positions_run = 0    # execution positions run so far, summed over decodes

    def _layout(self) -> None:
        targets_by_index: dict[int, np.ndarray] = {}
        for b in self.dataset.bins:
            row = 0
            text_rows, targets, index, probes = [], [], [], []
            for s in b.seqs:
                n = len(s.out_pos)
                if s.kind == "text":
                    text_rows.extend(range(row, row + n))
                    targets.extend(s.targets)
                    index.extend(range(s.item, s.item + n))
                else:  # packing may put a later sequence in an earlier decode: index by s.index
                    probes.append((s.index, row, n))
                    targets_by_index[s.index] = np.asarray(s.targets, np.int64)
                row += n
            if text_rows != list(range(text_rows[0] if text_rows else 0, (text_rows[-1] + 1) if text_rows else 0)):
                raise ScanError("internal: text outputs of a decode are not contiguous")
            self._text_rows.append((text_rows[0], text_rows[-1] + 1) if text_rows else (0, 0))
            self._text_targets.append(np.asarray(targets, np.int64))
            self._text_index.append(np.asarray(index, np.int64))
            self._probe_rows.append(probes)
        self._probe_count = len(targets_by_index)
        if sorted(targets_by_index) != list(range(self._probe_count)):
            raise ScanError("internal: probe sequences are not numbered 0..n-1")
        self._probe_targets = [targets_by_index[k] for k in range(self._probe_count)]

    def close(self) -> None:
        for bt in self._batches:
            bt.free()
        self._batches = []
        self._cache.clear()

    # -- running ----------------------------------------------------------------------------------

    def _set_order(self, order: Sequence[int]) -> None:
        try:
            self.llm.set_layer_order(list(order))
        except ValueError as err:
            raise ScanError(f"the model refuses the layer order {format_spec(order)}: {err}") from None

    def _decode(self, k: int, order: Sequence[int], capture: Sequence[int],
                on_bin: Callable[[int, np.ndarray], None]) -> dict[int, list[np.ndarray]]:
        """Run ``order[k:]`` on every bin (from the cached state of ``order[:k]`` when k > 0), hand
        each bin's output logits to ``on_bin`` (a view of llama.cpp's buffer, valid during the
        call); returns the states after the positions in ``capture``."""
        ll = self.ll
        suffix = list(order[k:])
        self._set_order(suffix)
        ctx = self.llm._ctx.ctx
        states = self._cache[tuple(order[:k])] if k else None
        captured: dict[int, list[np.ndarray]] = {p: [] for p in capture}
        for index, bt in enumerate(self._batches):
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            self._capture.want([p - k for p in capture])
            batch = bt.tokens if states is None else bt.with_state(states[index])
            try:
                rc = ll.llama_decode(ctx, batch)
            finally:
                got, error, interrupted = self._capture.got, self._capture.error, self._capture.interrupted
                self._capture.want([])
                self._capture.interrupted = False
            if interrupted:
                raise KeyboardInterrupt
            if error:
                raise ScanError(f"reading hidden states failed: {error}")
            if rc != 0:
                raise ScanError(f"llama_decode failed ({rc}) for the order {format_spec(order)}")
            self.decodes += 1
            self.positions_run += len(suffix)
            for p in capture:
                state = got.get(p - k)
                if state is None or state.shape != (bt.n, self.n_embd):
                    raise ScanError(f"the graph has no output l_out-{p - k} of {bt.n} rows (got "
                                    f"{None if state is None else state.shape}): cannot cache prefixes")
                captured[p].append(state)
            on_bin(index, np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(bt.n_out, self.n_vocab)))
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        return captured

    def _score_bin(self, acc: Scores, index: int, out: np.ndarray) -> None:
        """Add one bin's logits to ``acc`` (the base order's first: it keeps its probabilities)."""
        r0, r1 = self._text_rows[index]
        text = out[r0:r1]
        targets = self._text_targets[index]
        if self._collecting_base:
            assert self._base_probs is not None and len(self._base_probs) == index
            m = text.max(axis=1, keepdims=True).astype(np.float64)
            p = np.exp(text.astype(np.float64) - m)
            p /= p.sum(axis=1, keepdims=True)
            self._base_probs.append(p.astype(np.float32))
        assert self._base_probs is not None
        logp_target, cross = _log_softmax_stats(text, self._base_probs[index], targets)
        acc.nll[self._text_index[index]] = -logp_target
        acc.kl[self._text_index[index]] = cross  # becomes the KL in _finish
        for probe, row0, n in self._probe_rows[index]:
            lp, _ = _log_softmax_stats(out[row0:row0 + n], None, self._probe_targets[probe])
            acc.probe_logprob[probe] = lp.sum()
            acc.probe_tokens[probe] = n

    def _new_scores(self) -> Scores:
        n = self.dataset.n_text_targets
        return Scores(np.zeros(n), np.zeros(n), np.zeros(self._probe_count),
                      np.zeros(self._probe_count, np.int64))

    def _finish(self, acc: Scores) -> Scores:
        """Turn the cross terms into KL divergences (the base order's own cross term minus them)."""
        if self._collecting_base:
            self._collecting_base = False
            self._base_cross = acc.kl.copy()
        acc.kl = self._base_cross - acc.kl
        return acc

    # -- planning ---------------------------------------------------------------------------------

    def score_many(self, orders: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], Scores]]:
        """Score ``orders`` in turn, yielding each as soon as it is done.  Hidden states after
        prefixes that later orders of this call share are cached while they are needed."""
        orders = [list(o) for o in orders]
        counts: dict[tuple[int, ...], int] = {}
        if self.prefix_cache:
            for o in orders:
                for k in range(1, len(o)):
                    key = tuple(o[:k])
                    counts[key] = counts.get(key, 0) + 1
        for order in orders:
            if self.prefix_cache:
                for k in range(1, len(order)):
                    key = tuple(order[:k])
                    counts[key] -= 1
            yield order, self._score_one(order, counts)
            if self.prefix_cache:
                for key in [key for key in self._cache if counts.get(key, 0) <= 0]:
                    del self._cache[key]

    def _score_one(self, order: list[int], counts: dict[tuple[int, ...], int]) -> Scores:
        first = self._base_cross is None
        if first and order != self.base:
            raise ScanError("internal: the base order must be scored first")
        k = 0
        capture: list[int] = []
        if self.prefix_cache:
            for j in range(len(order) - 1, 0, -1):
                if tuple(order[:j]) in self._cache:
                    k = j
                    break
            budget = self.cache_bytes - len(self._cache) * self._state_bytes
            for j in range(k + 1, len(order)):
                key = tuple(order[:j])
                here = counts.get(key, 0)
                if here <= 0 or key in self._cache:
                    continue
                branch = j == len(order) - 1 or counts.get(tuple(order[:j + 1]), 0) < here
                if branch and budget >= self._state_bytes:
                    capture.append(j - 1)
                    budget -= self._state_bytes
            if first:
                check = len(order) // 2
                if check >= 1 and check - 1 not in capture:
                    capture.append(check - 1)
        acc = self._new_scores()
        kept: list[np.ndarray] = []
        if first:
            self._base_probs, self._collecting_base = [], True

        def on_bin(index: int, out: np.ndarray) -> None:
            if first and self.prefix_cache:
                kept.append(out.copy())  # for the self-check
            self._score_bin(acc, index, out)

        captured = self._decode(k, order, sorted(capture), on_bin)
        for p, states in captured.items():
            self._cache[tuple(order[:p + 1])] = states
        scores = self._finish(acc)
        if first and self.prefix_cache:
            self._self_check(order, kept)
        return scores

    def _self_check(self, order: list[int], logits: list[np.ndarray]) -> None:
        """Run the second half of the base order from the cached state; it must give the same logits."""
        check = len(order) // 2
        if check < 1:
            return
        worst = [0.0]
        same = [True]

        def compare(index: int, out: np.ndarray) -> None:
            if not np.array_equal(out, logits[index]):
                same[0] = False
                worst[0] = max(worst[0], float(np.max(np.abs(out - logits[index]))))

        self._decode(check, order, [], compare)
        if not same[0]:
            self.prefix_cache = False
            self._cache.clear()
            self.prefix_note = (f"off: resuming {format_spec(order[check:])} from the cached state after "
                                f"position {check - 1} changed the logits (max |diff| {worst[0]:.3g}); naive "
                                "recompute")
        else:
            self.prefix_note = (f"on (checked: {format_spec(order[check:])} from the state after position "
                                f"{check - 1} reproduces the full run's logits bit for bit)")


def prepare_llama(llm: Any, n_ctx: int, n_seq_max: int) -> None:
    """Give ``llm``'s future contexts one ubatch of ``n_ctx`` tokens, ``n_seq_max`` sequences in a
    unified K/V cache, and the hidden-state capture callback (every ``set_layer_order`` builds its
    context from these parameters)."""
    capture = _Capture()
    llm._frankenllama_scan_capture = capture  # keeps the callback alive as long as the model
    params = llm.context_params
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = n_ctx
    params.n_seq_max = max(1, n_seq_max)
    params.kv_unified = True
    params.embeddings = False
    params.cb_eval = capture.callback
    params.cb_eval_user_data = ctypes.c_void_p(0)
