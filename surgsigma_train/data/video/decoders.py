"""Frame-exact video decoding behind one interface: decord, PyAV and torchcodec.

``open_video(path, backend="auto")`` returns a ``VideoReader`` (a context manager):

* ``reader.meta`` -> ``VideoMeta``: frame count, fps, duration, size and the presentation time of every frame,
  read from the container's packets without decoding a single frame (the probe);
* ``reader.get_frames(indices)`` -> ``(frames_THWC uint8, times_s)``: exactly those frames, in the order asked,
  with their real presentation times (seconds from the start of the file, ``pts * time_base``);
* ``reader.close()``: releases the native decoder at once (``with`` does it for you).

Frame ``i`` means the i-th frame in presentation order, for every backend (checked by tests on the same files).

Backends and how each decodes only what is asked
------------------------------------------------
* ``decord`` (default when installed): ``VideoReader.get_batch``, which seeks to the keyframe before each
  requested frame and decodes forward to it. decord indexes every packet when it opens a file, so its frame
  count and times are counted, not read from the header. Its times are float32 (exact to < 0.5 ms for videos
  under 2 h; rounded here to the microsecond).
  Memory (measured, decord 0.6.0, 640x272 H.264, 8 random frames per clip, RSS): a decord reader that stays
  referenced holds ~18.5 MiB (400 unreleased readers: 53 MiB -> 7.4 GiB), so any lingering reference (a list,
  a traceback) leaks fast; one long-lived reader serving 1,600 ``get_batch`` calls grew 55 -> 108 MiB. Opening
  one reader per clip and freeing it at ``close()`` (decord's native free, called at once rather than left to
  the garbage collector) stayed flat: 72 -> 87 MiB over 1,600 clips. So readers here live for one clip.
  AVI (no real pts) with B-frames: decord's times are garbage (~ -9.2e15 s) and ``get_batch`` returned the wrong
  frame for some indices, differently from run to run (frame 19 came back as frame 7 in ~1 of 3 runs); the
  decord backend refuses such files and "auto" moves on to PyAV, which counts frames from the start there.
* ``pyav``: the probe demuxes the stream once (packets only: no decoding) to get every frame's pts and the
  keyframes. ``get_frames`` seeks to the keyframe at or before each target and decodes forward until the
  frame with the target's pts comes out; frames decoded on the way are not converted to RGB, nothing after the
  target is pulled from the decoder, and a target in the same GOP after the last one continues without seeking.
* ``torchcodec``: the same PyAV probe, handed to torchcodec as ``custom_frame_mappings`` (frame-exact without
  torchcodec's own full scan), then ``get_frames_at(indices)``. Needs PyAV installed for the probe.

``backend="auto"`` takes decord, then PyAV, then torchcodec (whichever import) and falls back to the next when a
backend cannot open the file (decord refuses some containers that FFmpeg reads, and AVI, see below).

Metadata that lies or is missing
--------------------------------
* Frame count: always COUNTED from the packets (all three backends index the packets); the container's own
  count (0 in mkv/webm, sometimes wrong in mp4) is only compared, and a difference is written to ``meta.notes``.
* Frame times: always the per-frame pts, exposed as ``meta.frame_times_s`` (sorted, presentation order).
  ``meta.variable_frame_rate`` is True when the intervals between frames differ by more than
  max(2 time_base ticks, 2 % of the median interval); ``time_of`` is exact either way.
* fps: the container's average rate when it agrees (within 1 %) with the rate measured from the frame times;
  otherwise (missing, lying, or a VFR stream) the measured one, ``(n - 1) / (t_last - t_first)``, with a note.
  A 1-frame video has no measurable rate: the container's, else 1 / its duration, else 1.0 (noted).
* Duration: end of the last frame (its pts + the median frame interval), in file time.
* Rotation metadata is ignored (frames come out as stored); the size is the coded display size.

Errors
------
Everything wrong with a FILE raises ``VideoError(path, reason)`` (a ``MediaError``, so the dataset's drop rule
catches it): missing file, 0 bytes, not a media file, no video stream (audio-only), no decodable frame, a frame
index outside the file, a decoder error while decoding. An unusable BACKEND (``backend="torchcodec"`` when it
does not import) raises ``BackendUnavailableError`` instead: a configuration error that must stop the run, not
drop every sample.

Native crashes and hangs cannot be caught in-process: ``isolation.py`` runs probe/decode in a child process.

What decord 0.6.0 does on corrupt and truncated files (measured on this stack, libx264 320x240 25 fps 120-frame
clips in three layouts: mp4 with moov at the end, mp4 with ``movflags=+faststart``, mkv; 40 corrupted variants
of each: 50 random byte flips anywhere, a 16 B-4 KiB random chunk, truncation at a random point, 8 byte flips
in the first 8 KiB; each run in its own process with a 30 s limit: open, ``len``, ``get_batch(range(len))``,
compare with PyAV's decode of the intact file):

* no segfault, no abort and no hang in any of the 120 runs (max 5.2 s); the process always survived;
* truncated mp4 with the moov at the end (10/10): ``RuntimeError("Error reading <path>...")`` at open;
  0-byte and text files the same; an audio-only file: ``decord.DECORDError`` ("cannot find video stream");
* truncated faststart mp4: opens with ``len`` = the packets still present (60 of 120 for a cut at 50 %), frames
  before the cut decode fine, the last, partial packet and beyond raise ``DECORDError`` ("avcodec_send_packet")
  from ``get_batch``; the reader stays usable after that error (2 of 10 raised ``DECORDError`` already at open);
* truncated mkv (10/10): NO error: ``len`` silently shrinks to the frames present and those decode correctly;
* byte flips or random chunks in the payload (60/60 over all layouts): NO error: ``len`` stays 120 and
  ``get_batch`` returns frames with visible corruption (FFmpeg's error concealment), i.e. garbage frames are
  returned silently; a damaged mkv header either loses frames silently (``len`` < 120) or fails at open;
* errors are ``decord._ffi.base.DECORDError`` (a plain ``Exception`` subclass) or ``RuntimeError``, with
  FFmpeg's own messages on stderr.

So decord never tells a damaged payload from a good one; neither does any FFmpeg-based decoder with default
error concealment. What this module guarantees is the type: every decord error becomes a ``VideoError``.
The experiment: ``tests/data/video/test_video_decord_corrupt.py`` (the reproducible subset, one child per file).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
import importlib
import json
import math
import os
import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from types import ModuleType, TracebackType
from typing import Any, ClassVar

import numpy as np

from surgsigma_train.data.media import MediaError
from surgsigma_train.data.video.types import VideoMeta

# Order tried by backend="auto". PyAV before torchcodec: both are frame-exact here, and importing torchcodec imports
# torch (~2.7 s and ~200 MB per process), which a decoder child process should not pay when decord fails on a file.
BACKEND_ORDER: tuple[str, ...] = ("decord", "pyav", "torchcodec")

# A stream is variable-frame-rate when some interval differs from the median one by more than this many
# time_base ticks (timestamps are rounded to ticks: 29.97 fps in mkv's 1 ms ticks alternates 33/34 ms)...
_VFR_TOLERANCE_TICKS = 2
# ...and by more than this fraction of the median interval.
_VFR_TOLERANCE_REL = 0.02
# The container's fps is kept when it agrees with the measured one within this fraction.
_FPS_AGREEMENT_REL = 0.01


class VideoError(MediaError):
    """A video file that cannot be used: missing, empty, not a video, undecodable, or an impossible request."""

    def __reduce__(self) -> tuple[type[VideoError], tuple[str, str]]:  # picklable across processes
        return (type(self), (self.path, self.reason))


class BackendUnavailableError(RuntimeError):
    """The requested decoder backend is not installed or does not import (a configuration error)."""


# ---------------------------------------------------------------------------------------------------------------
# Backend discovery
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _import_or_none(module: str) -> ModuleType | None:
    """The module if it imports here, else None (torchcodec's wheels fail to import on some machines)."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError):  # OSError/RuntimeError: a native library fails to load
        return None


def _backend_importable(name: str) -> bool:
    if name == "decord":
        return _import_or_none("decord") is not None
    if name == "pyav":
        return _import_or_none("av") is not None
    if name == "torchcodec":  # probed with PyAV (see module docstring)
        return _import_or_none("av") is not None and _import_or_none("torchcodec.decoders") is not None
    raise ValueError(f"unknown video backend {name!r}; choose from {', '.join(BACKEND_ORDER)} or 'auto'")


def available_backends() -> list[str]:
    """Backends that import here, in the order ``backend="auto"`` tries them."""
    return [name for name in BACKEND_ORDER if _backend_importable(name)]


def backend_version(name: str) -> str:
    """The installed version of a backend's package, for run records."""
    module = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}[name]
    imported = _import_or_none(module)
    return str(getattr(imported, "__version__", "unknown")) if imported is not None else "not installed"


