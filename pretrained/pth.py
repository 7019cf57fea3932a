"""Reads PyTorch `.pth` state dicts into numpy arrays without importing torch.

A `.pth` written by `torch.save` is either a zip archive (torch >= 1.6: `<name>/data.pkl`
plus one raw file per storage under `<name>/data/`) or the legacy stream (magic number,
protocol and system-info pickles, the main pickle, the list of storage keys, then each
storage as an int64 element count followed by its raw bytes). In both the main pickle
builds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
from storages named by persistent ids. The unpickler below accepts only those few
globals, so reading a file runs no code from it.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthFormatError(ValueError):
    """The file is not a torch-saved state dict this reader understands (or is corrupt)."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _Storage:
    key: str  # root storage key
    dtype: np.dtype
    offset: int = 0  # legacy view storages: element offset into the root storage
    numel: int = -1


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    return _LazyTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise PthFormatError(
            f"unsupported object {module}.{name} in the .pth file; convert it with "
            "`python -m evaluation.convert_weights --reader torch` on a machine with torch"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage" or not isinstance(pid[1], _StorageType):
            raise PthFormatError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        key = key.decode() if isinstance(key, bytes) else str(key)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # (view_key, offset, size) of pre-1.0 torch
            _, view_offset, view_size = view
            return _Storage(key, storage_type.dtype, int(view_offset), int(view_size))
        return _Storage(key, storage_type.dtype, 0, int(numel))


def _materialise(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    """Replaces lazy tensors by numpy arrays, recursively through dicts, lists and tuples."""
    if isinstance(obj, _LazyTensor):
        if obj.storage.key not in storages:
            raise PthFormatError(f"storage {obj.storage.key!r} missing from the file")
        root = storages[obj.storage.key]
        flat = root[obj.storage.offset :]
        extent = 1 + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True) if n > 0)
        if 0 in obj.size:
            return np.zeros(obj.size, flat.dtype)
        if obj.offset < 0 or obj.offset + extent > flat.size:
            raise PthFormatError(f"tensor of size {obj.size} overruns its storage: truncated?")
        view = np.lib.stride_tricks.as_strided(
            flat[obj.offset :],
            shape=obj.size,
            strides=tuple(s * flat.itemsize for s in obj.stride),
            writeable=False,
        )
        return np.array(view)  # own, contiguous copy
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, storages)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _storage_specs(obj: Any, found: dict[str, np.dtype]) -> dict[str, np.dtype]:
    if isinstance(obj, _LazyTensor):
        found[obj.storage.key] = obj.storage.dtype
    elif isinstance(obj, dict):
        for v in obj.values():
            _storage_specs(v, found)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _storage_specs(v, found)
    return found


def _load_zip(zf: zipfile.ZipFile) -> Any:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise PthFormatError("zip archive without a single data.pkl: not a torch.save file")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in zf.namelist():
        order = zf.read(prefix + "byteorder").decode().strip()
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
    storages = {}
    for key, dtype in _storage_specs(obj, {}).items():
        name = f"{prefix}data/{key}"
        if name not in zf.namelist():
            raise PthFormatError(f"storage {name!r} missing from the archive")
        dtype = dtype.newbyteorder("<" if order == "little" else ">")
        storages[key] = np.frombuffer(zf.read(name), dtype=dtype)
    return _materialise(obj, storages)


def _load_legacy(f: IO[bytes]) -> Any:
    try:
        magic = pickle.load(f)
    except Exception as e:  # any garbage in front: not a torch file
        raise PthFormatError(f"not a torch.save file ({type(e).__name__})") from e
    if magic != _LEGACY_MAGIC:
        raise PthFormatError("not a torch.save file (bad magic number)")
    if pickle.load(f) != _LEGACY_PROTOCOL:
        raise PthFormatError("unsupported legacy torch.save protocol version")
    sys_info = pickle.load(f)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    obj = _Unpickler(f).load()
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in pickle.load(f)]
    specs = _storage_specs(obj, {})
    storages = {}
    for key in keys:
        header = f.read(8)
        if len(header) != 8:
            raise PthFormatError("file ends inside the tensor data: truncated?")
        (numel,) = struct.unpack("<q" if little else ">q", header)
        dtype = np.dtype(specs.get(key, np.uint8)).newbyteorder("<" if little else ">")
        data = f.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise PthFormatError("file ends inside the tensor data: truncated?")
        storages[key] = np.frombuffer(data, dtype=dtype)
    return _materialise(obj, storages)


def read_pth(path: str) -> Any:
    """The object saved in a `.pth` file, with every tensor as a numpy array.

    Args:
      path: a file written by `torch.save` (zip or legacy format), holding tensors in
        (nested) dicts, lists and tuples: a state dict, for instance.

    Raises:
      PthFormatError: not such a file, truncated, or holding other kinds of objects.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(zf)
        with open(path, "rb") as f:
            return _load_legacy(f)
    except PthFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise PthFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A flat name -> numpy array state dict from a `.pth` (a `{'state_dict': ...}` too)."""
    obj = read_pth(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    ):
        raise PthFormatError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)
