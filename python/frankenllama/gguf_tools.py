"""GGUF layer tools: stack fine-tunes into one file, write a layer order into a standalone model.

``stack`` puts every block of several models of one architecture into one file, so that a layer
order can pick each position from any of them.  ``materialize`` copies the blocks of a model,
byte for byte in their own quantization type, into the order given, so that any llama.cpp
(unpatched included) runs the same network that ``frankenllama.Llama(model, layer_order=order)``
runs in situ.

Both run at the speed of a file copy, in memory that does not grow with the model:

- The source's GGUF header is indexed, not decoded: each key-value pair is kept as the bytes it is
  stored as and decoded only when a tool needs its value (the tokenizer never is), and each tensor
  is known by its offset and size.
- Unchanged metadata is written as stored, new values are packed as gguf-py's ``GGUFWriter`` packs
  them, and the layout (GGUF v3, the file's alignment, zero padding) is the one ``GGUFWriter``
  writes, so the output is byte for byte what gguf-py would write from the same content.
- Tensor bytes go from the source file descriptor to the output's: in the kernel
  (``os.copy_file_range``, else ``os.sendfile``) where the source and output offsets agree within a
  page, through one 1 MiB buffer otherwise; neither memory maps nor arrays ever hold them.

Output goes to a hidden temporary file beside the target, ``.<name>.<pid>.<random>.part``, renamed
only once complete, so an interrupted run never leaves a partial model under the final name and the
inputs are never touched.  SIGTERM, SIGHUP and SIGINT remove the temporary file before the process
ends; after a SIGKILL, the next run for the same output removes it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import re
import secrets
import signal
import stat
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gguf
from tqdm import tqdm

from .order import LayerOrderError, format_spec, parse_spec, validate_order
from .recipes import ProgramRecipe, resolve_program

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")

# architectures whose sliding-window layers follow a period unless the file lists them:
# arch -> (default period, dense_first), as in llama.cpp's load_swa_pattern() calls
SWA_PERIODS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "cohere2": (4, False),
    "exaone4": (4, False), "olmo2": (4, False), "openai-moe": (2, False), "plamo3": (8, False),
    "mellum": (4, False), "muse-glimmer": (4, False), "modern-bert": (3, True),
}

#: metadata key recording the order a materialized file was built from
SOURCE_ORDER_KEY = "frankenllama.source_layer_order"
#: metadata key: per block of a stacked file, "<source file>:<layer>"
BLOCK_SOURCES_KEY = "frankenllama.block_sources"

_VT = gguf.GGUFValueType
_ARCH_KEY = gguf.Keys.General.ARCHITECTURE
_ALIGNMENT_KEY = "general.alignment"
#: struct formats of the scalar GGUF value types (as gguf-py's GGUFWriter packs them)
_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d", _VT.BOOL: "?",
}
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _pad(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment (gguf-py's GGUFWriter.ggml_pad)."""
    return (n + alignment - 1) // alignment * alignment


# ------------------------------------------------------------------------------ reading a header