def candidate_backends(backend: str) -> list[str]:
    """The backends ``open_video`` may try, in order, WITHOUT importing them (importing torchcodec imports torch,
    seconds per process: "auto" only pays for it when decord and PyAV both fail on a file)."""
    if backend == "auto":
        return list(BACKEND_ORDER)
    if backend not in BACKEND_ORDER:
        raise ValueError(f"unknown video backend {backend!r}; choose from {', '.join(BACKEND_ORDER)} or 'auto'")
    return [backend]


# ---------------------------------------------------------------------------------------------------------------
# Metadata from frame times
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerHeader:
    """What the container header claims (read by PyAV without decoding)."""

    num_frames: int  # 0 when the container does not store it (mkv, webm)
    fps: float | None  # average rate, None when absent
    duration_s: float | None
    width: int
    height: int
    codec: str
    no_real_pts: bool = False  # AVI: packet pts are invented by the demuxer (see PacketIndex.sequential)


def _build_meta(
    path: str,
    backend: str,
    times_s: Sequence[float],
    header: ContainerHeader,
    tick_s: float,
    extra_notes: Sequence[str] = (),
) -> VideoMeta:
    """VideoMeta from the counted, sorted frame times; differences from the header become notes."""
    num_frames = len(times_s)
    if num_frames == 0:
        raise VideoError(path, "no decodable video frame (empty video stream)")
    notes: list[str] = list(extra_notes)
    if header.num_frames != num_frames:
        claimed = f"says {header.num_frames}" if header.num_frames > 0 else "does not say"
        notes.append(f"num_frames counted from packets: {num_frames} (the container {claimed})")

    intervals = [b - a for a, b in zip(times_s, times_s[1:])]
    median_interval = statistics.median(intervals) if intervals else 0.0
    variable = bool(intervals) and median_interval > 0 and any(
        abs(step - median_interval) > max(_VFR_TOLERANCE_TICKS * tick_s, _VFR_TOLERANCE_REL * median_interval)
        for step in intervals
    )
    span_s = times_s[-1] - times_s[0]
    measured_fps = (num_frames - 1) / span_s if num_frames >= 2 and span_s > 0 else None
    header_fps = header.fps if header.fps and math.isfinite(header.fps) and header.fps > 0 else None

    if measured_fps is not None:
        if header_fps is not None and not variable and abs(header_fps - measured_fps) <= _FPS_AGREEMENT_REL * measured_fps:
            fps = header_fps
        else:
            fps = measured_fps
            why = "variable frame rate" if variable else (
                f"the container says {header_fps:g}" if header_fps is not None else "the container has none"
            )
            notes.append(f"fps measured from frame times: {measured_fps:.6g} ({why})")
    elif header_fps is not None:
        fps = header_fps
    elif header.duration_s and header.duration_s > 0:
        fps = 1.0 / header.duration_s
        notes.append(f"fps taken as 1 / duration ({fps:.6g}): a single frame and no rate in the container")
    else:
        fps = 1.0
        notes.append("fps unknown (a single frame, no rate or duration in the container): 1.0 assumed")

    frame_duration_s = median_interval if median_interval > 0 else 1.0 / fps
    duration_s = times_s[-1] + frame_duration_s
    if variable:
        notes.append("variable frame rate: use frame_times_s (time_of) for frame times")
    return VideoMeta(
        path=path,
        num_frames=num_frames,
        fps=float(fps),
        duration_s=float(duration_s),
        width=header.width,
        height=header.height,
        codec=header.codec,
        variable_frame_rate=variable,
        frame_times_s=tuple(float(t) for t in times_s),
        backend=backend,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# PyAV probe: header and packet index (no decoding)
# ---------------------------------------------------------------------------------------------------------------


def _av_error_types() -> tuple[type[BaseException], ...]:
    av = _import_or_none("av")
    assert av is not None
    # FFmpegError covers every libav* error; OSError/ValueError: PyAV's own checks and file access.
    return (av.FFmpegError, OSError, ValueError)


def _open_container(path: str) -> Any:
    import av

    try:
        return av.open(path, mode="r")
    except _av_error_types() as exc:
        raise VideoError(path, f"not a readable media file ({type(exc).__name__}: {exc})") from exc


def _video_stream(container: Any, path: str) -> Any:
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams})
        has = f"only {', '.join(kinds)} streams" if kinds else "no streams"
        raise VideoError(path, f"no video stream (the file has {has})")
    return container.streams.video[0]


