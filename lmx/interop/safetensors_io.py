"""Read and write `.safetensors` files (single or sharded) with numpy, bfloat16 included.

The format is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and the
raw little-endian tensor bytes. `safetensors.numpy` cannot represent bfloat16 (numpy has no
such dtype), so lmx parses the header itself and views the bytes as `ml_dtypes.bfloat16`.
Files are memory-mapped: a tensor is read from disk when it is converted, not before.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

# The dtypes lmx reads (parameters become float32 in lmx either way) and writes.
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
_CODES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorError(ValueError):
  """A tensor file or a tensor in it that lmx cannot use; the message names it."""


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array (memory-mapped, in the file's dtype)} of one .safetensors file.

  Raises TensorError naming the tensor for a dtype other than F32/F16/BF16 or offsets that
  do not match its shape.
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise TensorError(f"{path} is not a safetensors file (shorter than its 8-byte header).")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise TensorError(f"{path} is not a safetensors file (its header is not JSON: {e}).")
  size = path.stat().st_size - 8 - n
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0
          else np.zeros(0, np.uint8))  # np.memmap refuses an empty range
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    code, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if code not in DTYPES:
      raise TensorError(f"tensor {name!r} in {path.name} has dtype {code}; lmx reads F32, F16 "
                        "or BF16 weights only.")
    dtype = DTYPES[code]
    if hi - lo != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or hi > size:
      raise TensorError(f"tensor {name!r} in {path.name}: its byte range [{lo}, {hi}) does not "
                        f"hold a {code} array of shape {shape} (truncated or corrupt file).")
    out[name] = data[lo:hi].view(dtype).reshape(shape)
  return out


def read_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a Hugging Face model directory: `model.safetensors`, or the shards a
  `model.safetensors.index.json` names (each tensor in the shard the index says)."""
  directory = pathlib.Path(directory)
  index = directory / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
      if not (directory / shard).exists():
        raise TensorError(f"{INDEX_FILE} names shard {shard!r}, which is not in {directory}.")
      tensors = read_file(directory / shard)
      for name, file in weight_map.items():
        if file == shard:
          if name not in tensors:
            raise TensorError(f"{INDEX_FILE} puts tensor {name!r} in {shard}, which does not "
                              "hold it.")
          out[name] = tensors[name]
    return out
  if (directory / SINGLE_FILE).exists():
    return read_file(directory / SINGLE_FILE)
  found = sorted(p.name for p in directory.glob("*.safetensors"))
  if len(found) == 1:  # e.g. a file saved under another name
    return read_file(directory / found[0])
  pickles = sorted(p.name for p in directory.iterdir()
                   if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
  if pickles:
    raise TensorError(f"{directory} holds PyTorch pickle weights ({', '.join(pickles[:3])}) and "
                      "no model.safetensors; lmx never unpickles files (they can run code), so "
                      "save the model as safetensors first, e.g. transformers' "
                      "model.save_pretrained(dir, safe_serialization=True).")
  raise TensorError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}.")


def write_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> None:
  """Write {name: array} (float32 / float16 / bfloat16) as one .safetensors file."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _CODES:
      raise TensorError(f"tensor {name!r} has dtype {a.dtype}; safetensors export writes "
                        "float32, float16 or bfloat16.")
    header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


def write_dir(tensors: dict[str, np.ndarray], directory: str | os.PathLike,
              max_shard_bytes: int = 0) -> list[str]:
  """`model.safetensors`, or with `max_shard_bytes` > 0 and more bytes than that, shards
  `model-0000i-of-0000n.safetensors` plus the index transformers reads. Returns the files."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  total = sum(int(np.asarray(a).nbytes) for a in tensors.values())
  if max_shard_bytes <= 0 or total <= max_shard_bytes:
    write_file(tensors, directory / SINGLE_FILE)
    return [SINGLE_FILE]
  shards, size = [[]], 0
  for name in sorted(tensors):
    n = int(np.asarray(tensors[name]).nbytes)
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  files, weight_map = [], {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file({k: tensors[k] for k in names}, directory / file)
    files.append(file)
    weight_map.update({k: file for k in names})
  (directory / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return files + [INDEX_FILE]
