"""A validating GGUF reader.

The header is parsed by a small bounds-checked parser: every count and length is compared with
the bytes that remain in the file *before* anything is allocated or looped over, so a corrupt or
hostile file fails fast with a :class:`GGUFError` naming the field at fault. Tensor data is never
read here: :meth:`GGUFFile.raw` returns zero-copy views of a private (copy-on-write) memory map,
and :meth:`GGUFFile.tensor` dequantises them with :mod:`slmkit.gguf.quants`.

Format (v2/v3, little endian): magic ``GGUF``, u32 version, u64 tensor_count, u64 kv_count; then
kv_count ``(string key, u32 type, value)``; then tensor_count ``(string name, u32 n_dims,
u64 dims[n_dims], u32 type, u64 offset)``; then padding to ``general.alignment`` (default 32) and
the tensor data, each tensor at ``data_start + offset``. A string is ``u64 length`` + UTF-8 bytes.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.errors import ModelFileError, WeightError
from slmkit.gguf.quants import (
    GGML_QUANT_SIZES,
    GGML_TYPE_NAMES,
    SUPPORTED_TYPES,
    dequantize,
)
from slmkit.gguf.strings import StringArray

__all__ = ["GGUFError", "TensorInfo", "GGUFFile", "open_gguf"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_SIZE = 24  # magic, version, tensor_count, kv_count
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Smallest possible encodings, used to bound counts before looping over them.
MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, 1-byte value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# GGUF metadata value types
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32 = 0, 1, 2, 3, 4, 5
_T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 6, 7, 8, 9, 10, 11, 12

# scalar value type -> (struct format, numpy dtype)
_SCALARS: dict[int, tuple[str, str]] = {
    _T_UINT8: ("<B", "<u1"),
    _T_INT8: ("<b", "<i1"),
    _T_UINT16: ("<H", "<u2"),
    _T_INT16: ("<h", "<i2"),
    _T_UINT32: ("<I", "<u4"),
    _T_INT32: ("<i", "<i4"),
    _T_FLOAT32: ("<f", "<f4"),
    _T_BOOL: ("<B", "<u1"),
    _T_UINT64: ("<Q", "<u8"),
    _T_INT64: ("<q", "<i8"),
    _T_FLOAT64: ("<d", "<f8"),
}


_U64 = struct.Struct("<Q")


class GGUFError(ModelFileError):
    """A GGUF file is malformed. ``field`` names the header field, metadata key or tensor at fault."""

    def __init__(self, path: object, field: str, message: str):
        self.field = field
        super().__init__(path, f"field '{field}': {message}")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne[] reversed, so a [out, in] weight is (out, in)
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Parser:
    """Bounds-checked little-endian reads over a buffer; every failure is a GGUFError."""

    def __init__(self, path: Path, buf: Any, size: int, pos: int = 0, lazy: bool = False):
        self.path = path
        self.lazy = lazy  # string arrays as StringArray (decoded on first use), not lists
        self.buf = buf
        self.size = size
        self.pos = pos

    def fail(self, field: str, message: str) -> GGUFError:
        return GGUFError(self.path, field, message)

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, field: str, what: str) -> None:
        if n > self.remaining():
            raise self.fail(
                field,
                f"{what} needs {n} bytes at offset {self.pos} but only {self.remaining()} remain"
                f" (file is {self.size} bytes; truncated or corrupt)",
            )

    def scalar(self, fmt: str, field: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, field, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, field: str, what: str) -> int:
        return self.scalar("<I", field, what)

    def u64(self, field: str, what: str) -> int:
        return self.scalar("<Q", field, what)

    def string(self, field: str, what: str = "string") -> str:
        n = self.u64(field, f"{what} length")
        self.need(n, field, f"{what} of length {n}")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(field, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def strings(self, key: str, count: int) -> StringArray:
        """count strings, their lengths checked against the file here and their bytes kept: decoded on
        first use (gguf/strings.py; a 262k-token vocabulary is most of a header). The walk over the
        lengths is the loop's only work; where it runs past the file, a careful walk names the string."""
        buf, size, start = self.buf, self.size, self.pos
        unpack, pos = _U64.unpack_from, start
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # a length read past the buffer's end, or past any offset
            pos = size + 1
        if pos > size:
            pos = start
            for i in range(count):
                self.pos = pos
                n = unpack(buf, pos)[0] if pos + 8 <= size else size
                if pos + 8 + n > size:
                    self.string(key, f"string [{i}]")  # raises its named error
                pos += 8 + n
        self.pos = pos
        return StringArray(bytes(buf[start:pos]), count, key, self.path)

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _T_STRING:
            return self.string(key, "string value")
        if vtype == _T_ARRAY:
            return self.array(key)
        spec = _SCALARS.get(vtype)
        if spec is None:
            raise self.fail(key, f"unknown metadata value type {vtype}")
        v = self.scalar(spec[0], key, "value")
        if vtype == _T_BOOL:
            if v not in (0, 1):
                raise self.fail(key, f"bool value must be 0 or 1, got {v}")
            return bool(v)
        return v

    def array(self, key: str) -> list[str] | StringArray | np.ndarray:
        itype = self.u32(key, "array item type")
        count = self.u64(key, "array length")
        if itype == _T_ARRAY:
            raise self.fail(key, "nested arrays are not supported")
        if itype == _T_STRING:
            # each string is at least its 8-byte length
            if count > self.remaining() // 8:
                raise self.fail(
                    key,
                    f"array length {count} (strings) cannot fit in the {self.remaining()} bytes"
                    " that remain in the file",
                )
            strings = self.strings(key, count)
            return strings if self.lazy else strings.to_list()
        spec = _SCALARS.get(itype)
        if spec is None:
            raise self.fail(key, f"unknown array item type {itype}")
        itemsize = struct.calcsize(spec[0])
        if count > self.remaining() // itemsize:
            raise self.fail(
                key,
                f"array length {count} ({itemsize}-byte items) cannot fit in the"
                f" {self.remaining()} bytes that remain in the file",
            )
        nbytes = count * itemsize
        arr = np.frombuffer(bytes(self.buf[self.pos:self.pos + nbytes]), dtype=spec[1])
        self.pos += nbytes
        if itype == _T_BOOL:
            if count and int(arr.max()) > 1:
                raise self.fail(key, "bool array items must be 0 or 1")
            arr = arr.astype(bool)
        # Small arrays become lists; big numeric ones stay numpy (a Python int/float per item costs
        # ~10x the file's bytes, so a hostile array could exhaust memory). Both have .tolist().
        return arr.tolist() if count <= 1 << 16 else arr


