"""What a scan scores: a text (perplexity, KL) and probe items, tokenized and packed into decodes.

The text is cut into chunks of at most ``n_ctx`` tokens that overlap by one token, so that every
token after the first is predicted exactly once.  Probe items are ``{"prompt", "answer"}`` (scored
by the answer's log-probability) or ``{"prompt", "choices", "label"}`` (right when the label's
choice has the highest log-probability); each (prompt, answer) pair is one sequence.  Sequences
are packed, first fit, into *bins* of at most ``n_ctx`` tokens; one bin is one ``llama_decode``
(several sequences share it through their sequence ids).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import ScanError

#: fewest predicted tokens a text (or each split of it) must give
MIN_TEXT_TOKENS = 32
#: most sequences one decode holds (llama.cpp's LLAMA_MAX_SEQ)
MAX_SEQS_PER_DECODE = 256

Tokenize = Callable[[str, bool], list[int]]  # (text, add_bos) -> tokens


def default_text() -> str:
    """The text the package ships for scans (original prose, free to redistribute)."""
    return resources.files(__package__).joinpath("resources/scan_text.txt").read_text(encoding="utf-8")


def example_probes_path() -> Path:
    """Path of the small example probe file the package ships."""
    return Path(str(resources.files(__package__).joinpath("resources/probes_example.jsonl")))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text(path: str | Path | None) -> str:
    """The text of ``path`` (UTF-8), or the default text for None."""
    if path is None:
        return default_text()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScanError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ScanError(f"text file {path} is not UTF-8: {err}") from None
    if not text.strip():
        raise ScanError(f"text file {path} is empty: a scan needs text to compute perplexity on")
    return text


@dataclass(frozen=True)
class ProbeItem:
    """One probe: the answer's log-probability is scored, or which of ``choices`` scores best."""

    line: int                           # 1-based line in the probe file
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None

    @property
    def continuations(self) -> tuple[str, ...]:
        return (self.answer,) if self.answer is not None else tuple(self.choices or ())


def read_probes(path: str | Path) -> tuple[list[ProbeItem], str]:
    """Parse a JSONL probe file; returns the items and the file's SHA-256.

    Raises ScanError naming the line for malformed JSON, missing or mistyped fields, a label out
    of range, or a file without items.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScanError(f"probe file not found: {path}")
    raw = path.read_bytes()
    items: list[ProbeItem] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScanError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ScanError(f"{where}: a probe is a JSON object with prompt and answer, or prompt, choices "
                            "and label")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ScanError(f"{where}: missing or empty \"prompt\" (a string)")
        if "answer" in obj:
            if "choices" in obj or "label" in obj:
                raise ScanError(f"{where}: give either \"answer\" or \"choices\" and \"label\", not both")
            if not isinstance(obj["answer"], str) or not obj["answer"]:
                raise ScanError(f"{where}: \"answer\" must be a non-empty string")
            items.append(ProbeItem(number, prompt, answer=obj["answer"]))
        elif "choices" in obj:
            choices, label = obj["choices"], obj.get("label")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c for c in choices)):
                raise ScanError(f"{where}: \"choices\" must be a list of two or more non-empty strings")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise ScanError(f"{where}: \"label\" must be the index (0..{len(choices) - 1}) of the right "
                                "choice")
            items.append(ProbeItem(number, prompt, choices=tuple(choices), label=label))
        else:
            raise ScanError(f"{where}: missing \"answer\" (or \"choices\" and \"label\")")
    if not items:
        raise ScanError(f"probe file {path} has no items")
    return items, hashlib.sha256(raw).hexdigest()


@dataclass
class Seq:
    """One sequence of a decode and the tokens it is scored on."""

    tokens: list[int]
    out_pos: list[int]        # positions whose logits are read; output k predicts targets[k]
    targets: list[int]
    kind: str                 # "text" or "probe"
    item: int                 # text: index of the first target in the text; probe: item index
    choice: int = 0           # probe: which continuation
    index: int = 0            # probe: number of the sequence among all probe sequences (item, choice order)


@dataclass
class Bin:
    """Sequences decoded together in one ``llama_decode`` (each from position 0, own seq id)."""

    seqs: list[Seq] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tokens, positions, sequence ids, output flags (int8) of the batch."""
        tokens = np.concatenate([np.asarray(s.tokens, np.int32) for s in self.seqs])
        pos = np.concatenate([np.arange(len(s.tokens), dtype=np.int32) for s in self.seqs])
        seq = np.concatenate([np.full(len(s.tokens), k, np.int32) for k, s in enumerate(self.seqs)])
        flags = []
        for s in self.seqs:
            f = np.zeros(len(s.tokens), np.int8)
            f[s.out_pos] = 1
            flags.append(f)
        return tokens, pos, seq, np.concatenate(flags)


