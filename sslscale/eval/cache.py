"""The feature cache: frozen features of one trunk on the train and val splits, in fp16 blocks on disk.

    <eval>/features/<trunk>/fingerprint.json        what the features are of (see `fingerprint`)
    <eval>/features/<trunk>/<split>/block_00003.json     marker, written last: the cache's fingerprint, rows,
                                                         layers, checksums
    <eval>/features/<trunk>/<split>/block_00003.labels.npy    int64 [rows]
    <eval>/features/<trunk>/<split>/block_00003.<layer>.npy   fp16 [rows, dim] for "trunk" and each probed layer

A block is a fixed range of rows [b * block_rows, (b + 1) * block_rows) of the split, whatever the
number of ranks: ranks share out the blocks still missing, so a requeued job (on any number of GPUs)
extracts only what is not finished. A block exists only once its marker does (files are written under
a temporary name and renamed first). Readers memory-map the blocks: host memory stays at a chunk.

A cache whose fingerprint differs from the requested one (another checkpoint, transform, data root, or
data: which image files, their size and modification time) is deleted and rebuilt; a block whose marker
names another cache's fingerprint (copied in from elsewhere), or whose files are missing, truncated or
fail their checksum, is extracted again. Both are said on the console.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass

import numpy as np
import torch

FINGERPRINT_FILE = "fingerprint.json"
TRUNK = "trunk"  # the feature set of the trunk output; other sets are named by their module path
FEATURE_DTYPE = np.float16


def tensor_digest(state: dict) -> str:
    """sha256 over names, shapes, dtypes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tuple(value.shape)}|{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def prepare_folder(folder: str, parts: dict, say) -> None:
    """Make `folder` a cache for `parts`: keep it if its fingerprint matches, else empty it (saying why)."""
    wanted = fingerprint(parts)
    path = os.path.join(folder, FINGERPRINT_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        if saved.get("fingerprint") == wanted:
            return
        old = saved.get("parts", {})
        differs = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k)) or ["unreadable fingerprint"]
        say(f"feature cache {folder} was made for another {', '.join(differs)}; rebuilding it")
        shutil.rmtree(folder)
    elif os.path.isdir(folder) and os.listdir(folder):
        say(f"feature cache {folder} has no fingerprint; rebuilding it")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    write_atomic(path, json.dumps({"fingerprint": wanted, "parts": parts}, indent=1, sort_keys=True))


def block_ranges(rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]


def block_stem(split_dir: str, block: int) -> str:
    return os.path.join(split_dir, f"block_{block:05d}")


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def cache_fingerprint(split_dir: str) -> str | None:
    """The fingerprint of the cache a split folder belongs to (None: unreadable)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(split_dir)), FINGERPRINT_FILE)) as f:
            return json.load(f)["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_marker(split_dir: str, block: int) -> dict | None:
    try:
        with open(block_stem(split_dir, block) + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def block_problem(split_dir: str, block: int, rows: tuple[int, int], layers: list[str],
                  verify_checksums: bool) -> str | None:
    """Why block `block` cannot be used for `layers` (None: it can)."""
    marker = read_marker(split_dir, block)
    if marker is None:
        return "missing"
    if not isinstance(marker, dict) or marker.get("fingerprint") != cache_fingerprint(split_dir):
        return "was made for another cache (its fingerprint differs)"  # copied in, or left by an older version
    if (marker.get("start"), marker.get("stop")) != rows:
        return f"holds rows {marker.get('start')}-{marker.get('stop')}, not {rows[0]}-{rows[1]}"
    absent = [name for name in layers if name not in marker.get("layers", {})]
    if absent:
        return f"lacks {', '.join(absent)}"
    stem = block_stem(split_dir, block)
    for name, entry in [("labels", marker["labels"]), *[(n, marker["layers"][n]) for n in layers]]:
        try:
            array = np.load(f"{stem}.{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            return f"{name}: unreadable ({str(error)[:80]})"
        if list(array.shape) != entry["shape"]:
            return f"{name}: shape {list(array.shape)}, marker says {entry['shape']}"
        if verify_checksums and _crc(array) != entry["crc32"]:
            return f"{name}: checksum differs (corrupt file)"
    return None


class BlockWriter:
    """Fills one block, batch by batch, straight into memory-mapped files; `commit` makes it visible."""

    def __init__(self, split_dir: str, block: int, rows: tuple[int, int], dims: dict[str, int]):
        self.split_dir, self.block, self.rows = split_dir, block, rows
        self.stem = block_stem(split_dir, block)
        self.tmp = f".tmp{os.getpid()}"
        self.fingerprint = cache_fingerprint(split_dir)  # the block is bound to its cache
        n = rows[1] - rows[0]
        self.arrays = {name: np.lib.format.open_memmap(f"{self.stem}.{name}.npy{self.tmp}", mode="w+",
                                                       dtype=FEATURE_DTYPE, shape=(n, dim))
                       for name, dim in dims.items()}
        self.labels = np.full(n, -1, dtype=np.int64)
        self.filled = 0

    def write(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
        """Writes as many leading rows as the block still holds; returns how many it took."""
        take = min(len(labels), len(self.labels) - self.filled)
        rows = slice(self.filled, self.filled + take)
        for name, array in self.arrays.items():
            array[rows] = features[name][:take].numpy()
        self.labels[rows] = labels[:take].numpy()
        self.filled += take
        return take

    @property
    def full(self) -> bool:
        return self.filled == len(self.labels)

    def commit(self) -> None:
        marker = {"fingerprint": self.fingerprint, "start": self.rows[0], "stop": self.rows[1], "layers": {}}
        with open(f"{self.stem}.labels.npy{self.tmp}", "wb") as f:  # a file object: np.save adds no suffix
            np.save(f, self.labels, allow_pickle=False)
        os.replace(f"{self.stem}.labels.npy{self.tmp}", f"{self.stem}.labels.npy")
        marker["labels"] = {"shape": [len(self.labels)], "crc32": _crc(self.labels)}
        for name, array in self.arrays.items():
            array.flush()
            marker["layers"][name] = {"shape": list(array.shape), "crc32": _crc(array)}
            os.replace(f"{self.stem}.{name}.npy{self.tmp}", f"{self.stem}.{name}.npy")
        self.arrays = {}
        write_atomic(f"{self.stem}.json", json.dumps(marker))

    def abandon(self) -> None:
        for name in list(self.arrays):
            path = f"{self.stem}.{name}.npy{self.tmp}"
            del self.arrays[name]
            if os.path.exists(path):
                os.remove(path)


def drop_block(split_dir: str, block: int) -> None:
    """Remove a block's marker, so it counts as missing (its files are overwritten when it is redone)."""
    stem = block_stem(split_dir, block)
    if os.path.exists(stem + ".json"):
        os.remove(stem + ".json")