class GGUFFile:
    """An open, validated GGUF file. Use :func:`open_gguf`; close it (or use ``with``) when done."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int  # absolute offset of the tensor data section

    def __init__(self, path: Path, version: int, alignment: int, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], data_offset: int, mm: mmap.mmap | None):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.metadata = metadata
        self.tensors = tensors
        self.data_offset = data_offset
        self._mmap = mm
        # One uint8 tensor over the whole file; raw() slices it (zero-copy). The map is private
        # (copy-on-write), so a caller writing into a returned tensor never changes the file.
        self._bytes: torch.Tensor | None = (
            torch.from_numpy(np.frombuffer(mm, dtype=np.uint8)) if mm is not None else None
        )

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(self.path, "general.architecture", "missing or not a non-empty string")
        return arch

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightError(name, "not present in the GGUF file", path=self.path)
        return info

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 tensor viewing the memory map (no copy)."""
        info = self._info(name)
        if self._bytes is None:
            if info.nbytes == 0:
                return torch.empty(0, dtype=torch.uint8)
            raise ModelFileError(self.path, "GGUF file is closed")
        return self._bytes[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantised to ``dtype`` with shape ``TensorInfo.shape``.

        F32 (as float32), F16 (as float16) and BF16 (as bfloat16) come back as views of the map.
        """
        info = self._info(name)
        raw = self.raw(name)
        native = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}.get(info.ggml_type)
        if native is not None and native == dtype:
            try:
                return raw.view(dtype).view(info.shape)
            except RuntimeError:  # misaligned for the dtype (alignment < element size)
                return raw.clone().view(dtype).view(info.shape)
        return dequantize(raw, info.ggml_type, info.shape, dtype)

    def close(self) -> None:
        """Release this object's hold on the map. Tensors returned by raw()/tensor() stay valid:
        the map is unmapped when the last of them is freed."""
        self._bytes = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still exported; the map is released with them

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"tensors={len(self.tensors)}, metadata={len(self.metadata)})")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _parse(path: Path, buf: Any, size: int,
           lazy: bool = False) -> tuple[int, int, dict[str, Any], dict[str, TensorInfo], int]:
    p = _Parser(path, buf, size, lazy=lazy)

    # --- fixed header
    if size < 4 or bytes(buf[0:4]) != MAGIC:
        got = bytes(buf[0:min(4, size)])
        raise p.fail("magic", f"expected b'GGUF', got {got!r}; not a GGUF file")
    if size < HEADER_SIZE:
        raise p.fail("header", f"file is {size} bytes, smaller than the {HEADER_SIZE}-byte GGUF header")
    p.pos = 4
    version = p.u32("version", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, 2, 3):
            raise p.fail("version", f"big-endian GGUF file (version {swapped}); only little-endian files are supported")
        raise p.fail("version", f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = p.u64("tensor_count", "tensor count")
    kv_count = p.u64("metadata_kv_count", "metadata kv count")
    body = size - HEADER_SIZE
    if kv_count > body // MIN_KV_SIZE:
        raise p.fail("metadata_kv_count", f"{kv_count} entries cannot fit in a {size}-byte file")
    if tensor_count > body // MIN_TENSOR_INFO_SIZE:
        raise p.fail("tensor_count", f"{tensor_count} tensor infos cannot fit in a {size}-byte file")

    # --- metadata
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = p.string(f"metadata_kv[{i}].key", "key")
        if key in metadata:
            raise p.fail(key, "duplicate metadata key")
        vtype = p.u32(key, "value type")
        metadata[key] = p.value(vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        a = metadata["general.alignment"]
        # The GGUF spec asks for a multiple of 8, llama.cpp for a power of two: both, so every tensor
        # starts 8-byte aligned (alignment 1 put a Q8_0 tensor's f16 scales at odd addresses).
        if not isinstance(a, int) or isinstance(a, bool) or a < 8 or a & (a - 1):
            raise p.fail("general.alignment",
                         f"must be a power of two and a multiple of 8 (8, 16, 32, ...), got {a!r}")
        alignment = a
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        what = "missing" if arch is None else f"must be a non-empty string, got {arch!r}"
        raise p.fail("general.architecture", what)

    # --- tensor infos
    if tensor_count > p.remaining() // MIN_TENSOR_INFO_SIZE:
        raise p.fail(
            "tensor_count",
            f"{tensor_count} tensor infos cannot fit in the {p.remaining()} bytes after the metadata",
        )
    pending: list[tuple[str, tuple[int, ...], int, int, int]] = []
    seen: set[str] = set()
    for i in range(tensor_count):
        name = p.string(f"tensor_info[{i}].name", "tensor name")
        if not name:
            raise p.fail(f"tensor_info[{i}].name", "empty tensor name")
        if name in seen:
            raise p.fail(name, "duplicate tensor name")
        seen.add(name)
        n_dims = p.u32(name, "n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise p.fail(name, f"n_dims is {n_dims}, must be 1..{MAX_DIMS}")
        ne = [p.u64(name, f"dimension {j}") for j in range(n_dims)]
        if any(d < 1 for d in ne):
            raise p.fail(name, f"shape {tuple(reversed(ne))} has a zero dimension")
        ggml_type = p.u32(name, "type")
        if ggml_type not in SUPPORTED_TYPES:
            known = GGML_TYPE_NAMES.get(ggml_type)
            what = (f"ggml type id {ggml_type} ({known}) is not supported" if known
                    else f"unknown ggml type id {ggml_type}")
            raise p.fail(name, what)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if ne[0] % block:
            raise p.fail(
                name,
                f"first dimension {ne[0]} is not a multiple of the {SUPPORTED_TYPES[ggml_type]} block size {block}",
            )
        offset = p.u64(name, "data offset")
        if offset % alignment:
            raise p.fail(name, f"data offset {offset} is not a multiple of the alignment {alignment}")
        n_elements = 1
        for d in ne:
            n_elements *= d
        pending.append((name, tuple(reversed(ne)), ggml_type, offset, n_elements // block * type_size))

    # --- data ranges
    data_offset = _align(p.pos, alignment)
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, offset, nbytes in pending:
        start = data_offset + offset
        if start + nbytes > size:
            raise p.fail(
                name,
                f"data [{start}, {start + nbytes}) extends past end of file ({size} bytes)",
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, SUPPORTED_TYPES[ggml_type], start, nbytes)
    ordered = sorted(enumerate(tensors.values()), key=lambda it: (it[1].offset, it[0]))
    for (_, a), (_, b) in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise p.fail(
                b.name,
                f"data [{b.offset}, {b.offset + b.nbytes}) overlaps tensor '{a.name}'"
                f" [{a.offset}, {a.offset + a.nbytes})",
            )
    return version, alignment, metadata, tensors, data_offset


def open_gguf(path: str | Path, *, lazy_strings: bool = False) -> GGUFFile:
    """Open and fully validate a GGUF file's header; tensor data stays memory-mapped. lazy_strings:
    string arrays as gguf.strings.StringArray (lengths checked now, UTF-8 decoded and checked on first
    use), for readers that may not need them (the loader, whose tokenizer can come from its cache);
    otherwise lists of str."""
    path = Path(path)
    try:
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            # a FIFO would block open() until something writes to it; a device has no fixed size
            raise ModelFileError(path, "is not a regular file (a FIFO, socket or device), expected a GGUF file")
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelFileError(path, "GGUF file not found") from None
    except IsADirectoryError:
        raise ModelFileError(path, "is a directory, expected a GGUF file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        why = e.strerror if isinstance(e, OSError) else e
        raise ModelFileError(path, f"cannot open GGUF file: {why}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                head = f.read(size)
                # Reuse the parser so the error names magic/header like any other short file.
                _parse(path, head, len(head))
                raise AssertionError("unreachable")  # pragma: no cover
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise ModelFileError(path, f"cannot read GGUF file: {e.strerror or e}") from None
    try:
        version, alignment, metadata, tensors, data_offset = _parse(path, mm, size, lazy_strings)
    except BaseException:
        mm.close()
        raise
    return GGUFFile(path, version, alignment, metadata, tensors, data_offset, mm)