def _header_of(stream: Any, container: Any) -> ContainerHeader:
    rate = stream.average_rate or stream.guessed_rate
    duration_s = None
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / 1_000_000  # AV_TIME_BASE
    codec_context = stream.codec_context
    return ContainerHeader(
        num_frames=int(stream.frames or 0),
        fps=float(rate) if rate else None,
        duration_s=duration_s,
        width=int(codec_context.width),
        height=int(codec_context.height),
        codec=str(codec_context.name or ""),
        no_real_pts=_has_no_real_pts(container),
    )


def probe_header(path: str) -> ContainerHeader:
    """Open with PyAV and read the header only: raises VideoError for non-media and video-less files."""
    known = _SCANS.header(path)
    if known is not None:
        return known
    container = _open_container(path)
    try:
        header = _header_of(_video_stream(container, path), container)
    finally:
        container.close()
    _SCANS.put(path, header, None)
    return header


@dataclass(frozen=True)
class PacketIndex:
    """Every frame of the video stream, from its packets: pts (sorted, presentation order) and keyframes.

    ``sequential``: the container has no usable presentation timestamps (AVI, whose demuxer invents packet pts
    that do not follow B-frame reordering; or packets without pts). Then ``pts`` holds the sorted DTS (frame
    spacing right, exact without B-frames) and frames can only be identified by counting decoder output from
    the start of the stream, never by pts after a seek.
    """

    pts: tuple[int, ...]  # in time_base units
    keyframes: tuple[int, ...]  # indices into pts of keyframe packets, ascending
    durations: tuple[int, ...]  # in time_base units (the next frame's pts minus this one's; last: median)
    time_base: Fraction
    sequential: bool = False

    def times_s(self) -> list[float]:
        return [float(p * self.time_base) for p in self.pts]

    def keyframe_at_or_before(self, index: int) -> int:
        position = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[position] if position >= 0 else 0


