"""Media access: paths confined to the data root, images via Pillow, video frames via decord or PyAV.

Only the sampled frames are materialised. Decoder errors become `MediaError`s naming the file, so a
bad file is reported and dropped by the dataset rather than crashing a run.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from surgsigma_train.data.sample import MediaRef

# Pillow's own guard against decompression bombs stays on; this is its limit in pixels.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class MediaError(RuntimeError):
    """A media file is missing, outside the data root, or cannot be decoded."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resolve_media_path(root: Path, relative: str) -> Path:
    """The file `relative` names under `root`; refuses absolute paths and anything resolving outside it."""
    if not relative:
        raise MediaError(relative, "empty media path")
    if Path(relative).is_absolute():
        raise MediaError(relative, f"absolute media path; media paths must be relative to the data root {root}")
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()  # resolves symlinks too
    if not candidate.is_relative_to(root_resolved):
        raise MediaError(relative, f"resolves outside the data root {root}")
    return candidate


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise MediaError(path, "file not found") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"cannot decode image ({exc})") from exc


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one clip, with where they came from."""

    frames_THWC: np.ndarray  # uint8
    frame_indices: tuple[int, ...]  # indices into the source file
    timestamps_s: tuple[float, ...]  # presentation time of each frame in the source file
    source_fps: float
    source_num_frames: int
    backend: str
    path: str


def available_backends() -> list[str]:
    return [name for name, module in (("decord", "decord"), ("pyav", "av")) if importlib.util.find_spec(module)]


def uniform_frame_indices(num_source_frames: int, fps: float, num_frames: int,
                          start_s: float | None = None, end_s: float | None = None) -> list[int]:
    """`num_frames` indices at the centres of equal segments of [start_s, end_s).

    A clip with fewer frames than requested yields each of its frames once (never duplicates).
    """
    if num_source_frames <= 0 or fps <= 0:
        raise ValueError(f"video has {num_source_frames} frames at {fps} fps")
    first = 0 if start_s is None else max(0, math.floor(start_s * fps))
    last = num_source_frames - 1 if end_s is None else min(num_source_frames - 1, math.ceil(end_s * fps) - 1)
    if last < first:
        raise ValueError(f"clip [{start_s}, {end_s}] s is empty in a {num_source_frames / fps:.2f} s video")
    span = last - first + 1
    if span <= num_frames:
        return list(range(first, last + 1))
    step = span / num_frames
    return [first + min(span - 1, int(step * (i + 0.5))) for i in range(num_frames)]


def _decode_decord(path: Path, clip: MediaRef, num_frames: int) -> VideoClip:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        fps = float(reader.get_avg_fps())
        indices = uniform_frame_indices(len(reader), fps, num_frames, clip.start_s, clip.end_s)
        frames = reader.get_batch(indices).asnumpy()
        times = [float(reader.get_frame_timestamp(i)[0]) for i in indices]
        return VideoClip(frames, tuple(indices), tuple(times), fps, len(reader), "decord", str(path))
    finally:
        del reader


def _decode_pyav(path: Path, clip: MediaRef, num_frames: int) -> VideoClip:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
        if not total and stream.duration is not None and stream.time_base is not None:
            total = int(round(float(stream.duration * stream.time_base) * fps))
        indices = uniform_frame_indices(total, fps, num_frames, clip.start_s, clip.end_s)
        wanted = set(indices)
        frames, times = [], []
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else i / fps)
            if i >= indices[-1]:
                break
    if len(frames) != len(indices):
        raise MediaError(path, f"decoded {len(frames)} of {len(indices)} requested frames (container says {total})")
    return VideoClip(np.stack(frames), tuple(indices), tuple(times), fps, total, "pyav", str(path))


_DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav}


def load_video(path: Path, clip: MediaRef, num_frames: int, backend: str = "auto") -> VideoClip:
    """Decode `num_frames` uniformly sampled frames of `clip` from `path`.

    backend="auto" tries decord, then PyAV if decord is missing or fails on this file (decord
    cannot read some containers PyAV handles); an explicit backend is used alone.
    """
    if not path.is_file():
        raise MediaError(path, "file not found")
    order = available_backends() if backend == "auto" else [backend]
    if not order:
        raise MediaError(path, "no video decoder installed (pip install 'surgsigma_train[video]')")
    failures = []
    for name in order:
        try:
            return _DECODERS[name](path, clip, num_frames)
        except MediaError as exc:
            failures.append(f"{name}: {exc.reason}")
        except Exception as exc:  # decoders raise their own error types (decord.DECORDError, av.FFmpegError, ...)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise MediaError(path, "cannot decode video (" + "; ".join(failures) + ")")
