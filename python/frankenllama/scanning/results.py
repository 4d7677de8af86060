"""The results file: JSON lines, a header row first, one row per scored order, appended as they come.

Every row is written with one ``write`` and then flushed and fsync'ed, so an interrupted scan keeps
every finished row; a line cut short by a crash is dropped when the scan resumes.  A new file gets
its header through a temporary file renamed into place.  Resuming checks that the header describes
the same model, text, probes and sweep, and refuses otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ScanError
from .stats import gain, pareto_front

FORMAT = "frankenllama-scan/1"
#: header fields that must match for a scan to resume into a file
IDENTITY_KEYS = ("model", "text", "probes", "sweep", "settings")
_HASH_SPAN = 4 << 20


def model_identity(path: str | Path) -> dict[str, Any]:
    """Path, size and a hash of the first and last 4 MiB of a model file (mtime changes on copy)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > _HASH_SPAN:
            f.seek(max(_HASH_SPAN, size - _HASH_SPAN))
            h.update(f.read(_HASH_SPAN))
    return {"path": str(path.resolve()), "size": size, "sha256_head_tail": h.hexdigest()}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a hidden temporary file beside ``path`` (created like any new file,
    under the umask), then rename it into place; nothing half-written is ever at ``path``."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        with open(tmp, "xb"):
            pass
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=False, separators=(", ", ": "), allow_nan=True)


def read_results(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and result rows of a results file (a trailing line cut short is ignored).

    Raises ScanError if the file is missing or is not a scan results file."""
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"results file not found: {path}")
    header, rows, _ = _parse(path)
    return header, rows


def _parse(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Header, rows, and the byte length of the complete lines."""
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    lines = data[:good].decode("utf-8", errors="replace").splitlines()
    if not lines:
        raise ScanError(f"{path} is not a frankenllama scan results file (it is empty); delete it or "
                        "choose another output")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ScanError(f"{path} is not a frankenllama scan results file (no {FORMAT} header); delete it or "
                        "choose another output")
    rows = []
    for number, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ScanError(f"{path}:{number}: not a JSON row; the results file is damaged") from None
        rows.append(row)
    return header, rows, good


def _describe_mismatch(key: str, old: Any, new: Any) -> str:
    if key == "model":
        return (f"another model ({old.get('path')}, {old.get('size')} bytes) than this scan's "
                f"({new.get('path')}, {new.get('size')} bytes)")
    if key == "text":
        return f"another text (sha256 {str(old.get('sha256'))[:12]}..., this text {str(new.get('sha256'))[:12]}...)"
    if key == "probes":
        return f"other probes ({old}; now {new})"
    return f"other {key} ({json.dumps(old)}; now {json.dumps(new)})"


def check_compatible(path: str | Path, header: dict[str, Any]) -> None:
    """Raise ScanError if ``path`` exists and is not a results file of this scan (reads only)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ScanError(f"{path} is not a regular file")
    old, _, _ = _parse(path)
    for key in IDENTITY_KEYS:
        if old.get(key) != header.get(key):
            raise ScanError(f"{path} holds results for {_describe_mismatch(key, old.get(key), header.get(key))}; "
                            "refusing to resume into it: choose another --out or delete the file")


class ResultsFile:
    """An open results file: the rows already in it, and :meth:`append` for new ones."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        header = {"kind": "header", "format": FORMAT, **header}
        if self.path.exists():
            check_compatible(self.path, header)
            old, rows, good = _parse(self.path)
            if good != self.path.stat().st_size:  # a line cut short by a crash
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            self.header = old
            self.rows = rows
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(_dumps(header) + "\n", encoding="utf-8"))
            self.header = header
            self.rows = []
        self.index = {(r.get("split"), r.get("order")): r for r in self.rows}

    def get(self, split: str, spec: str) -> dict[str, Any] | None:
        return self.index.get((split, spec))

    def append(self, row: dict[str, Any]) -> None:
        """Write one row (one write, flushed and fsync'ed)."""
        line = (_dumps(row) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.index[(row.get("split"), row.get("order"))] = row


def ranked(rows: Sequence[dict[str, Any]], rank: str, split: str = "search") -> list[dict[str, Any]]:
    """The rows of ``split``, best gain first (ties: fewer positions first, then the spec)."""
    chosen = [r for r in rows if r.get("kind") == "result" and r.get("split") == split]
    return sorted(chosen, key=lambda r: (-gain(r, rank), r["positions"], r["order"]))


def front(rows: Sequence[dict[str, Any]], rank: str) -> list[dict[str, Any]]:
    """The Pareto front of extra positions (cost) vs gain among ``rows``."""
    points = [(float(r["extra_positions"]), gain(r, rank)) for r in rows]
    return [rows[k] for k in pareto_front(points)]