class _ScanMemo:
    """Per-process memory of (header, packet index) per file identity (path, size, mtime, inode).

    SurgΣ-DB draws many clips from one procedure video, and an hour of 25 fps video is 90,000 packets: a
    sample must not demux the whole file again (nor re-read its header) when this process already did.
    Bounded by the total number of frames remembered; a rewritten file has a new identity and is scanned anew.
    """

    def __init__(self, max_frames: int = 2_000_000):
        self.max_frames = max_frames
        self._entries: OrderedDict[tuple[str, int, int, int], tuple[ContainerHeader, PacketIndex | None]] = OrderedDict()
        self._frames = 0

    @staticmethod
    def _identity(path: str) -> tuple[str, int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)

    def get(self, path: str) -> tuple[ContainerHeader, PacketIndex | None] | None:
        key = self._identity(path)
        entry = self._entries.get(key) if key is not None else None
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def header(self, path: str) -> ContainerHeader | None:
        entry = self.get(path)
        return entry[0] if entry is not None else None

    def put(self, path: str, header: ContainerHeader, index: PacketIndex | None) -> None:
        key = self._identity(path)
        if key is None:
            return
        old = self._entries.pop(key, None)
        if old is not None and old[1] is not None:
            self._frames -= len(old[1].pts)
        if index is None and old is not None:
            index = old[1]  # a header-only put must not forget a scan
        self._entries[key] = (header, index)
        self._frames += len(index.pts) if index is not None else 0
        while self._frames > self.max_frames and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._frames -= len(dropped.pts) if dropped is not None else 0

    def clear(self) -> None:
        self._entries.clear()
        self._frames = 0