class _Cursor:
    """Reads GGUF values from a buffer (bytes, or a memory map of the file) in one byte order."""

    def __init__(self, buf: Any, byte_order: str, pos: int = 0) -> None:
        self.buf, self.order, self.pos = buf, byte_order, pos

    def advance(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError("a value runs past the end of the file")
        self.pos += n

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def raw_string(self) -> bytes:
        n = self.scalar("Q")
        start = self.pos
        self.advance(n)
        return bytes(self.buf[start:self.pos])

    def value(self, vtype: gguf.GGUFValueType) -> Any:
        """Decode one value, as gguf-py's ``ReaderField.contents()`` returns it."""
        if vtype == _VT.STRING:
            return self.raw_string().decode("utf-8")
        if vtype == _VT.ARRAY:
            item_type, count = _VT(self.scalar("I")), self.scalar("Q")
            fmt = _SCALAR_FORMATS.get(item_type)
            if fmt is None:
                return [self.value(item_type) for _ in range(count)]
            start = self.pos
            self.advance(count * struct.calcsize(fmt))
            return list(struct.unpack_from(f"{self.order}{count}{fmt}", self.buf, start))
        return self.scalar(_SCALAR_FORMATS[vtype])

    def skip(self, vtype: gguf.GGUFValueType) -> tuple[gguf.GGUFValueType | None, int]:
        """Move past one value without decoding it; return (item type, length) of an array, else (None, 1)."""
        if vtype == _VT.STRING:
            self.advance(self.scalar("Q"))
        elif vtype != _VT.ARRAY:
            self.advance(struct.calcsize(_SCALAR_FORMATS[vtype]))
        else:
            item_type, count = _VT(self.scalar("I")), self.scalar("Q")
            if item_type in _SCALAR_FORMATS:
                self.advance(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
            elif item_type == _VT.STRING:
                self.skip_strings(count)
            else:  # llama.cpp refuses them too (gguf.cpp: "invalid GGUF type")
                raise ValueError("an array of arrays: llama.cpp's GGUF reader does not support nested arrays")
            return item_type, count
        return None, 1

    def skip_strings(self, count: int) -> None:
        """Move past ``count`` strings (a u64 length, then the bytes): a tokenizer's vocabulary.

        This loop is most of the time it takes to read a header, so in the machine's byte order it
        reads the lengths through eight views of the buffer as u64 arrays, one per byte offset
        modulo 8 (about six times faster than ``struct``).
        """
        if self.order != _NATIVE_ORDER:
            for _ in itertools.repeat(None, count):
                self.advance(self.scalar("Q"))
            return
        pos, size = self.pos, len(self.buf)
        with memoryview(self.buf) as whole:
            views = [whole[k:k + (size - k) // 8 * 8].cast("Q") for k in range(8)]
            try:
                for _ in itertools.repeat(None, count):
                    pos += views[pos & 7][pos >> 3] + 8
            except IndexError:
                raise ValueError("a string array runs past the end of the file") from None
            finally:
                for view in views:
                    view.release()
        if pos > size:
            raise ValueError("a string array runs past the end of the file")
        self.pos = pos


@dataclass(frozen=True)
class Field:
    """A metadata key-value pair, kept as the bytes it is stored as; the value is decoded on demand."""

    key: str
    type: gguf.GGUFValueType
    item_type: gguf.GGUFValueType | None  #: the type of an array's items
    count: int  #: the length of an array (1 for other values)
    raw: bytes  #: the whole entry as stored: key, type, value
    value_at: int  #: where the value starts in ``raw``
    byte_order: str  #: "<" or ">"

    def contents(self) -> Any:
        """The value: int, float, bool, str or list (as gguf-py's ``ReaderField.contents()``)."""
        return _Cursor(self.raw, self.byte_order, self.value_at).value(self.type)

    @property
    def value_bytes(self) -> bytes:
        return self.raw[self.value_at:]


@dataclass(frozen=True)
class Tensor:
    """A tensor of a GGUF file: its name, type, shape and where its bytes are."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  #: dimensions in ggml order (ne[0] first), as stored
    data_offset: int  #: absolute offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class _Header:
    byte_order: str
    alignment: int
    fields: dict[str, Field]
    tensors: list[Tensor]
    identity: tuple[int, ...]  #: (device, inode, size, mtime, ctime) of the file that was read


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_fields(cur: _Cursor, n_kv: int) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.raw_string().decode("utf-8")
        vtype = _VT(cur.scalar("I"))
        value_at = cur.pos - start
        item_type, count = cur.skip(vtype)
        if key in fields:
            raise ValueError(f"duplicate key {key}")
        fields[key] = Field(key, vtype, item_type, count, bytes(cur.buf[start:cur.pos]), value_at, cur.order)
    return fields


def _alignment(fields: dict[str, Field]) -> int:
    field = fields.get(_ALIGNMENT_KEY)
    if field is None:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    alignment = field.contents()
    if field.type != _VT.UINT32 or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"bad {_ALIGNMENT_KEY}: {alignment!r} (must be a uint32 power of two)")
    return alignment


def _read_tensors(cur: _Cursor, n_tensors: int, alignment: int, size: int) -> list[Tensor]:
    infos = []
    for _ in range(n_tensors):
        name = cur.raw_string().decode("utf-8")
        n_dims = cur.scalar("I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(cur.scalar("Q") for _ in range(n_dims))
        infos.append((name, gguf.GGMLQuantizationType(cur.scalar("I")), shape, cur.scalar("Q")))
    data_start = _pad(cur.pos, alignment)
    tensors, names = [], set()
    for name, tensor_type, shape, offset in infos:
        if name in names:
            raise ValueError(f"duplicate tensor {name}")
        names.add(name)
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        tensor = Tensor(name, tensor_type, shape, data_start + offset, n_elements * type_size // block_size)
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        tensors.append(tensor)
    return tensors


def _read_header(path: Path) -> _Header:
    """Index the GGUF header of ``path`` (versions 2 and 3, either byte order)."""
    with open(path, "rb") as file:
        st = os.fstat(file.fileno())
        if st.st_size < 24:
            raise ValueError("file too short for a GGUF header")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic number")
            order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
            cur = _Cursor(buf, order, 4)
            version = cur.scalar("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
            fields = _read_fields(cur, n_kv)
            alignment = _alignment(fields)
            tensors = _read_tensors(cur, n_tensors, alignment, len(buf))
    return _Header(order, alignment, fields, tensors, _identity(st))


class ModelFile:
    """A GGUF model opened for copying: metadata, blocks and the other tensors.

    Only the header is read (and closed again); tensor data stays in the file until it is copied.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        try:
            header = _read_header(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, struct.error) as err:
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        self.byte_order = header.byte_order
        self.alignment = header.alignment
        self.fields = header.fields
        self.tensors = header.tensors
        self.identity = header.identity
        arch = self.field(_ARCH_KEY)
        if not isinstance(arch, str):
            raise ValueError(f"{self.path} has no general.architecture: not a llama.cpp model")
        self.arch = arch
        n_layer = self.field(f"{arch}.block_count")
        if not isinstance(n_layer, int):
            raise ValueError(f"{self.path} has no {arch}.block_count")
        nextn = self.field(f"{arch}.nextn_predict_layers")
        if nextn is not None and (isinstance(nextn, (str, list, bool)) or not isinstance(nextn, int)):
            raise ValueError(f"{self.path}: {arch}.nextn_predict_layers is not an integer")
        if (nextn or 0) > 0:
            raise ValueError(f"{self.path}: models with nextn/MTP layers are not supported by the GGUF tools yet")
        self.n_layer = n_layer
        self.blocks: dict[int, list[Tensor]] = {}
        self.others: list[Tensor] = []
        for tensor in self.tensors:
            match = _BLOCK_TENSOR.match(tensor.name)
            if match:
                self.blocks.setdefault(int(match.group(1)), []).append(tensor)
            else:
                self.others.append(tensor)

    def field(self, key: str) -> Any:
        """The decoded value of ``key``, or None."""
        field = self.fields.get(key)
        return None if field is None else field.contents()

    def stored_order(self) -> list[int] | None:
        """The layer order the file stores (``<arch>.layer_order``: int array or spec), or None."""
        value = self.field(f"{self.arch}.layer_order")
        if value is None:
            return None
        if isinstance(value, str):
            return parse_spec(value, self.n_layer)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{self.path}: {self.arch}.layer_order is neither a spec string nor an integer array")
        return validate_order(value, self.n_layer)

    def stored(self, key: str) -> tuple[gguf.GGUFValueType, bytes] | None:
        """The type and stored bytes of the value of ``key`` (compared without decoding), or None."""
        field = self.fields.get(key)
        return None if field is None else (field.type, field.value_bytes)

    def metadata(self) -> Iterator[Field]:
        """Every key-value pair a writer should copy (all but general.architecture, which it writes first)."""
        return (field for field in self.fields.values() if field.key != _ARCH_KEY)

    def is_per_layer(self, field: Field) -> bool:
        """Is ``field`` an array with one item per block (to be remapped with the blocks)?"""
        return field.item_type is not None and field.count == self.n_layer \
            and (field.key.startswith(f"{self.arch}.") or field.key == BLOCK_SOURCES_KEY)

    def swa_flags(self) -> list[bool] | None:
        """Per block: is it a sliding-window layer? None if the architecture has no SWA pattern."""
        key = f"{self.arch}.attention.sliding_window_pattern"
        field = self.fields.get(key)
        if field is not None and field.type == _VT.ARRAY:
            flags = [bool(v) for v in field.contents()]
            if len(flags) != self.n_layer:
                raise ValueError(f"{self.path}: {key} has {len(flags)} entries for {self.n_layer} blocks")
            return flags
        if self.arch not in SWA_PERIODS or not self.field(f"{self.arch}.attention.sliding_window"):
            return None
        period, dense_first = SWA_PERIODS[self.arch]
        if field is not None:
            period = int(field.contents())
        if dense_first:
            return [period == 0 or il % period != 0 for il in range(self.n_layer)]
        return [period == 0 or il % period < period - 1 for il in range(self.n_layer)]

    def block_plan(self, layer: int, position: int) -> Plan:
        """The tensors of block ``layer``, renamed for block ``position`` of the output."""
        return [(self, t, f"blk.{position}.{_BLOCK_TENSOR.match(t.name).group(2)}") for t in self.blocks.get(layer, [])]


Plan = list[tuple[ModelFile, Tensor, str]]  # source file, tensor, name in the output


# ------------------------------------------------------------------------------ writing a file

class _Encoder:
    """Packs GGUF values in one byte order, exactly as gguf-py's GGUFWriter packs them."""

    def __init__(self, byte_order: str) -> None:
        self.order = byte_order

    def pack(self, fmt: str, *values: Any) -> bytes:
        return struct.pack(self.order + fmt, *values)

    def string(self, value: str) -> bytes:
        data = value.encode("utf-8")
        return self.pack("Q", len(data)) + data

    def value(self, vtype: gguf.GGUFValueType, value: Any, item_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == _VT.STRING:
            return self.string(value)
        if vtype != _VT.ARRAY:
            return self.pack(_SCALAR_FORMATS[vtype], value)
        head = self.pack("IQ", item_type, len(value))
        if item_type == _VT.STRING:
            return head + b"".join(self.string(item) for item in value)
        if item_type not in _SCALAR_FORMATS:
            raise ValueError(f"cannot write an array of {item_type!r}")
        return head + self.pack(f"{len(value)}{_SCALAR_FORMATS[item_type]}", *value)

    def kv(self, key: str, vtype: gguf.GGUFValueType, value: Any, item_type: gguf.GGUFValueType | None = None) -> bytes:
        """A whole key-value entry."""
        return self.string(key) + self.pack("I", vtype) + self.value(vtype, value, item_type)

    def header(self, entries: Sequence[bytes], plan: Plan, alignment: int) -> list[bytes]:
        """Magic, version, counts, the key-value entries, then the tensor infos, as GGUFWriter lays them out.

        Returned in parts (the entries themselves, unjoined: a vocabulary can be megabytes).
        """
        infos, offset = [], 0
        for _, tensor, name in plan:
            infos += [self.string(name), self.pack(f"I{len(tensor.shape)}QIQ", len(tensor.shape), *tensor.shape,
                                                   tensor.tensor_type, offset)]
            offset += _pad(tensor.n_bytes, alignment)
        start = struct.pack("<I", gguf.GGUF_MAGIC) + self.pack("IQQ", gguf.GGUF_VERSION, len(plan), len(entries))
        return [start, *entries, b"".join(infos)]


_CHUNK = 64 << 20  # bytes per copy system call: a signal waits at most this long to be handled
_BUFFER = 1 << 20  # bytes per read of the buffered copy
#: the kernel copies a range only if its source offset and output position agree modulo this
_KERNEL_COPY_ALIGNMENT = mmap.PAGESIZE
# errors that mean "this way of copying does not work here" rather than an I/O failure
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF,
                errno.ENOTSOCK}


class _Output:
    """The output file descriptor: writes bytes and copies ranges of source files into it.

    A range whose source offset and output position are at the same place within a page is copied
    in the kernel: ``os.copy_file_range`` (whole pages; reflinks where the file system can), else
    ``os.sendfile``, else the buffered copy.  Any other range (most tensors: GGUF aligns them to 32
    bytes, so a renumbered tensor rarely keeps its place in a page) goes through one 1 MiB buffer
    (``os.pread``, ``os.write``): on page-straddling ranges the kernel's copy measured 1.3-1.5x
    slower than that (benchmarks/RESULTS.md, "GGUF tools").
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.ways: list[Callable[[int, int, int], int]] = []
        if hasattr(os, "copy_file_range"):
            self.ways.append(lambda src, offset, n: os.copy_file_range(src, self.fd, n, offset))
        if hasattr(os, "sendfile"):
            self.ways.append(lambda src, offset, n: os.sendfile(self.fd, src, offset, n))
        self.ways.append(self._buffered)

    def write(self, data: bytes) -> None:
        self._write_all(data)
        self.pos += len(data)

    def pad(self, n: int, alignment: int) -> None:
        """Zeros up to the next multiple of alignment after n (GGUFWriter.write_padding)."""
        self.write(bytes(_pad(n, alignment) - n))

    def copy(self, src_fd: int, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``src_fd`` from ``offset``."""
        end = offset + count
        copy_chunk = self._copy_chunk if (offset - self.pos) % _KERNEL_COPY_ALIGNMENT == 0 else self._buffered
        while offset < end:
            n = copy_chunk(src_fd, offset, min(end - offset, _CHUNK))
            if n == 0:
                raise ValueError("a source file ended before its tensor data did (was it truncated?)")
            offset += n
            self.pos += n

    def _copy_chunk(self, src_fd: int, offset: int, count: int) -> int:
        """Copy up to ``count`` bytes in one call of the first way that works here."""
        while True:
            try:
                return self.ways[0](src_fd, offset, count)
            except OSError as err:
                if err.errno not in _UNSUPPORTED or len(self.ways) == 1:
                    raise
                del self.ways[0]  # fall back to the next way, for the rest of this output

    def _buffered(self, src_fd: int, offset: int, count: int) -> int:
        """Copy up to ``min(count, _BUFFER)`` bytes through memory."""
        data = os.pread(src_fd, min(count, _BUFFER), offset)
        self._write_all(data)
        return len(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def _open_sources(plan: Plan, stack: contextlib.ExitStack) -> dict[int, int]:
    """A read-only descriptor per source file (by id of its ModelFile), checked to be the file that was indexed."""
    fds: dict[int, int] = {}
    for src, _, _ in plan:
        if id(src) in fds:
            continue
        fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd)
        if _identity(os.fstat(fd)) != src.identity:
            raise ValueError(f"{src.path} changed on disk while it was being read; run the command again")
        fds[id(src)] = fd
    return fds


def _write(out_path: Path, byte_order: str, alignment: int, entries: list[bytes], plan: Plan,
           progress: bool, desc: str) -> None:
    """Write the header and copy the tensors of ``plan`` to out_path, atomically."""
    header = _Encoder(byte_order).header(entries, plan, alignment)
    with contextlib.ExitStack() as stack:
        sources = _open_sources(plan, stack)
        fd, _ = stack.enter_context(_atomic_part(out_path))
        out = _Output(fd)
        for part in header:
            out.write(part)
        bar = stack.enter_context(tqdm(total=sum(t.n_bytes for _, t, _ in plan), unit="B", unit_scale=True,
                                       desc=desc, disable=not progress))
        for src, tensor, _ in plan:
            out.pad(out.pos, alignment)
            out.copy(sources[id(src)], tensor.data_offset, tensor.n_bytes)
            out.pad(tensor.n_bytes, alignment)
            bar.update(tensor.n_bytes)
        for src, fd in ((src, sources[id(src)]) for src in {id(s): s for s, _, _ in plan}.values()):
            if _identity(os.fstat(fd)) != src.identity:  # written to while it was copied: the output is mixed
                raise ValueError(f"{src.path} changed on disk while it was being copied; run the command again")


# ------------------------------------------------------------------------------ the output file

_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFSOCK: "a socket"}


def _check_target(path: Path) -> int | None:
    """Raise unless a new regular file may take the place of ``path``; nothing is written.

    Returns the permission bits of the regular file there now (through a symlink), or None.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"output path is a folder: {path}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "something else")
        link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise ValueError(f"the output path {path}{link} is {kind}, not a regular file; refusing to replace it: "
                         "give the path of a regular file (new, or one to overwrite)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {path.parent}")
    return None if st is None else stat.S_IMODE(st.st_mode) & 0o777


def _part_stem(path: Path) -> str:
    """``path``'s name as its temporary files show it: shortened (with a digest) when a name of
    up to 255 bytes, the file system's limit, would not leave room for the temporary file's suffix."""
    name = path.name
    if len(os.fsencode(name)) <= 200:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    while len(os.fsencode(name)) > 150:
        name = name[:-1]
    return f"{name}~{digest}"


def _part_pattern(path: Path) -> re.Pattern[str]:
    """The names of the temporary files of ``path``: ``.<stem>.<pid>.<8 hex digits>.part``."""
    return re.compile(re.escape(f".{_part_stem(path)}.") + r"([1-9][0-9]{0,9})\.[0-9a-f]{8}\.part")


def _create_part(path: Path) -> tuple[int, Path]:
    """Create the temporary file of ``path`` and lock it (held until it is renamed or removed)."""
    for _ in range(100):
        part = path.with_name(f".{_part_stem(path)}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, part
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process, or not a PID this machine uses
        return True
    return True


def _remove_if_unlocked(part: Path) -> bool:
    """Remove the regular file ``part`` if no process holds its lock; True if removed."""
    try:
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.lstat(part)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(part)
        return True
    except OSError:  # locked (BlockingIOError), or gone, or not ours to remove
        return False
    finally:
        os.close(fd)


def remove_stale_parts(path: str | Path) -> list[Path]:
    """Remove the temporary files that writers of ``path`` killed by SIGKILL (or a crash) left behind.

    Only regular files named exactly as this module names the temporary files of ``path`` are
    candidates, and one is removed only when its writer is gone: the process ID in its name is not
    running, and no process holds its lock (a live writer holds it, in any PID namespace).  Called
    at the start of every write.  Returns the files removed.
    """
    path = Path(path)
    pattern = _part_pattern(path)
    try:
        with os.scandir(path.parent) as entries:
            names = [e.name for e in entries if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:  # a folder we may write to but not list: nothing to clean up
        return []
    removed = []
    for name in names:
        part = path.parent / name
        if not _pid_running(int(pattern.fullmatch(name).group(1))) and _remove_if_unlocked(part):
            removed.append(part)
    return removed


class _FatalSignal(BaseException):
    """Raised by a signal that would have ended the process, so that cleanup code runs first."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


_FATAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


@contextlib.contextmanager
def _cleanup_before_signals() -> Iterator[None]:
    """Let the block clean up before SIGTERM, SIGHUP or SIGINT ends the process.

    Only signals whose action is the default one (end the process at once) are changed, and only
    in the main thread, where Python runs signal handlers: while the block runs they raise
    ``_FatalSignal``, so its ``finally`` clauses run; then the previous actions are restored and the
    signal is sent again, so the process ends as it would have.  Handlers an application installed
    (Python's KeyboardInterrupt for SIGINT among them) are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not caught:  # a second signal during the cleanup waits for it
            caught.append(signum)
            raise _FatalSignal(signum)

    previous = {s: signal.signal(s, on_signal) for s in _FATAL_SIGNALS if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    except _FatalSignal:
        pass
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
    if caught:
        os.kill(os.getpid(), caught[0])
        raise SystemExit(128 + caught[0])  # only if the signal is blocked in this thread


@contextlib.contextmanager
def _atomic_part(path: Path) -> Iterator[tuple[int, Path]]:
    """Yield (descriptor, path) of a new temporary file beside ``path``; rename it to ``path`` if the block succeeds.

    The file ends with the permission bits of the regular file it replaces, or those a new file
    gets (0666 minus the umask); while it is written it is private (0600).
    """
    mode = _check_target(path)
    remove_stale_parts(path)
    with _cleanup_before_signals():
        fd, part = _create_part(path)
        renamed = False
        try:
            if mode is None:
                mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what open(..., 0o666) made of the umask
            os.fchmod(fd, 0o600)
            yield fd, part
            os.fchmod(fd, mode)
            _check_target(path)  # again: something else may have appeared there meanwhile
            os.replace(part, path)
            renamed = True
        finally:
            try:
                if not renamed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(part)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    ``path`` must be new or a regular file (a device, FIFO or socket, or a link to one, is refused
    before anything is written); an overwritten file keeps its permission bits.  The temporary
    file is removed if the block raises, on SIGTERM, SIGHUP and SIGINT (in the main thread), and
    after a SIGKILL by the next write of ``path``.
    """
    with _atomic_part(Path(path)) as (_, part):
        yield part


def _check_output(out_path: Path, inputs: Sequence[Path]) -> None:
    """Raise before anything is read or written if ``out_path`` is an input or cannot be a regular file."""
    for path in inputs:
        if out_path.resolve() == path.resolve():
            raise ValueError(f"the output would overwrite the input {path}; choose another output path")
    _check_target(out_path)


# ------------------------------------------------------------------------------ the tools

def file_layer_order(model_path: str | Path) -> list[int]:
    """The order a model file runs by itself: the one it stores (``<arch>.layer_order``), else
    every weight layer once, in file order."""
    model = ModelFile(model_path)
    return model.stored_order() or list(range(model.n_layer))


def materialize(model_path: str | Path, layer_order: ProgramRecipe, out_path: str | Path, *, progress: bool = True) -> list[int]:
    """Write ``model_path`` with its blocks in ``layer_order`` to ``out_path`` as a standalone GGUF.

    Blocks are copied byte for byte and renumbered, ``block_count`` becomes the order's length,
    every per-layer metadata array is remapped, sliding-window layers are listed explicitly (they
    follow their weights, as in frankenllama; an order that runs none is written as a non-SWA
    model), and the order is recorded under ``frankenllama.source_layer_order``.  A stacked file
    is a valid input.  Returns the order written.

    Raises:
        ValueError: bad order, unreadable model, or an output path that is an input or not a regular
            file; FileNotFoundError/PermissionError/IsADirectoryError: bad output path.
    """
    out_path = Path(out_path)
    src = ModelFile(model_path)
    _check_output(out_path, [src.path])
    program = resolve_program(layer_order, src.n_layer)
    if not program.is_plain:
        raise LayerOrderError(f"the layer program {program} damps, branches or merges positions, which no GGUF "
                              "file can express; run it in place with Llama(layer_order=...), or materialize a plain order")
    order = list(program.order)
    arch = src.arch
    enc = _Encoder(src.byte_order)
    swa = src.swa_flags()
    runs_swa = swa is not None and any(swa[il] for il in order)
    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               SOURCE_ORDER_KEY}
    if not runs_swa:
        dropped.add(f"{arch}.attention.sliding_window")  # llama.cpp needs a file without SWA layers to be non-SWA

    entries = [enc.kv(_ARCH_KEY, _VT.STRING, arch)]
    for field in src.metadata():
        if field.key in dropped:
            continue
        if src.is_per_layer(field):
            values = field.contents()
            entries.append(enc.kv(field.key, _VT.ARRAY, [values[il] for il in order], field.item_type))
        else:
            entries.append(field.raw)
    entries.append(enc.kv(f"{arch}.block_count", _VT.UINT32, len(order)))
    if runs_swa:
        entries.append(enc.kv(f"{arch}.attention.sliding_window_pattern", _VT.ARRAY, [swa[il] for il in order],
                              _VT.BOOL))
    entries.append(enc.kv(SOURCE_ORDER_KEY, _VT.STRING, format_spec(order)))

    plan: Plan = [(src, t, t.name) for t in src.others]
    for pos, il in enumerate(order):
        plan += src.block_plan(il, pos)
    _write(out_path, src.byte_order, src.alignment, entries, plan, progress, f"materialize {out_path.name}")
    return order


def _compare(first: ModelFile, other: ModelFile) -> None:
    """Raise ValueError naming the first way ``other`` cannot be stacked with ``first``."""
    where = f"{other.path.name} vs {first.path.name}"
    if other.arch != first.arch:
        raise ValueError(f"cannot stack {where}: architecture {other.arch} vs {first.arch}")
    if other.n_layer != first.n_layer:
        raise ValueError(f"cannot stack {where}: {other.n_layer} vs {first.n_layer} blocks")
    if other.byte_order != first.byte_order:
        raise ValueError(f"cannot stack {where}: one file is big-endian, the other little-endian")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if first.stored(key) != other.stored(key):
            raise ValueError(f"cannot stack {where}: different vocabulary ({key})")
    for field in first.metadata():
        if not field.key.startswith(f"{first.arch}.") or field.key == f"{first.arch}.layer_order":
            continue
        value, theirs = field.contents(), other.field(field.key)
        if theirs != value:
            raise ValueError(f"cannot stack {where}: hyper-parameter {field.key} differs ({theirs} vs {value})")
    for il in range(first.n_layer):
        shapes = {_BLOCK_TENSOR.match(t.name).group(2): t.shape for t in first.blocks.get(il, [])}
        other_shapes = {_BLOCK_TENSOR.match(t.name).group(2): t.shape for t in other.blocks.get(il, [])}
        if shapes != other_shapes:
            diff = sorted(set(shapes.items()) ^ set(other_shapes.items()))
            raise ValueError(f"cannot stack {where}: block {il} tensors differ ({diff[0][0]})")


def stack(inputs: Sequence[str | Path], out_path: str | Path, *, base: int = 0, progress: bool = True) -> list[str]:
    """Write one GGUF holding every block of every input: input k's block i becomes block k*N + i.

    Tensors are copied byte for byte in their own quantization type (mixed types are fine).  The
    non-block tensors (embeddings, output norm, output) and the metadata come from
    ``inputs[base]``.  Per-layer metadata arrays are concatenated, ``block_count`` is the total,
    ``<arch>.layer_order`` is set to the base input's blocks, in the order that input stores if it
    stores one (so the file runs as the base model by default; the other inputs' stored orders
    are not kept), and the source of each block is recorded under ``frankenllama.block_sources``.
    Returns those block sources.

    Raises:
        ValueError: fewer than two inputs, or inputs that differ in architecture, depth, vocabulary,
            hyper-parameters or block tensor shapes (the message names the mismatch); bad output
            paths as for :func:`materialize`.
    """
    if len(inputs) < 2:
        raise ValueError("stack needs at least two models")
    if not 0 <= base < len(inputs):
        raise ValueError(f"base {base} is not the index of an input (0-{len(inputs) - 1})")
    out_path = Path(out_path)
    sources = [ModelFile(path) for path in inputs]
    _check_output(out_path, [s.path for s in sources])
    first = sources[0]
    for other in sources[1:]:
        _compare(first, other)
    arch, n_layer = first.arch, first.n_layer
    main = sources[base]
    enc = _Encoder(main.byte_order)
    block_sources = [f"{s.path.name}:{il}" for s in sources for il in range(n_layer)]
    swa = [s.swa_flags() for s in sources]

    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               BLOCK_SOURCES_KEY, SOURCE_ORDER_KEY}
    entries = [enc.kv(_ARCH_KEY, _VT.STRING, arch)]
    for field in main.metadata():
        if field.key in dropped:
            continue
        if main.is_per_layer(field):
            values = [v for s in sources for v in s.field(field.key)]
            entries.append(enc.kv(field.key, _VT.ARRAY, values, field.item_type))
        else:
            entries.append(field.raw)
    entries.append(enc.kv(f"{arch}.block_count", _VT.UINT32, n_layer * len(sources)))
    base_order = main.stored_order() or list(range(n_layer))
    entries.append(enc.kv(f"{arch}.layer_order", _VT.ARRAY, [base * n_layer + il for il in base_order], _VT.INT32))
    if swa[0] is not None:
        entries.append(enc.kv(f"{arch}.attention.sliding_window_pattern", _VT.ARRAY,
                              [f for flags in swa for f in flags], _VT.BOOL))
    entries.append(enc.kv(BLOCK_SOURCES_KEY, _VT.ARRAY, block_sources, _VT.STRING))

    plan: Plan = [(main, t, t.name) for t in main.others]
    for k, src in enumerate(sources):
        for il in range(n_layer):
            plan += src.block_plan(il, k * n_layer + il)
    _write(out_path, main.byte_order, main.alignment, entries, plan, progress, f"stack {out_path.name}")
    return block_sources


def tensor_bytes_per_layer(model_path: str | Path) -> dict[int, int]:
    """Bytes of the tensors of each block, from the GGUF tensor table."""
    src = ModelFile(model_path)
    return {il: sum(t.n_bytes for t in tensors) for il, tensors in src.blocks.items()}


__all__ = ["ModelFile", "Field", "Tensor", "materialize", "stack", "atomic_output", "remove_stale_parts",
           "tensor_bytes_per_layer", "SOURCE_ORDER_KEY", "BLOCK_SOURCES_KEY", "SWA_PERIODS"]
