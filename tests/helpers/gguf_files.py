"""Write small GGUF files with ggml's own writer (gguf.GGUFWriter), locate header fields in them
(with gguf.GGUFReader, independent of slmkit's reader) and corrupt them byte-precisely."""
from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

# Byte offsets of the f16 (or, for Q8_K, f32) scale fields inside one block of each type.
# Random block bytes get finite values written there so dequantised results stay finite.
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "MXFP4": (),
}
_F32_FIELDS: dict[str, tuple[int, ...]] = {"Q8_K": (0,)}


def qtype(name: str) -> QT:
    return QT[name]


def block_sizes(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return gguf.GGML_QUANT_SIZES[QT[name]]


def has_reference_quantizer(name: str) -> bool:
    """Whether gguf.quants.quantize implements this type (it does not for the K-quants)."""
    if name in ("F32", "F16"):
        return True
    try:
        gguf.quants.quantize(np.zeros((1, block_sizes(name)[0]), np.float32), QT[name])
    except NotImplementedError:
        return False
    return True


def quantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """float32 data (torch order) -> the ggml bytes, shape (*data.shape[:-1], row_bytes), uint8."""
    q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), QT[type_name])
    return q.view(np.uint8)


def random_blocks(type_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random but valid ggml bytes for a tensor of torch ``shape``: uint8 of shape
    (*shape[:-1], row_bytes). Every bit pattern is exercised except the float scale fields, which
    hold finite, moderate values (so no inf - inf / NaN makes bit-exact comparison meaningless)."""
    block, size = block_sizes(type_name)
    assert shape[-1] % block == 0
    n_blocks = int(np.prod(shape)) // block
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at in _F16_FIELDS.get(type_name, ()):
        vals = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        vals[::7] = 0  # a few zero scales
        b[:, at:at + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    if type_name == "MXFP4":  # e8m0 exponent byte: keep 2**(e-128) * 12 far from f32 overflow
        b[:, 0] = rng.integers(100, 150, size=n_blocks, dtype=np.uint8)
    for at in _F32_FIELDS.get(type_name, ()):
        vals = (rng.standard_normal(n_blocks) * 0.05).astype(np.float32)
        b[:, at:at + 4] = vals.view(np.uint8).reshape(n_blocks, 4)
    return b.reshape(*shape[:-1], shape[-1] // block * size)


def reference_dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """gguf.quants.dequantize, plus Q8_K (which gguf does not implement): d * qs."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if type_name == "Q8_K":
        block, size = block_sizes("Q8_K")
        b = raw.reshape(-1, size)
        d = b[:, 0:4].copy().view(np.float32)
        qs = b[:, 4:260].view(np.int8).astype(np.float32)
        return (d * qs).reshape(*raw.shape[:-1], raw.shape[-1] // size * block)
    return gguf.quants.dequantize(raw, QT[type_name])


def _add_metadata(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], VT):
        w.add_key_value(key, value[0], value[1])
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 2**32:
            w.add_uint32(key, value)
        elif -(2**31) <= value < 0:
            w.add_int32(key, value)
        else:
            w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        # NB: GGUFWriter.add_string silently drops empty strings; add_key_value keeps them.
        w.add_key_value(key, value, VT.STRING)
    elif isinstance(value, (list, tuple)):
        # NB: GGUFWriter.add_array silently drops empty lists (and the format needs an item type).
        w.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write metadata {key}={value!r}")


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, tuple[np.ndarray, str]],
    *,
    alignment: int | None = None,
) -> Path:
    """Write a GGUF file with gguf.GGUFWriter.

    ``tensors`` maps name -> (array in torch order, ggml type name). A float array is quantised
    with gguf.quants.quantize (F32/F16 are stored as such); a uint8 array is taken as the already
    quantised bytes, shape (*shape[:-1], row_bytes) (see :func:`random_blocks`). ``metadata``
    values: str, bool, int (u32 / i32 / i64 by range), float (f32), list (array), or
    ``(value, GGUFValueType)`` for an explicit type.
    """
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value in metadata.items():
        _add_metadata(w, key, value)
    for name, (arr, type_name) in tensors.items():
        if arr.dtype == np.uint8:
            if type_name in ("F32", "F16", "BF16"):
                raise ValueError("pass float data for F32/F16/BF16")
            # GGUFWriter reads a uint8 array's shape as the *byte* shape; raw_shape must not be
            # the element shape here (it would be divided by the type size a second time).
            w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=QT[type_name])
        elif type_name == "F32":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif type_name == "F16":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(name, quantize(arr, type_name), raw_dtype=QT[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------ layout
@dataclass
class KVOffsets:
    start: int  # the key's u64 length
    key: int  # the key bytes
    type: int  # the u32 value type
    value: int  # the value: scalar, a string's u64 length, or an array's u32 item type
    array_count: int | None = None  # arrays: the u64 length
    array_items: int | None = None  # arrays: the first item


@dataclass
class TensorOffsets:
    start: int  # the name's u64 length
    name: int
    n_dims: int
    dims: int  # first u64 dim (ggml order)
    type: int
    offset: int  # the u64 relative data offset
    data: int  # absolute offset of the data
    nbytes: int


@dataclass
class Layout:
    size: int
    header: dict[str, int]  # magic, version, tensor_count, metadata_kv_count
    kv: dict[str, KVOffsets]
    tensors: dict[str, TensorOffsets]
    tensor_infos_end: int
    data_start: int


def gguf_layout(path: str | Path) -> Layout:
    """Byte offsets of every header field of a well-formed GGUF file (found by gguf.GGUFReader)."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data

    def at(part: np.ndarray) -> int:
        return part.ctypes.data - base

    kv: dict[str, KVOffsets] = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        e = KVOffsets(start=f.offset, key=at(f.parts[1]), type=at(f.parts[2]), value=at(f.parts[3]))
        if f.types[0] == VT.ARRAY:
            e.array_count = at(f.parts[4])
            e.array_items = at(f.parts[5])
        kv[key] = e
    tensors: dict[str, TensorOffsets] = {}
    end = 0
    for t in r.tensors:
        parts = t.field.parts
        tensors[t.name] = TensorOffsets(
            start=t.field.offset, name=at(parts[1]), n_dims=at(parts[2]), dims=at(parts[3]),
            type=at(parts[4]), offset=at(parts[5]), data=t.data_offset, nbytes=int(t.n_bytes),
        )
        end = at(parts[5]) + 8
    size = r.data.shape[0]
    layout = Layout(
        size=size,
        header={"magic": 0, "version": 4, "tensor_count": 8, "metadata_kv_count": 16},
        kv=kv,
        tensors=tensors,
        tensor_infos_end=end,
        data_start=r.data_offset,
    )
    del r
    return layout


# --------------------------------------------------------------------------- corruption
def copy_file(src: str | Path, dst: str | Path) -> Path:
    shutil.copyfile(src, dst)
    return Path(dst)


def patch_bytes(path: str | Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_u32(path: str | Path, offset: int, value: int) -> None:
    patch_bytes(path, offset, struct.pack("<I", value))


def patch_u64(path: str | Path, offset: int, value: int) -> None:
    patch_bytes(path, offset, struct.pack("<Q", value))


def read_u64(path: str | Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack("<Q", f.read(8))[0]


def truncate(path: str | Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