_SCANS = _ScanMemo()


def _header_and_index(container: Any, stream: Any, path: str) -> tuple[ContainerHeader, PacketIndex]:
    """The header and packet index of an open container: from this process's memory, else read and remembered."""
    known = _SCANS.get(path)
    if known is not None and known[1] is not None:
        return known[0], known[1]
    header = _header_of(stream, container)
    index = scan_packets(container, stream, path)
    _SCANS.put(path, header, index)
    return header, index


def _has_no_real_pts(container: Any) -> bool:
    return "avi" in str(container.format.name).split(",")


def scan_packets(container: Any, stream: Any, path: str) -> PacketIndex:
    """Demux the whole video stream once (packets only, nothing decoded)."""
    entries: list[tuple[int, bool]] = []
    sequential = _has_no_real_pts(container)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard or packet.is_corrupt:
                # flush packet at EOF; samples an edit list discards; a packet the demuxer knows is damaged (the
                # partial last packet of a truncated file): the decoder cannot give a frame for it
                continue
            if packet.pts is None:
                sequential = True
            timestamp = packet.dts if sequential or packet.pts is None else packet.pts
            if timestamp is None:
                raise VideoError(path, "video packets carry no timestamps (raw elementary stream?): remux to mp4/mkv")
            entries.append((int(timestamp), bool(packet.is_keyframe)))
    except _av_error_types() as exc:
        # A damaged container can end its packet stream early; what was read so far is still a valid index
        # only if something was read, otherwise the file is unusable.
        if not entries:
            raise VideoError(path, f"cannot read video packets ({type(exc).__name__}: {exc})") from exc
    entries.sort()
    pts = tuple(p for p, _ in entries)
    keyframes = tuple(i for i, (_, key) in enumerate(entries) if key)
    steps = [b - a for a, b in zip(pts, pts[1:])]
    last = int(statistics.median(steps)) if steps else 1
    durations = tuple(steps) + ((max(last, 1),) if pts else ())
    return PacketIndex(pts=pts, keyframes=keyframes or ((0,) if pts else ()), durations=durations,
                       time_base=Fraction(stream.time_base), sequential=sequential)


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