def remove_leftovers(split_dir: str) -> None:
    """Temporary files of writers that died (a pre-empted job): each may be a whole block's size."""
    if os.path.isdir(split_dir):
        for name in os.listdir(split_dir):
            if ".tmp" in name:
                os.remove(os.path.join(split_dir, name))


@dataclass
class CachedSplit:
    """The cached rows of one split: labels in memory, features memory-mapped, block by block."""

    labels: torch.Tensor  # int64 [n]
    blocks: dict[str, list[np.ndarray]]  # feature set -> fp16 memmaps in row order
    starts: list[int]

    @classmethod
    def open(cls, split_dir: str, rows: int, block_rows: int, layers: list[str]) -> "CachedSplit":
        labels, blocks, starts = [], {name: [] for name in layers}, []
        for block, (start, stop) in enumerate(block_ranges(rows, block_rows)):
            problem = block_problem(split_dir, block, (start, stop), layers, verify_checksums=False)
            if problem is not None:
                raise RuntimeError(f"feature cache {split_dir}: block {block} {problem}")
            stem = block_stem(split_dir, block)
            labels.append(np.load(f"{stem}.labels.npy"))
            for name in layers:
                blocks[name].append(np.load(f"{stem}.{name}.npy", mmap_mode="r"))
            starts.append(start)
        return cls(torch.from_numpy(np.concatenate(labels)), blocks, starts)

    def __len__(self) -> int:
        return len(self.labels)

    def dim(self, name: str) -> int:
        return self.blocks[name][0].shape[1]

    def nbytes(self, name: str) -> int:
        return len(self) * self.dim(name) * np.dtype(FEATURE_DTYPE).itemsize

    def chunks(self, name: str, chunk_rows: int):
        """(first row, fp16 tensor of up to chunk_rows rows) in row order; one chunk in host memory."""
        for start, array in zip(self.starts, self.blocks[name]):
            for offset in range(0, len(array), chunk_rows):
                yield start + offset, torch.from_numpy(np.array(array[offset:offset + chunk_rows]))  # a copy: memmaps are read-only

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """fp16 rows at `index` (any order), read block by block from the memory maps."""
        index = index.cpu()
        out = torch.empty(len(index), self.dim(name), dtype=torch.float16)
        block_rows = len(self.blocks[name][0])
        which = torch.div(index, block_rows, rounding_mode="floor")
        for block in which.unique().tolist():
            mask = which == block
            local = (index[mask] - self.starts[block]).numpy()
            order = np.argsort(local, kind="stable")  # sorted reads are sequential reads
            picked = np.empty((len(local), out.shape[1]), dtype=FEATURE_DTYPE)
            picked[order] = self.blocks[name][block][local[order]]
            out[mask] = torch.from_numpy(picked)
        return out

    def load(self, name: str, device: torch.device) -> torch.Tensor:
        """All rows of a feature set on `device` (fp16), copied chunk by chunk."""
        out = torch.empty(len(self), self.dim(name), dtype=torch.float16, device=device)
        for start, chunk in self.chunks(name, 65536):
            out[start:start + len(chunk)].copy_(chunk, non_blocking=False)
        return out