@dataclass
class Dataset:
    """A split's text and probes, packed into bins."""

    name: str
    bins: list[Bin]
    n_text_targets: int
    probes: list[ProbeItem]

    @property
    def n_seqs_max(self) -> int:
        return max(len(b.seqs) for b in self.bins)


def text_chunks(tokens: Sequence[int], n_ctx: int) -> list[Seq]:
    """Chunks of at most ``n_ctx`` tokens overlapping by one: every token after the first is a
    target exactly once."""
    seqs: list[Seq] = []
    start = 0
    while start < len(tokens) - 1:
        chunk = list(tokens[start:start + n_ctx])
        seqs.append(Seq(chunk, list(range(len(chunk) - 1)), chunk[1:], "text", start))
        start += n_ctx - 1
    return seqs


def probe_seqs(items: Sequence[ProbeItem], tokenize: Tokenize, n_ctx: int) -> list[Seq]:
    """One sequence per (item, continuation): prompt (with BOS) + continuation tokens."""
    seqs: list[Seq] = []
    for index, item in enumerate(items):
        prompt = tokenize(item.prompt, True)
        for choice, text in enumerate(item.continuations):
            cont = tokenize(text, False)
            if not cont:
                raise ScanError(f"probe line {item.line}: {'answer' if item.answer is not None else 'choice'} "
                                f"{text!r} tokenizes to nothing")
            tokens = prompt + cont
            if len(tokens) > n_ctx:
                raise ScanError(f"probe line {item.line}: {len(tokens)} tokens, more than the context "
                                f"({n_ctx}); shorten it or raise n_ctx")
            start = len(prompt) - 1
            seqs.append(Seq(tokens, list(range(start, len(tokens) - 1)), cont, "probe", index, choice, len(seqs)))
    return seqs


def pack(seqs: Sequence[Seq], n_ctx: int) -> list[Bin]:
    """First-fit packing of sequences into bins of at most ``n_ctx`` tokens (order kept within a bin)."""
    bins: list[Bin] = []
    for seq in seqs:
        for b in bins:
            if b.n_tokens + len(seq.tokens) <= n_ctx and len(b.seqs) < MAX_SEQS_PER_DECODE:
                b.seqs.append(seq)
                break
        else:
            bins.append(Bin([seq]))
    return bins


def build_dataset(name: str, text_tokens: Sequence[int], probes: Sequence[ProbeItem], tokenize: Tokenize,
                  n_ctx: int) -> Dataset:
    """Pack a split's text tokens and probe items into decodes of at most ``n_ctx`` tokens."""
    if len(text_tokens) - 1 < MIN_TEXT_TOKENS:
        raise ScanError(f"the {name} text has {max(0, len(text_tokens) - 1)} predicted tokens; a scan needs at "
                        f"least {MIN_TEXT_TOKENS} (give a longer --text)")
    text = text_chunks(text_tokens, n_ctx)
    seqs = text + probe_seqs(probes, tokenize, n_ctx)
    return Dataset(name, pack(seqs, n_ctx), len(text_tokens) - 1, list(probes))


def split_text(tokens: Sequence[int], bos: int | None) -> tuple[list[int], list[int]]:
    """Search and held-out halves of a token stream; the held-out half starts with ``bos`` too."""
    half = len(tokens) // 2
    head = list(tokens[:half])
    tail = list(tokens[half:])
    if bos is not None and tokens and tokens[0] == bos:
        tail = [bos] + tail
    return head, tail