class VideoReader(ABC):
    """One open video file. Use as a context manager, or call close(): native decoders hold memory and fds."""

    backend: ClassVar[str]

    def __init__(self, path: str):
        self.path = path
        self._meta: VideoMeta | None = None
        self._closed = False

    @property
    def meta(self) -> VideoMeta:
        assert self._meta is not None
        return self._meta

    def get_frames(self, indices: Sequence[int]) -> tuple[np.ndarray, list[float]]:
        """The frames at ``indices`` (frame numbers in presentation order), in that order, and their times.

        Each distinct frame is decoded once (repeated indices are copies). Returns ``frames_THWC`` (uint8) and
        ``times_s`` (presentation time of each returned frame, seconds from the start of the file).
        """
        if self._closed:
            raise ValueError(f"{self.path}: reader is closed")
        wanted = [int(i) for i in indices]
        meta = self.meta
        for index in wanted:
            if not 0 <= index < meta.num_frames:
                raise VideoError(self.path, f"frame {index} out of range: the video has {meta.num_frames} frames")
        if not wanted:
            return np.zeros((0, meta.height, meta.width, 3), np.uint8), []
        unique = sorted(set(wanted))
        frames_by_index = self._decode_sorted(unique)
        if unique != wanted:  # another order, or repeats: copies of the frames decoded once
            position = {index: k for k, index in enumerate(unique)}
            frames_by_index = frames_by_index[[position[i] for i in wanted]]
        return np.ascontiguousarray(frames_by_index), [meta.time_of(i) for i in wanted]

    @abstractmethod
    def _decode_sorted(self, indices: list[int]) -> np.ndarray:
        """frames_THWC for the sorted, distinct, in-range ``indices``."""

    def _stack(self, frames: list[np.ndarray]) -> np.ndarray:
        shapes = {frame.shape for frame in frames}
        if len(shapes) != 1:
            raise VideoError(self.path, f"frame size changes within the stream ({sorted(shapes)})")
        return np.stack(frames)

    @abstractmethod
    def _release(self) -> None:
        """Free the native decoder."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only; callers close explicitly
        if not getattr(self, "_closed", True):
            self.close()


class DecordReader(VideoReader):
    """decord 0.6: ``get_batch`` seeks to keyframes and decodes forward (see the module docstring)."""

    backend = "decord"

    def __init__(self, path: str, *, threads: int = 1):
        super().__init__(path)
        import decord

        self._decord = decord
        # A PyAV header read first gives the same errors and messages as the other backends (audio-only, not a
        # video) and the size/codec without decoding; decord has no accessor for them.
        header = probe_header(path) if _import_or_none("av") is not None else None
        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        except (decord.DECORDError, RuntimeError, AssertionError) as exc:
            # AssertionError: decord asserts a frame count > 0 after opening
            self._closed = True
            raise VideoError(path, f"decord cannot open it ({_first_line(exc)})") from exc
        try:
            num_frames = len(self._reader)
            times_s = [round(float(t), 6) for t in self._reader.get_frame_timestamp(np.arange(num_frames))[:, 0]]
            if not _plausible_times(times_s) or (header is not None and header.no_real_pts):
                # Measured on AVI with B-frames: decord's times are AV_NOPTS_VALUE nonsense (about -9.2e15 s) and
                # get_batch returns the WRONG frame for some indices, differently from run to run. Refuse.
                raise VideoError(path, "decord is not frame-exact on containers without presentation timestamps "
                                       "(AVI): use pyav")
            if header is None:
                first = self._reader.get_batch([0]).asnumpy()  # decord has no size accessor: decode frame 0
                header = ContainerHeader(num_frames=num_frames, fps=float(self._reader.get_avg_fps()), duration_s=None,
                                 width=int(first.shape[2]), height=int(first.shape[1]), codec="")
            self._meta = _build_meta(path, self.backend, times_s, header, tick_s=1e-6)
        except VideoError:  # before RuntimeError: VideoError is one
            self.close()
            raise
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            self.close()
            raise VideoError(path, f"decord cannot index it ({_first_line(exc)})") from exc

    def _decode_sorted(self, indices: list[int]) -> np.ndarray:
        try:
            return self._reader.get_batch(indices).asnumpy()
        except (self._decord.DECORDError, RuntimeError) as exc:
            raise VideoError(self.path, f"decord failed to decode frames {_span(indices)} ({_first_line(exc)})") from exc

    def _release(self) -> None:
        reader = self.__dict__.pop("_reader", None)
        if reader is not None and getattr(reader, "_handle", None) is not None:
            # decord frees its native reader only in __del__; call it now (not at some later GC) and clear the
            # handle so the real __del__ does not free it twice.
            reader.__del__()
            reader._handle = None


class PyAVReader(VideoReader):
    """PyAV: packet index from a demux scan, then seek to the keyframe and decode forward to each target."""

    backend = "pyav"

    def __init__(self, path: str, *, threads: int = 1):
        super().__init__(path)
        self._container = _open_container(path)
        try:
            self._stream = _video_stream(self._container, path)
            header, self.index = _header_and_index(self._container, self._stream, path)
            self._meta = _build_meta(path, self.backend, self.index.times_s(), header,
                                     tick_s=float(self.index.time_base), extra_notes=_index_notes(self.index))
            self._codec = self._stream.codec_context
            self._codec.thread_count = threads
        except BaseException:
            self.close()
            raise
        self._frames: Any = None  # decoded-frame iterator, positioned after self._last
        self._last: int | None = None  # index of the last frame the decoder handed out
        self._wanted_pts: frozenset[int] | None = None  # packets that must be decoded whatever their kind
        self._skipped_pts: set[int] = set()  # packets the current iterator read with skip_frame=NONREF

    def _index_of_pts(self, pts: int) -> int | None:
        position = bisect.bisect_left(self.index.pts, pts)
        return position if position < len(self.index.pts) and self.index.pts[position] == pts else None

    def _iter_frames(self) -> Any:
        # Packet by packet, so a suspended iterator keeps the frames the decoder already produced, and nothing
        # is asked of the decoder beyond the frame we stop at.
        # A non-reference frame (most B-frames) that is not wanted cannot change any other frame's pixels, so the
        # decoder is told to skip it (skip_frame=NONREF for that packet): wanted frames come out bit-identical
        # (tested against a full sequential decode) and a 12 s 720p clip with B-frames decodes ~1.4x faster.
        # Not with counted frames (no real pts): skipped frames would shift the count.
        self._skipped_pts = set()
        skipping = False
        self._codec.skip_frame = "DEFAULT"  # a previous iterator may have left it at NONREF
        for packet in self._container.demux(self._stream):
            wanted = self._wanted_pts
            if wanted is not None and not self.index.sequential:
                skip = packet.pts is not None and packet.pts not in wanted
                if skip != skipping:
                    self._codec.skip_frame = "NONREF" if skip else "DEFAULT"
                    skipping = skip
                if skip:
                    self._skipped_pts.add(packet.pts)  # (reference frames among them are decoded all the same)
            yield from self._codec.decode(packet)

    def _seek_to(self, index: int) -> None:
        self._container.seek(self.index.pts[index], stream=self._stream, backward=True, any_frame=False)
        self._frames = self._iter_frames()
        self._last = None

    def _decode_one_counting(self, target: int) -> np.ndarray:
        """Containers without real pts: the n-th frame out of the decoder, from the start, is frame n."""
        if self._frames is None or self._last is None or self._last >= target:
            self._container.seek(0, backward=True, any_frame=False)
            self._frames = self._iter_frames()
            self._last = -1
        for frame in self._frames:
            self._last += 1
            if self._last == target:
                return frame.to_ndarray(format="rgb24")
        raise VideoError(self.path, f"the decoder produced only {self._last + 1} frames; frame {target} is missing")

    def _decode_one(self, target: int) -> np.ndarray:
        if self.index.sequential:
            return self._decode_one_counting(target)
        keyframe = self.index.keyframe_at_or_before(target)
        if self._frames is None or self._last is None or self._last >= target or keyframe > self._last:
            self._seek_to(keyframe)
        for attempt in range(2):
            for frame in self._frames:
                index = self._index_of_pts(frame.pts) if frame.pts is not None else None
                if index is None:
                    continue  # a frame the index does not know (e.g. error concealment): never a target
                self._last = index
                if index == target:
                    return frame.to_ndarray(format="rgb24")
                if index > target:
                    break  # the seek landed after the target
            if attempt == 0:  # the container's seek was off: decode from the first frame instead
                self._seek_to(0)
        raise VideoError(self.path, f"the decoder never produced frame {target} (pts {self.index.pts[target]})")

    def _decode_sorted(self, indices: list[int]) -> np.ndarray:
        wanted = frozenset(self.index.pts[i] for i in indices)
        if self._frames is not None and not wanted.isdisjoint(self._skipped_pts):
            self._frames = None  # the current iterator may have skipped a packet wanted now: seek afresh
        self._wanted_pts = wanted
        try:
            return self._stack([self._decode_one(i) for i in indices])
        except _av_error_types() as exc:
            self._frames = None
            raise VideoError(self.path, f"PyAV failed to decode frames {_span(indices)} ({type(exc).__name__}: {exc})") from exc

    def _release(self) -> None:
        self._frames = None
        container = self.__dict__.pop("_container", None)
        if container is not None:
            container.close()


class TorchCodecReader(VideoReader):
    """torchcodec ``get_frames_at``, seeded with the PyAV packet index so it need not scan the file itself."""

    backend = "torchcodec"

    def __init__(self, path: str, *, threads: int = 1):
        super().__init__(path)
        from torchcodec.decoders import VideoDecoder

        container = _open_container(path)
        try:
            stream = _video_stream(container, path)
            stream_index = int(stream.index)
            header, self.index = _header_and_index(container, stream, path)
        finally:
            container.close()
        if self.index.sequential:
            # torchcodec seeks by pts; without real pts it loses frames (measured on AVI with B-frames)
            raise VideoError(path, "torchcodec needs presentation timestamps, which this container (AVI) lacks")
        self._meta = _build_meta(path, self.backend, self.index.times_s(), header, tick_s=float(self.index.time_base))
        keyframes = set(self.index.keyframes)
        mappings = json.dumps({"frames": [
            {"pts": pts, "duration": duration, "key_frame": int(i in keyframes)}
            for i, (pts, duration) in enumerate(zip(self.index.pts, self.index.durations))
        ]})
        try:
            self._decoder = VideoDecoder(path, stream_index=stream_index, dimension_order="NHWC",
                                         num_ffmpeg_threads=threads, custom_frame_mappings=mappings)
        except (RuntimeError, ValueError) as exc:
            self._closed = True
            raise VideoError(path, f"torchcodec cannot open it ({_first_line(exc)})") from exc

    def _decode_sorted(self, indices: list[int]) -> np.ndarray:
        try:
            batch = self._decoder.get_frames_at(indices)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise VideoError(self.path, f"torchcodec failed to decode frames {_span(indices)} ({_first_line(exc)})") from exc
        expected = [float(self.index.pts[i] * self.index.time_base) for i in indices]
        got = batch.pts_seconds.tolist()
        if any(abs(a - b) > 1e-6 for a, b in zip(expected, got)):
            raise VideoError(self.path, f"torchcodec returned frames at {got[:4]}... s, expected {expected[:4]}... s")
        return batch.data.numpy()

    def _release(self) -> None:
        self.__dict__.pop("_decoder", None)


_READERS: dict[str, type[VideoReader]] = {"decord": DecordReader, "pyav": PyAVReader, "torchcodec": TorchCodecReader}


def open_video(path: str | os.PathLike[str], backend: str = "auto", *, threads: int = 1) -> VideoReader:
    """Open ``path`` with ``backend`` ("auto", "decord", "pyav", "torchcodec"); the reader's ``meta`` is ready.

    ``threads``: decoder threads per reader (1 by default: DataLoader workers already decode in parallel).
    With "auto", a backend that cannot open the file hands over to the next; a file no backend opens raises
    one ``VideoError`` listing each backend's reason. Missing, empty, non-media and video-less files are
    refused before any backend is tried.
    """
    path = os.fspath(path)
    names = candidate_backends(backend)
    if backend != "auto" and not _backend_importable(backend):
        raise BackendUnavailableError(f"video backend {backend!r} is not installed or does not import here")
    if backend == "auto" and _import_or_none("av") is None and _import_or_none("decord") is None:
        raise BackendUnavailableError("no video decoder installed: pip install 'surgsigma_train[video]' (decord, av)")
    if not os.path.exists(path):
        raise VideoError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")
    if _import_or_none("av") is not None:
        probe_header(path)  # the same clear error whichever backend would have been used
    failures: list[str] = []
    for name in names:
        if len(names) > 1 and not _backend_importable(name):
            continue
        try:
            return _READERS[name](path, threads=threads)
        except VideoError as exc:
            failures.append(f"{name}: {exc.reason}")
    if len(failures) == 1:
        raise VideoError(path, failures[0].split(": ", 1)[1])
    raise VideoError(path, "no backend can read it (" + "; ".join(failures) + ")")


def probe(path: str | os.PathLike[str], backend: str = "auto") -> VideoMeta:
    """The VideoMeta of ``path`` (opens, indexes and closes; decodes nothing with PyAV/torchcodec)."""
    with open_video(path, backend) as reader:
        return reader.meta


def _index_notes(index: PacketIndex) -> list[str]:
    if not index.sequential:
        return []
    return ["no presentation timestamps in the container (e.g. AVI): frame times from DTS, frames found by "
            "decoding from the start"]


def _plausible_times(times_s: Sequence[float]) -> bool:
    return all(math.isfinite(t) and t > -1e6 for t in times_s) and all(b > a for a, b in zip(times_s, times_s[1:]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _span(indices: Sequence[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])
