"""On-disk cache of decoded (optionally resized) clip frames, shared by DataLoader workers, epochs and runs.

What is cached: exactly the frames ``load_clip`` returns, i.e. after the caller's ``Resize`` when one is given
(the cache never resizes on its own; the resize op is the caller's, named by ``Resize.name`` so a changed op
never serves stale pixels), plus the probed ``VideoMeta`` of each file, so a full hit opens no video at all.

Keys. A frames entry is keyed by the source file's identity (absolute path, size, mtime_ns, inode), the
backend that decoded it, the frame indices, and the resize (name and target size). Any change to the file
(rewritten, replaced, touched) changes its identity, so its old entries are never served again; they age out
by LRU, or ``purge_stale()`` removes them at once. Limitation: an in-place rewrite that keeps the size and
lands within the file system's timestamp granularity keeps the same identity; replacing files by rename (new
inode) is always detected.

Layout: ``<dir>/f-<key>/`` (frames) and ``<dir>/m-<key>/`` (meta), each a folder holding ``info.json`` (times,
indices, identity, ...) and, for frames, ``frames.npy`` (``np.save``, ``allow_pickle=False`` both ways).

Concurrency and atomicity. An entry is written into ``<dir>/tmp-<random>/`` and renamed onto its final name in
one ``rename``; a folder that already exists is never replaced (rename fails with ENOTEMPTY), so when two
processes write the same key the first rename wins, the second discards its copy, and readers only ever see
complete entries. Eviction renames an entry to ``trash-<random>`` before deleting it, so a reader either opens
the whole entry or gets a miss. Anything unreadable (truncated, garbled, inconsistent) is a miss and is removed.
Writes are not fsync'ed: after a power loss a damaged entry is detected and dropped like any corrupt one.

Size bound. ``max_bytes`` caps the bytes of all entries. After a write that may cross it, the cache lists all
entries and deletes the least recently used (an entry's folder mtime, refreshed on every hit) until the total is
below ``low_water * max_bytes``. Each process also re-lists every ``rescan_every`` writes, since other processes
write too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgsigma_train.data.video.decoders import VideoError
from surgsigma_train.data.video.types import VideoMeta

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or key recipe changes
_STALE_TMP_S = 3600.0  # a tmp-/trash- folder this old belongs to a writer that died


@dataclass(frozen=True)
class FileIdentity:
    """What makes a source file "the same file" for the cache."""

    path: str  # absolute, symlinks resolved
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        resolved = os.path.realpath(os.fspath(path))
        try:
            st = os.stat(resolved)
        except FileNotFoundError as exc:
            raise VideoError(os.fspath(path), "file not found") from exc
        return cls(path=resolved, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


@dataclass(frozen=True)
class Resize:
    """The caller's resize: applied to decoded frames before they are returned and cached.

    ``fn(frames_THWC, (height, width)) -> frames_THWC`` (uint8). ``name`` identifies the op in cache keys: change
    it whenever ``fn`` changes (e.g. "pil-bicubic-v1").
    """

    size_HW: tuple[int, int]
    fn: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    name: str

    def __call__(self, frames_THWC: np.ndarray) -> np.ndarray:
        out_THWC = self.fn(frames_THWC, self.size_HW)
        expected = (len(frames_THWC), *self.size_HW)
        if out_THWC.shape[:3] != expected or out_THWC.dtype != np.uint8:
            raise ValueError(f"Resize {self.name!r} returned {out_THWC.shape} {out_THWC.dtype}, expected {expected} uint8")
        return out_THWC


@dataclass(frozen=True)
class CachedFrames:
    frames_THWC: np.ndarray
    frame_indices: tuple[int, ...]
    timestamps_s: tuple[float, ...]
    backend: str


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def meta_to_json(meta: VideoMeta) -> dict[str, Any]:
    return dataclasses.asdict(meta)


def meta_from_json(data: dict[str, Any]) -> VideoMeta:
    fields = {f.name for f in dataclasses.fields(VideoMeta)}
    values = {k: v for k, v in data.items() if k in fields}
    if values.get("frame_times_s") is not None:
        values["frame_times_s"] = tuple(float(t) for t in values["frame_times_s"])
    values["notes"] = tuple(values.get("notes", ()))
    return VideoMeta(**values)


class FrameCache:
    """A directory of decoded clips; see the module docstring. Safe to share between processes."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, *, low_water: float = 0.9,
                 rescan_every: int = 64):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.low_water = low_water
        self.rescan_every = rescan_every
        self._approx_bytes: int | None = None  # this process's estimate of the total; None: list the directory
        self._writes_since_scan = 0
        self.stats = {"hits": 0, "misses": 0, "writes": 0, "evicted": 0, "corrupt": 0}

    # ---- keys ---------------------------------------------------------------------------------------------------
    @staticmethod
    def frames_key(identity: FileIdentity, backend: str, indices: Sequence[int], resize: Resize | None) -> str:
        return _digest({
            "format": CACHE_FORMAT, "kind": "frames", "source": dataclasses.asdict(identity), "backend": backend,
            "indices": [int(i) for i in indices],
            "resize": None if resize is None else {"name": resize.name, "size_HW": list(resize.size_HW)},
        })

    @staticmethod
    def meta_key(identity: FileIdentity, backend: str) -> str:
        return _digest({"format": CACHE_FORMAT, "kind": "meta", "source": dataclasses.asdict(identity),
                        "backend": backend})

    # ---- frames -------------------------------------------------------------------------------------------------
    def get_frames(self, key: str) -> CachedFrames | None:
        entry = self.directory / f"f-{key}"
        try:
            with open(entry / "info.json", encoding="utf-8") as fh:
                info = json.load(fh)
            frames_THWC = np.load(entry / "frames.npy", allow_pickle=False)
            indices = tuple(int(i) for i in info["frame_indices"])
            times = tuple(float(t) for t in info["timestamps_s"])
            if (frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3
                    or len(frames_THWC) != len(indices) or len(times) != len(indices)
                    or list(frames_THWC.shape) != info["shape"]):
                raise ValueError(f"entry does not match its info: {frames_THWC.shape} {frames_THWC.dtype}")
            result = CachedFrames(frames_THWC, indices, times, str(info["backend"]))
        except FileNotFoundError:
            self.stats["misses"] += 1
            return None
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:  # a damaged entry: drop it, decode again
            self.stats["corrupt"] += 1
            self.stats["misses"] += 1
            self._remove(entry, reason=f"corrupt ({type(exc).__name__}: {exc})")
            return None
        self._touch(entry)
        self.stats["hits"] += 1
        return result

    def put_frames(self, key: str, identity: FileIdentity, frames_THWC: np.ndarray, frame_indices: Sequence[int],
                   timestamps_s: Sequence[float], backend: str) -> None:
        info = {
            "format": CACHE_FORMAT, "source": dataclasses.asdict(identity), "backend": backend,
            "frame_indices": [int(i) for i in frame_indices], "timestamps_s": [float(t) for t in timestamps_s],
            "shape": list(frames_THWC.shape), "created": time.time(),
        }
        frames_THWC = np.ascontiguousarray(frames_THWC, dtype=np.uint8)
        self._commit(f"f-{key}", info, lambda tmp: np.save(tmp / "frames.npy", frames_THWC, allow_pickle=False))

    # ---- metadata -----------------------------------------------------------------------------------------------
    def get_meta(self, identity: FileIdentity, backends: Sequence[str]) -> VideoMeta | None:
        """The cached meta of this exact file from the first of ``backends`` that has one."""
        for backend in backends:
            entry = self.directory / f"m-{self.meta_key(identity, backend)}"
            try:
                with open(entry / "info.json", encoding="utf-8") as fh:
                    info = json.load(fh)
                meta = meta_from_json(info["meta"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.stats["corrupt"] += 1
                self._remove(entry, reason=f"corrupt ({type(exc).__name__}: {exc})")
                continue
            self._touch(entry)
            return meta
        return None

    def put_meta(self, identity: FileIdentity, meta: VideoMeta) -> None:
        info = {"format": CACHE_FORMAT, "source": dataclasses.asdict(identity), "meta": meta_to_json(meta),
                "created": time.time()}
        self._commit(f"m-{self.meta_key(identity, meta.backend)}", info, None)

    # ---- maintenance --------------------------------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every committed entry."""
        found = []
        for item in os.scandir(self.directory):
            if not item.name.startswith(("f-", "m-")):
                continue
            try:
                size = sum(f.stat().st_size for f in os.scandir(item.path))
                found.append((Path(item.path), size, item.stat().st_mtime))
            except FileNotFoundError:  # evicted by another process while we looked
                continue
        return found

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, target_bytes: int | None = None) -> int:
        """Delete least recently used entries until the total is <= target (default low_water * max_bytes)."""
        target = int(self.low_water * self.max_bytes) if target_bytes is None else target_bytes
        self._clean_leftovers()
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        removed = 0
        for entry, size, _ in entries:
            if total <= target:
                break
            if self._remove(entry, reason="evicted"):
                removed += 1
            total -= size  # gone, by us or by another process
        self._approx_bytes = total
        self._writes_since_scan = 0
        self.stats["evicted"] += removed
        return removed

    def purge_stale(self) -> int:
        """Delete every entry whose source file is gone or has changed since it was cached."""
        removed = 0
        for entry, _, _ in self.entries():
            try:
                with open(entry / "info.json", encoding="utf-8") as fh:
                    source = json.load(fh)["source"]
                current = dataclasses.asdict(FileIdentity.of(source["path"]))
            except (OSError, ValueError, KeyError, TypeError, VideoError):
                current = None
                source = {}
            if current != source and self._remove(entry, reason="stale"):
                removed += 1
        return removed

    # ---- internals ----------------------------------------------------------------------------------------------
    def _commit(self, name: str, info: dict[str, Any], write_payload: Callable[[Path], None] | None) -> None:
        final = self.directory / name
        if final.exists():
            return
        tmp = self.directory / f"tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            if write_payload is not None:
                write_payload(tmp)
            with open(tmp / "info.json", "w", encoding="utf-8") as fh:
                json.dump(info, fh)
            size = sum(f.stat().st_size for f in os.scandir(tmp))
            try:
                os.rename(tmp, final)
            except OSError:  # ENOTEMPTY/EEXIST: another process committed this key first; its copy is as good
                shutil.rmtree(tmp, ignore_errors=True)
                return
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.stats["writes"] += 1
        self._writes_since_scan += 1
        if self._approx_bytes is None or self._writes_since_scan >= self.rescan_every:
            self._approx_bytes = self.total_bytes()
            self._writes_since_scan = 0
        else:
            self._approx_bytes += size
        if self._approx_bytes > self.max_bytes:
            self.evict()

    def _touch(self, entry: Path) -> None:
        try:
            os.utime(entry)  # LRU clock: the folder's mtime is its last use
        except FileNotFoundError:
            pass

    def _remove(self, entry: Path, reason: str) -> bool:
        trash = self.directory / f"trash-{uuid.uuid4().hex}"
        try:
            os.rename(entry, trash)  # atomic: readers see the whole entry or nothing
        except FileNotFoundError:
            return False  # someone else removed it
        shutil.rmtree(trash, ignore_errors=True)
        if reason != "evicted":
            logger.warning("frame cache: removed %s entry %s", reason, entry.name)
        return True

    def _clean_leftovers(self) -> None:
        now = time.time()
        for item in os.scandir(self.directory):
            if item.name.startswith(("tmp-", "trash-")):
                try:
                    if now - item.stat().st_mtime > _STALE_TMP_S or item.name.startswith("trash-"):
                        shutil.rmtree(item.path, ignore_errors=True)
                except FileNotFoundError:
                    continue
