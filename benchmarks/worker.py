"""One benchmark job in its own process; ``benchmarks/run.py`` starts it and reads its JSON.

A process can load only one libllama, so every job runs here, in a subprocess, bound to exactly
one library:

* ``--lib patched`` imports ``frankenllama`` (which binds the patched library: the one named by
  ``FRANKENLLAMA_LIB_DIR``, else the one packaged with the installed frankenllama);
* ``--lib stock`` imports plain ``llama_cpp`` only (``run.py`` sets ``LLAMA_CPP_LIB_PATH`` to the
  unpatched build) and never imports frankenllama.

The job's result is the last line of stdout, one JSON object.  llama.cpp's own log (``verbose``)
goes to stderr, where ``run.py`` reads the buffer sizes from it.

Jobs:
    info         model facts (arch, depth, bytes per block, KV width), and optionally materialize
                 orders into files (untimed preparation of the stock side's twins)
    bench        load (use_mmap=False), one warm-up pass, then ``--inner`` timed passes of prompt
                 processing + greedy generation (median); logits of the first timed pass saved
    reorder      load without an order, then time ``set_layer_order`` (context rebuilt)
    fresh        time a fresh ``use_mmap=False`` load with the order (context included)
    materialize  time ``materialize`` in a child process, read the child's peak RSS, then time a
                 plain file copy of the same bytes
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# a fixed English text; the prompt is its first N tokens (repeated if the text is too short)
PROMPT_TEXT = (
    "The history of the lighthouse is a story of engineering, weather and solitude. Long before "
    "electric lamps, keepers climbed narrow stairs every evening to trim wicks, polish brass and "
    "wind the clockwork that turned the great lenses. Ships depended on the steady rhythm of each "
    "light to know exactly where they were along a dangerous coast, and every station had its own "
    "signature of flashes so that a captain could tell one headland from the next. The keepers "
    "kept careful logs of the wind, the fog and every vessel that passed, and those notebooks are "
    "now a treasure for historians who study climate and trade. In the nineteenth century the "
    "Fresnel lens changed everything: rings of glass prisms bent the light of a single flame into "
    "a beam visible for more than twenty miles. Building the towers themselves was a feat, since "
    "many stood on bare rocks far from shore, where masons could work only at low tide and in calm "
    "weather, sometimes for a few hours a week. Today most lights are automatic, yet the old towers "
    "still stand as monuments to the people who kept them burning through the longest nights."
)


def emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def llama_module(lib: str):
    """The Llama class for this side; binds the library (exactly one per process)."""
    if lib == "patched":
        import frankenllama

        return frankenllama.Llama, str(frankenllama.native_library_path())
    if "frankenllama" in sys.modules:
        raise RuntimeError("the stock worker must not import frankenllama")
    import llama_cpp

    return llama_cpp.Llama, str(getattr(llama_cpp.llama_cpp._lib, "_name", "?"))


def prompt_tokens(llm, n: int) -> list[int]:
    text = PROMPT_TEXT
    tokens = llm.tokenize(text.encode(), add_bos=True)
    while len(tokens) < n:
        text += " " + PROMPT_TEXT
        tokens = llm.tokenize(text.encode(), add_bos=True)
    return tokens[:n]


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def model_kwargs(args) -> dict:
    return dict(n_ctx=args.n_ctx, n_batch=args.n_ctx, n_ubatch=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, use_mmap=False, n_gpu_layers=0, seed=0)


# ----------------------------------------------------------------------------------------- jobs


def job_info(args) -> dict:
    """Model facts from the GGUF tables; materialize the requested orders (untimed)."""
    import frankenllama  # noqa: F401  (binds the patched library before gguf_tools imports it)
    import gguf
    from frankenllama.gguf_tools import materialize, tensor_bytes_per_layer

    reader = gguf.GGUFReader(args.model, "r")
    arch = str(reader.get_field("general.architecture").contents())

    def field(name, default=None):
        f = reader.get_field(f"{arch}.{name}")
        return f.contents() if f is not None else default

    n_layer = int(field("block_count"))
    n_head = int(field("attention.head_count"))
    n_embd = int(field("embedding_length"))
    n_head_kv = field("attention.head_count_kv", n_head)
    n_head_kv = int(n_head_kv if not isinstance(n_head_kv, list) else n_head_kv[0])
    k_len = int(field("attention.key_length", n_embd // n_head))
    v_len = int(field("attention.value_length", n_embd // n_head))
    per_layer = tensor_bytes_per_layer(args.model)
    all_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    made = {}
    for item in args.materialize or []:
        spec, out = item.split("=", 1)
        order = materialize(args.model, spec, out, progress=False)
        made[spec] = {"path": out, "n_positions": len(order), "bytes": os.path.getsize(out)}
    return {
        "arch": arch, "n_layer": n_layer, "file_bytes": os.path.getsize(args.model),
        "tensor_bytes": all_bytes, "block_bytes": {str(k): v for k, v in sorted(per_layer.items())},
        "non_block_bytes": all_bytes - sum(per_layer.values()),
        "kv_width_k": n_head_kv * k_len, "kv_width_v": n_head_kv * v_len, "materialized": made,
    }


def job_bench(args) -> dict:
    """Prompt processing (one batch) and greedy generation; logits of every step saved."""
    Llama, lib_path = llama_module(args.lib)
    kwargs = model_kwargs(args)
    if args.order:
        kwargs["layer_order"] = args.order
    t0 = time.perf_counter()
    llm = Llama(args.model, verbose=True, **kwargs)
    load_s = time.perf_counter() - t0
    import llama_cpp

    n_layer_run = int(llama_cpp.llama_model_n_layer(llm._model.model))  # execution positions
    prompt = prompt_tokens(llm, args.n_prompt)
    n_vocab = llm.n_vocab()

    def one_pass(n_gen: int, logits: np.ndarray | None):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t_pp = time.perf_counter() - t0
        row = last_logits(llm)
        if logits is not None:
            logits[0] = row
        tok = int(np.argmax(row))
        generated = [tok]
        t0 = time.perf_counter()
        for i in range(n_gen):
            llm.eval([tok])
            row = last_logits(llm)
            if logits is not None:
                logits[i + 1] = row
            tok = int(np.argmax(row))
            generated.append(tok)
        t_tg = time.perf_counter() - t0
        return t_pp, t_tg, generated

    one_pass(min(8, args.n_gen), None)  # warm-up: caches, thread pool, first-use allocations
    pp_s, tg_s, first, deterministic = [], [], None, True
    for _ in range(args.inner):
        logits = np.empty((args.n_gen + 1, n_vocab), dtype=np.float32)
        t_pp, t_tg, generated = one_pass(args.n_gen, logits)
        pp_s.append(t_pp)
        tg_s.append(t_tg)
        if first is None:
            first = (logits, generated)
            np.save(args.logits, logits)
        else:
            deterministic &= bool(np.array_equal(first[0], logits))
    llm.close()
    t_pp, t_tg = float(np.median(pp_s)), float(np.median(tg_s))
    return {
        "lib": args.lib, "lib_path": lib_path, "order": args.order, "load_s": load_s,
        "n_layer_run": n_layer_run, "n_prompt": len(prompt), "n_gen": args.n_gen, "inner": args.inner,
        "pp_s": t_pp, "tg_s": t_tg, "pp_tok_s": len(prompt) / t_pp, "tg_tok_s": args.n_gen / t_tg,
        "pp_s_passes": pp_s, "tg_s_passes": tg_s, "deterministic": deterministic,
        "generated": first[1], "logits": args.logits,
    }


def _prompt_logits(llm, n_prompt: int, out: str) -> None:
    llm.reset()
    llm.eval(prompt_tokens(llm, n_prompt))
    np.save(out, last_logits(llm)[None, :])


def job_reorder(args) -> dict:
    """Time ``set_layer_order`` on a model loaded without an order (new context included)."""
    Llama, lib_path = llama_module("patched")
    llm = Llama(args.model, verbose=False, **model_kwargs(args))
    llm.eval(prompt_tokens(llm, 8))  # the model has run once, as in an interactive session
    t0 = time.perf_counter()
    llm.set_layer_order(args.order)
    set_s = time.perf_counter() - t0
    applied = len(llm.layer_order)
    # the share of set_layer_order that is building the new context (which a fresh load pays too)
    import llama_cpp._internals as internals

    t0 = time.perf_counter()
    extra = internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
    context_s = time.perf_counter() - t0
    extra.close()
    _prompt_logits(llm, args.n_prompt, args.logits)
    llm.close()
    return {"lib_path": lib_path, "order": args.order, "set_s": set_s, "context_s": context_s, "n_positions": applied,
            "logits": args.logits}


def job_fresh(args) -> dict:
    """Time a fresh use_mmap=False load with the order (what set_layer_order avoids)."""
    Llama, lib_path = llama_module("patched")
    t0 = time.perf_counter()
    llm = Llama(args.model, layer_order=args.order, verbose=False, **model_kwargs(args))
    load_s = time.perf_counter() - t0
    applied = len(llm.layer_order)
    _prompt_logits(llm, args.n_prompt, args.logits)
    llm.close()
    return {"lib_path": lib_path, "order": args.order, "load_s": load_s, "n_positions": applied,
            "logits": args.logits}


def job_materialize(args) -> dict:
    """Materialize in a child process (its peak RSS from RUSAGE_CHILDREN), then copy the same bytes.

    This process starts exactly one child, so RUSAGE_CHILDREN's ru_maxrss is that child's peak.
    With ``--baseline`` the child only imports what materialize needs (RSS after import) and opens
    the source with gguf-py's reader (time and peak RSS of that first step of materialize).
    """
    dst = Path(args.dst)
    out = dst / "materialized.gguf"
    cmd = [sys.executable, str(Path(__file__).resolve()), "materialize-child", "--model", args.model,
           "--order", args.order, "--out", str(out)]
    if args.baseline:
        cmd.append("--baseline")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"materialize child failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_rss = maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    result = {"baseline": args.baseline, "peak_rss_bytes": peak_rss, **child}
    if not args.baseline:
        copy = dst / "copy.gguf"
        t0 = time.perf_counter()
        shutil.copyfile(out, copy)
        result["copy_s"] = time.perf_counter() - t0
        result["copy_bytes"] = copy.stat().st_size
        copy.unlink()
        out.unlink()
    return result


def job_materialize_child(args) -> dict:
    import frankenllama  # noqa: F401
    from frankenllama.gguf_tools import materialize

    if args.baseline:
        # the floor: the imports materialize needs, then the cost of parsing the source's header
        # with gguf-py's reader (which materialize does first): its time and its share of the peak RSS
        import gguf

        import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        t0 = time.perf_counter()
        reader = gguf.GGUFReader(args.model, "r")
        reader_s = time.perf_counter() - t0
        return {"materialize_s": None, "bytes": None, "import_rss_bytes": import_rss, "reader_open_s": reader_s,
                "n_fields": len(reader.fields)}
    t0 = time.perf_counter()
    materialize(args.model, args.order, args.out, progress=False)
    seconds = time.perf_counter() - t0
    return {"materialize_s": seconds, "bytes": os.path.getsize(args.out)}


JOBS = {"info": job_info, "bench": job_bench, "reorder": job_reorder, "fresh": job_fresh,
        "materialize": job_materialize, "materialize-child": job_materialize_child}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--lib", choices=["patched", "stock"], default="patched")
    parser.add_argument("--model", required=True)
    parser.add_argument("--order", default=None)
    parser.add_argument("--logits", default=None, help="where to save the logits (.npy)")
    parser.add_argument("--materialize", action="append", help="info: SPEC=OUT_PATH to write (repeatable)")
    parser.add_argument("--dst", default=None, help="materialize: folder for the output and its copy")
    parser.add_argument("--out", default=None, help="materialize-child: output file")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--n-prompt", type=int, default=128)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--inner", type=int, default=3, help="bench: timed passes in the process (median)")
    args = parser.parse_args()
    emit(JOBS[args.job](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
