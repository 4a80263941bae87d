"""Which frames of a clip to decode: ``select_frames(meta, spec, sample_key=, epoch=)`` -> frame indices.

The rule, from ``SamplingSpec`` (see its docstring) and the probed ``VideoMeta``:

1. Window. Frame ``i`` (time ``meta.time_of(i)``, its presentation time, exact for VFR streams) is in the clip
   when ``start_s <= time < end_s`` (missing bounds: the whole file) and, with ``observe_until_s``,
   ``time <= observe_until_s``: no frame after the cutoff is ever returned, so none is ever decoded.
2. Count. ``num_frames`` when set; otherwise ``round(fps * seconds)`` clamped to ``[min_frames, max_frames]``,
   where ``seconds`` is the visible window: from the clip start to the earliest of its end, the end of the video
   and ``observe_until_s``.
3. A window holding no more frames than that count gives each of its frames once, in order (never duplicates,
   so the caller may get fewer frames than ``min_frames``/``num_frames``: short videos stay honest).
4. Otherwise one frame is taken per run of ``count`` equal runs of the window: the middle one (``uniform``) or a
   random one (``segment_random``) drawn from a generator seeded by ``(sample_key, epoch)`` only, so the same
   sample in the same epoch gets the same frames in any worker, process or resumed run, and another epoch gets
   others. The runs are equal in TIME:

   * constant frame rate: runs of frame indices (equal in time there, and exact): the middle frame of run ``k``
     is ``first + int((k + 0.5) * span / count)``, a random one is drawn among the run's frames;
   * variable frame rate (``meta.variable_frame_rate`` with ``frame_times_s``): the visible window (the same
     seconds as the count, see 2.) is cut into ``count`` equal time runs and each run's target time (its centre,
     or a time drawn uniformly inside it) gets the visible frame whose presentation time is nearest. An index
     split would put the frames where the frames are dense (25 fps then 12.5 fps: gaps of 0.37 s then 0.75 s for
     2 fps). Where two targets share their nearest frame (a gap in the stream longer than a run), the later
     ones move to the next free frames (the earlier ones back when the window's end is reached), so the count
     and the order rules hold; never to a frame outside the window (so never after ``observe_until_s``).

Clip bounds against the video (decided here, one rule for every caller):

* a clip starting at or after the end of the video, ending at or before its start, or with
  ``end_s <= start_s``: ``VideoError`` (bad annotation);
* a clip ending after the video: clamped to the video when the overshoot is at most ``END_TOLERANCE_S``
  (container durations and annotation rounding disagree by a frame or so), ``VideoError`` beyond that, since
  such a clip was cut from another (longer) version of the file;
* a window that holds no frame (e.g. ``observe_until_s`` before the first frame of the clip): ``VideoError``.

Spec errors (no ``fps`` and no ``num_frames``, ``min_frames > max_frames``, ...) are configuration errors and
raise ``ValueError``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from surgsigma_train.data.video.decoders import VideoError
from surgsigma_train.data.video.types import SamplingSpec, VideoMeta

END_TOLERANCE_S = 1.0  # a clip may end this far past the end of the video and is then clamped


def check_spec(spec: SamplingSpec) -> None:
    """Raise ValueError for a spec that cannot be satisfied whatever the video."""
    if spec.num_frames is not None:
        if spec.num_frames < 1:
            raise ValueError(f"SamplingSpec.num_frames must be >= 1, got {spec.num_frames}")
    elif spec.fps is None:
        raise ValueError("SamplingSpec needs fps or num_frames")
    elif not (spec.fps > 0 and math.isfinite(spec.fps)):
        raise ValueError(f"SamplingSpec.fps must be a positive number, got {spec.fps}")
    if spec.min_frames < 1 or spec.max_frames < spec.min_frames:
        raise ValueError(f"SamplingSpec needs 1 <= min_frames <= max_frames, got {spec.min_frames}, {spec.max_frames}")
    if spec.mode not in ("uniform", "segment_random"):
        raise ValueError(f"SamplingSpec.mode must be 'uniform' or 'segment_random', got {spec.mode!r}")


def sampling_seed(sample_key: str, epoch: int) -> int:
    """The 64-bit seed of segment_random jitter: a function of (sample_key, epoch) only."""
    digest = hashlib.blake2b(f"{sample_key}\x00{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _frame_times(meta: VideoMeta) -> Sequence[float]:
    if meta.frame_times_s is not None:
        return meta.frame_times_s
    return [i / meta.fps for i in range(meta.num_frames)]


def clip_window(meta: VideoMeta, spec: SamplingSpec) -> tuple[int, int, float]:
    """``(first, stop, seconds)``: frames ``first..stop-1`` are visible; ``seconds`` is the visible duration."""
    first, stop, window_start, window_end = _visible_window(meta, spec)
    return first, stop, max(0.0, window_end - window_start)


def _visible_window(meta: VideoMeta, spec: SamplingSpec) -> tuple[int, int, float, float]:
    """``(first, stop, window_start_s, window_end_s)``: visible frames and the visible time window."""
    if meta.num_frames <= 0:
        raise VideoError(meta.path, "the video has no frames")
    times = _frame_times(meta)
    video_start, video_end = times[0], meta.duration_s
    start = video_start if spec.start_s is None else spec.start_s
    end = video_end if spec.end_s is None else spec.end_s
    clip = f"clip [{start:.3f}, {end:.3f}) s"
    if start >= video_end:
        raise VideoError(meta.path, f"{clip} starts at or after the end of the {video_end:.3f} s video")
    if end <= video_start:
        raise VideoError(meta.path, f"{clip} ends at or before the first frame ({video_start:.3f} s)")
    if end <= start:
        raise VideoError(meta.path, f"{clip} is empty (end <= start)")
    if end > video_end + END_TOLERANCE_S:
        raise VideoError(meta.path, f"{clip} ends {end - video_end:.3f} s after the end of the {video_end:.3f} s video "
                                    f"(more than the {END_TOLERANCE_S:g} s tolerance)")
    end = min(end, video_end)
    first = bisect.bisect_left(times, start)
    stop = bisect.bisect_left(times, end)
    visible_end = end
    if spec.observe_until_s is not None:
        stop = min(stop, bisect.bisect_right(times, spec.observe_until_s))
        visible_end = min(visible_end, spec.observe_until_s)
    if stop <= first:
        cut = f" cut at observe_until_s={spec.observe_until_s:.3f} s" if spec.observe_until_s is not None else ""
        raise VideoError(meta.path, f"{clip}{cut} holds no frame of the video")
    return first, stop, max(start, video_start), visible_end


def frame_count(spec: SamplingSpec, seconds: float) -> int:
    """Frames wanted for a visible window of ``seconds`` (before limiting to the frames it holds)."""
    if spec.num_frames is not None:
        return spec.num_frames
    assert spec.fps is not None
    return min(spec.max_frames, max(spec.min_frames, round(spec.fps * seconds)))


def select_frames(meta: VideoMeta, spec: SamplingSpec, *, sample_key: str = "", epoch: int = 0) -> list[int]:
    """Indices (ascending, distinct) of the frames to decode for ``spec``; see the module docstring."""
    check_spec(spec)
    first, stop, window_start, window_end = _visible_window(meta, spec)
    span = stop - first
    count = frame_count(spec, max(0.0, window_end - window_start))
    if span <= count:
        return list(range(first, stop))
    if meta.variable_frame_rate and meta.frame_times_s is not None:
        return select_by_time(meta.frame_times_s, first, stop, window_start, window_end, count, spec.mode,
                              sample_key=sample_key, epoch=epoch)
    return select_by_index(first, stop, count, spec.mode, sample_key=sample_key, epoch=epoch)


def select_by_index(first: int, stop: int, count: int, mode: str, *, sample_key: str = "", epoch: int = 0) -> list[int]:
    """Constant frame rate: ``count`` equal runs of the frame indices ``first..stop-1`` (``count < stop - first``)."""
    span = stop - first
    if mode == "uniform":
        # Centre of run k is (k + 0.5) * span / count; runs are longer than one frame, so centres are distinct.
        return [first + int((k + 0.5) * span / count) for k in range(count)]
    rng = np.random.default_rng(sampling_seed(sample_key, epoch))
    bounds = [first + (k * span) // count for k in range(count + 1)]
    return [int(lo + rng.integers(hi - lo)) for lo, hi in zip(bounds, bounds[1:])]


def select_by_time(times: Sequence[float], first: int, stop: int, window_start: float, window_end: float, count: int,
                   mode: str, *, sample_key: str = "", epoch: int = 0) -> list[int]:
    """Variable frame rate: per equal time run of ``[window_start, window_end)``, the frame of ``first..stop-1``
    nearest to the run's target time (``count < stop - first``); distinct and ascending (see the module docstring)."""
    run_s = max(0.0, window_end - window_start) / count
    if mode == "uniform":
        offsets = [0.5] * count
    else:
        offsets = np.random.default_rng(sampling_seed(sample_key, epoch)).random(count).tolist()
    chosen = []
    for k, offset in enumerate(offsets):
        target = window_start + (k + offset) * run_s
        after = min(max(bisect.bisect_left(times, target, first, stop), first), stop - 1)  # first frame at/after
        before = max(after - 1, first)
        chosen.append(before if target - times[before] <= times[after] - target else after)
    # Shared nearest frames: push later picks forward, then pull back from the window's end (span > count).
    for k in range(1, count):
        chosen[k] = max(chosen[k], chosen[k - 1] + 1)
    chosen[-1] = min(chosen[-1], stop - 1)
    for k in range(count - 2, -1, -1):
        chosen[k] = min(chosen[k], chosen[k + 1] - 1)
    return chosen
