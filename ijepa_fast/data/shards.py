"""Webdataset-style tar shards: the ``ijepa-fast shard`` writer and an indexable reader.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar`` ... and ``index.json``. Sample
``i`` is image ``i`` of the source folder in the order :func:`~.images.scan_folder` gives (class
folders sorted, labels as there), stored as two tar members: ``<key>.<ext>`` (the file's bytes,
never re-encoded; ``ext`` is its extension in lower case) and ``<key>.cls`` (the label as text,
-1 for a flat folder), ``key`` being ``i`` as nine digits. The samples are stored in a seeded
random order (``seed``), so that a sequential reader such as DALI's ``fn.readers.webdataset``
meets the classes mixed, not one class folder after another. Beside each tar, ``shard-*.idx`` is
its index in NVIDIA DALI's webdataset format (``v1.2``).

``index.json`` is written last, atomically, so a folder without it is an unfinished write. It holds
the class names, every sample's label and source path, and per shard the byte offset and size of
each image's data, so :class:`ShardImages` reads any sample with one ``pread`` (no scan, no extra
dependency). Because sample ``i`` is file ``i`` of the folder, the loaders give a shard folder
exactly the batches they give the folder it was written from.

Files are copied as they are: an unusable one (truncated, not an image) is skipped and counted at
read time, as the folder loaders do. Samples that fail the cheap byte check of the DALI loader are
listed in ``index.json`` (``suspect``) and left out of the DALI ``.idx`` files.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

from ..errors import ConfigError, DataError
from .images import decode, scan_folder, usable_bytes

__all__ = ["INDEX", "ShardImages", "is_shard_folder", "parse_size", "write_shards"]

INDEX = "index.json"
FORMAT = "ijepa-fast shards"
VERSION = 1
BLOCK = 512
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``500MB``, ``1GB``, ``2GiB``, ``1.5g`` or ``4096`` (KB/MB/GB/TB are
    powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--size {text!r}: give a size such as 500MB, 1GB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size < 1:
        raise ConfigError(f"--size {text!r}: must be at least one byte")
    return size


def is_shard_folder(path) -> bool:
    """A folder holding an index, or shards without one (an unfinished write: reading it says so)."""
    path = Path(path)
    return (path / INDEX).is_file() or (path.is_dir() and any(path.glob("shard-*.tar")))


def _ext(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower() or "bin"


def _tar_bytes(members: int, data: int) -> int:
    """Bytes of a tar of ``members`` members holding ``data`` bytes: a header and padded data each,
    two zero blocks at the end, padded to tarfile's 10 KiB record."""
    body = members * BLOCK + data + 2 * BLOCK
    return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """One tar being written: members appended with a fixed, short header (offsets known)."""

    def __init__(self, path: Path):
        self.path, self.samples, self.offsets, self.sizes, self.idx_lines = path, [], [], [], []
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.data = 0

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        start = self.tar.offset
        self.tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // BLOCK) * BLOCK
        self.data += padded
        if self.tar.offset != start + BLOCK + padded:  # USTAR, a short name: one header block
            raise DataError(f"{self.path}: the tar header of {name} is not one block; the index would be wrong")
        return start + BLOCK

    def add(self, i: int, key: str, ext: str, data: bytes, label: int, usable: bool) -> None:
        off = self._add(f"{key}.{ext}", data)
        cls = str(label).encode()
        cls_off = self._add(f"{key}.cls", cls)
        self.samples.append(i)
        self.offsets.append(off)
        self.sizes.append(len(data))
        if usable:
            self.idx_lines.append(f"{ext} {off} {len(data)} {key}.{ext} cls {cls_off} {len(cls)} {key}.cls")

    def projected(self, more: int) -> int:
        return _tar_bytes(2 * len(self.samples) + 2, self.data + -(-more // BLOCK) * BLOCK + BLOCK)

    def close(self) -> dict:
        self.tar.close()
        idx = self.path.with_suffix(".idx")
        idx.write_text(f"v1.2 {len(self.idx_lines)}\n" + "".join(line + "\n" for line in self.idx_lines))
        for done in (self.path, idx):  # on disk before the index that points into them
            fd = os.open(done, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return {"file": self.path.name, "dali_index": idx.name, "dali_count": len(self.idx_lines),
                "bytes": self.path.stat().st_size, "samples": self.samples, "offsets": self.offsets,
                "sizes": self.sizes}


def _check_out(out: Path, force: bool = False) -> None:
    try:
        if out.exists() and not out.is_dir():
            raise DataError(f"{out} is a file: write shards into a new or empty folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise DataError(f"{out} is not empty: write shards into a new or empty folder, or pass --force to "
                            f"replace the shards there")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write shards to {out} ({e.strerror or e}); give a writable folder") from None


def write_shards(src, out, *, shard_bytes: int = 10**9, max_images: int | None = None, seed: int = 0,
                 progress=None, force: bool = False) -> dict:
    """Write the images of folder ``src`` (the first ``max_images`` of its order, if given) as tar
    shards of at most ``shard_bytes`` (a single larger image gets a shard of its own) into ``out``,
    stored in an order shuffled with ``seed``; returns the index. ``progress(line)`` is called after
    each shard. With ``force`` an earlier shard set in ``out`` is replaced (its index first, so a
    failure in between leaves a folder that reads as an unfinished write). A failed write removes
    the shards it had written."""
    import random

    src, out = Path(src), Path(out)
    files, labels, classes = scan_folder(src)
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"--max-images: must be at least 1, got {max_images}")
        files, labels = files[:max_images], labels[:max_images]
    _check_out(out, force)
    if force:
        for old in [out / INDEX, *out.glob("shard-*.tar"), *out.glob("shard-*.idx")]:
            old.unlink(missing_ok=True)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    try:
        return _write(out, files, labels, classes, order, shard_bytes=shard_bytes, progress=progress, src=src,
                      seed=seed)
    except BaseException as e:
        for part in [*out.glob("shard-*.tar"), *out.glob("shard-*.idx"), *out.glob(INDEX + ".tmp")]:
            part.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        from ..checkpoint.format import write_error

        raise write_error(out, e) from None


def _write(out, files, labels, classes, order, *, shard_bytes, progress, src, seed) -> dict:
    shards, suspect, unreadable, total, t0 = [], [], [], 0, time.perf_counter()
    writer = None
    for done, i in enumerate(order):
        path, label = files[i], labels[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
            unreadable.append(i)
        if writer is not None and writer.samples and writer.projected(len(data)) > shard_bytes:
            shards.append(writer.close())
            total += shards[-1]["bytes"]
            if progress:
                progress(_progress_line(shards[-1], done, len(files), total, t0))
            writer = None
        if writer is None:
            writer = _ShardWriter(out / f"shard-{len(shards):06d}.tar")
        usable = usable_bytes(data)
        if not usable:
            suspect.append(i)
        writer.add(i, f"{i:09d}", _ext(path), data, label, usable)
    shards.append(writer.close())
    total += shards[-1]["bytes"]
    if progress:
        progress(_progress_line(shards[-1], len(files), len(files), total, t0))
    index = {"format": FORMAT, "version": VERSION, "source": str(src.resolve()), "count": len(files), "seed": seed,
             "classes": classes, "labels": labels, "names": [os.path.relpath(f, src) for f in files],
             "suspect": sorted(suspect), "unreadable": sorted(unreadable), "bytes": total, "shards": shards}
    tmp = out / (INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / INDEX)
    fd = os.open(out, os.O_RDONLY)  # the folder's entries too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return index


def _mb(n: int) -> str:
    return f"{n / 1e3:.1f} kB" if n < 10**6 else f"{n / 1e6:.1f} MB" if n < 10**10 else f"{n / 1e9:.1f} GB"


def _progress_line(shard: dict, done: int, n: int, total: int, t0: float) -> str:
    rate = total / max(time.perf_counter() - t0, 1e-9) / 1e6
    return (f"{shard['file']}: {len(shard['samples'])} images, {shard['bytes'] / 1e6:.1f} MB "
            f"({done}/{n} images, {total / 1e6:.1f} MB, {rate:.0f} MB/s)")


class ShardImages:
    """The images of a shard folder, indexable like :class:`~.images.FolderImages` (same indices,
    labels and class names as the folder the shards were written from)."""

    def __init__(self, root):
        self.root = str(root)
        path = Path(root) / INDEX
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{root} has no {INDEX}: not a shard folder, or its writing did not finish "
                            f"(run ijepa-fast shard again)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({e})") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{path} is not a version-{VERSION} index of ijepa-fast shards")
        self.classes, self.labels, self.names = index["classes"], index["labels"], index["names"]
        self.suspect = index.get("suspect", [])
        self.shards = [str(Path(root) / s["file"]) for s in index["shards"]]
        self.dali_indices = [str(Path(root) / s["dali_index"]) for s in index["shards"]]
        missing = [p for p in self.shards if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{len(missing)} shard file(s) of {root} are missing, e.g. {missing[0]}")
        self.dali_shards = [k for k, s in enumerate(index["shards"]) if s["dali_count"]]  # DALI needs >= 1 sample
        self.where = [None] * len(self.labels)  # sample -> (shard number, data offset, size)
        for k, s in enumerate(index["shards"]):
            for i, off, size in zip(s["samples"], s["offsets"], s["sizes"]):
                self.where[i] = (k, off, size)
        if not self.where or None in self.where:
            raise DataError(f"{path} is inconsistent: not every one of its {len(self.labels)} samples is in a shard")
        self._fds = {}

    def __len__(self) -> int:
        return len(self.where)

    def __getstate__(self):  # open files stay in the process that opened them
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fds = {}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def name(self, i: int) -> str:
        return f"{self.shards[self.where[i][0]]}:{self.names[i]}"

    def read_bytes(self, i: int) -> bytes:
        """The stored bytes of image ``i`` (empty when its shard cannot be read)."""
        k, off, size = self.where[i]
        key = (os.getpid(), k)  # a forked worker opens its own descriptors
        try:
            if key not in self._fds:
                self._fds[key] = os.open(self.shards[k], os.O_RDONLY)
            return os.pread(self._fds[key], size, off)
        except OSError:
            return b""

    def load(self, i: int):
        return decode(io.BytesIO(self.read_bytes(i)))


def main_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_command(args) -> int:
    """``ijepa-fast shard DIR OUT [--size 1GB] [--max-images N] [--seed S]``."""
    size = parse_size(args.size)
    print(f"writing the images of {args.folder} as shards of at most {_mb(size)} into {args.out}",
          file=sys.stderr, flush=True)
    index = write_shards(args.folder, args.out, shard_bytes=size, max_images=args.max_images, seed=args.seed,
                         progress=main_progress, force=getattr(args, "force", False))
    bad = len(index["suspect"])
    print(f"{index['count']} images ({len(index['classes'])} classes) in {len(index['shards'])} shard(s), "
          f"{_mb(index['bytes'])} -> {Path(args.out) / INDEX}"
          + (f"; {bad} look unusable (copied as they are, skipped when read)" if bad else ""))
    return 0
