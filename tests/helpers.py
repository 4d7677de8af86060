"""What many tests do: load a model, evaluate tokens, read the logits; start an RPC server.

``load`` and ``eval_scores`` go through ``frankenllama.Llama``; ``raw_logits`` through
``lowlevel.RawModel`` (llama.cpp's own API, several sequences in one batch).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any, Sequence

import numpy as np

from frankenllama import Llama
from frankenllama.rpc import rpc_server_path
from lowlevel import RawModel, run

#: ggml spin-waits between threads: one thread is far steadier on a busy 2-core machine
THREADS = 1


def load(path: str | os.PathLike[str], **kw: Any) -> Llama:
    """A quiet ``frankenllama.Llama`` on ``path`` with ``THREADS`` threads; ``kw`` overrides
    (``n_threads_batch=None`` is llama_cpp's default)."""
    return Llama(str(path), **{"verbose": False, "n_threads": THREADS, "n_threads_batch": THREADS, **kw})


def scores_so_far(llm: Llama) -> np.ndarray:
    """The logits of every token evaluated so far (a model loaded with ``logits_all=True``)."""
    return np.array(llm.scores[: llm.n_tokens])


def eval_scores(llm: Llama, *chunks: bytes | Sequence[int], incremental: bool = False) -> np.ndarray:
    """Reset ``llm``, evaluate each chunk in turn (text is tokenized, with BOS), in one call or,
    ``incremental``, token by token; return :func:`scores_so_far`."""
    llm.reset()
    for chunk in chunks:
        tokens = llm.tokenize(chunk) if isinstance(chunk, bytes) else list(chunk)
        if incremental:
            for token in tokens:
                llm.eval([token])
        else:
            llm.eval(tokens)
    return scores_so_far(llm)


def token_nll(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[t])[tokens[t + 1]] for every token after the first, in float64
    (``logits[t]``: the logits after token ``t``)."""
    x = np.asarray(logits[: len(tokens) - 1], dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return lse - x[np.arange(len(x)), np.asarray(tokens[1:])]


def raw_logits(path: str | os.PathLike[str], seqs: Sequence[Sequence[int]], mode: str = "batch",
               **kw: Any) -> list[np.ndarray]:
    """Logits per sequence (``lowlevel.run``: ``mode`` "batch" or "incremental") of a ``RawModel``
    on ``path`` made with ``kw``, closed afterwards."""
    with RawModel(path, **kw) as model:
        return run(model, seqs, mode)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rpc_server(port: int = 0) -> tuple[subprocess.Popen, int]:
    """frankenllama's rpc-server (one thread) on 127.0.0.1:``port`` (a free one for 0), once it accepts
    connections; RuntimeError if it does not within 20 s."""
    port = port or free_port()
    server = subprocess.Popen([str(rpc_server_path()), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.2)  # the probe connection is served and closed first (one client at a time)
            return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("rpc-server did not start listening within 20 s")
