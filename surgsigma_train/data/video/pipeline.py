"""``load_clip``: probe, select, decode once, and return a ``VideoClip`` with real timestamps.

Order of work, each step done at most once per call:

1. With a ``cache``: the file's identity (path, size, mtime_ns, inode) -> cached ``VideoMeta`` -> ``select_frames``
   -> cached frames. A full hit opens no video at all.
2. Otherwise open the file (in-process, or in the child process with ``isolate``), probe, ``select_frames``,
   ``get_frames`` for exactly those indices, close.
3. ``resize`` (the caller's op) is applied to the decoded frames; the result is what the cache stores.

``VideoClip.extra`` carries ``cache`` ("hit", "miss" or "off"), ``isolated`` (bool) and ``notes`` (what the
probe counted or derived, from ``VideoMeta.notes``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from surgsigma_train.data.video.cache import FileIdentity, FrameCache, Resize
from surgsigma_train.data.video.decoders import candidate_backends, open_video
from surgsigma_train.data.video.isolation import IsolatedDecoder, default_isolated_decoder
from surgsigma_train.data.video.sampling import check_spec, select_frames
from surgsigma_train.data.video.types import SamplingSpec, VideoClip, VideoMeta


def decode_clip(path: str, spec: SamplingSpec, *, backend: str = "auto", sample_key: str = "", epoch: int = 0,
                threads: int = 1, frame_indices: Sequence[int] | None = None,
                ) -> tuple[VideoMeta, list[int], np.ndarray, list[float]]:
    """In-process: ``(meta, indices, frames_THWC, times_s)`` from one open of the file.

    ``frame_indices``: decode exactly these (chosen by a planner from the same file's metadata) instead of
    ``select_frames(spec)``."""
    with open_video(path, backend, threads=threads) as reader:
        meta = reader.meta
        indices = (list(frame_indices) if frame_indices is not None
                   else select_frames(meta, spec, sample_key=sample_key, epoch=epoch))
        frames_THWC, times_s = reader.get_frames(indices)
    return meta, indices, frames_THWC, times_s


def load_clip(
    path: str | os.PathLike[str],
    spec: SamplingSpec,
    *,
    backend: str = "auto",
    sample_key: str = "",
    epoch: int = 0,
    cache: FrameCache | None = None,
    isolate: bool | IsolatedDecoder = False,
    resize: Resize | None = None,
    threads: int = 1,
    timeout_s: float | None = None,
    frame_indices: Sequence[int] | None = None,
    meta: VideoMeta | None = None,
) -> VideoClip:
    """The frames of ``spec``'s clip of ``path``; raises ``VideoError`` for a bad file or an empty clip.

    ``isolate``: True uses this process's shared decoder child, an ``IsolatedDecoder`` uses that one
    (``timeout_s`` bounds the request; default the decoder's). ``sample_key``/``epoch`` seed segment_random.
    ``frame_indices`` (with the ``meta`` they were chosen from): decode exactly these frames, as a token
    planner chose them, instead of ``select_frames(spec)``.
    """
    path = os.fspath(path)
    check_spec(spec)
    backends = candidate_backends(backend)
    identity = FileIdentity.of(path) if cache is not None else None

    if cache is not None and identity is not None:
        meta = meta or cache.get_meta(identity, backends)
        if meta is not None:
            indices = (list(frame_indices) if frame_indices is not None
                       else select_frames(meta, spec, sample_key=sample_key, epoch=epoch))
            hit = cache.get_frames(FrameCache.frames_key(identity, meta.backend, indices, resize))
            if hit is not None:
                return _clip(path, meta, hit.frames_THWC, list(hit.frame_indices), list(hit.timestamps_s),
                             cache_state="hit", isolated=False)

    if isolate is not False:
        decoder = isolate if isinstance(isolate, IsolatedDecoder) else default_isolated_decoder()
        meta, indices, frames_THWC, times_s = decoder.load(path, spec, backend=backend, sample_key=sample_key,
                                                           epoch=epoch, threads=threads, timeout_s=timeout_s,
                                                           frame_indices=frame_indices)
    else:
        meta, indices, frames_THWC, times_s = decode_clip(path, spec, backend=backend, sample_key=sample_key,
                                                          epoch=epoch, threads=threads, frame_indices=frame_indices)
    if resize is not None:
        frames_THWC = resize(frames_THWC)

    if cache is not None and identity is not None:
        cache.put_meta(identity, meta)
        key = FrameCache.frames_key(identity, meta.backend, indices, resize)
        cache.put_frames(key, identity, frames_THWC, indices, times_s, meta.backend)
    return _clip(path, meta, frames_THWC, indices, times_s, cache_state="off" if cache is None else "miss",
                 isolated=isolate is not False)


def _clip(path: str, meta: VideoMeta, frames_THWC: np.ndarray, indices: list[int], times_s: list[float], *,
          cache_state: str, isolated: bool) -> VideoClip:
    return VideoClip(
        frames_THWC=frames_THWC,
        frame_indices=tuple(indices),
        timestamps_s=tuple(times_s),
        source_fps=meta.fps,
        source_num_frames=meta.num_frames,
        backend=meta.backend,
        path=path,
        extra={"cache": cache_state, "isolated": isolated, "notes": meta.notes, "meta": meta},
    )
