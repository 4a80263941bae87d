"""Shared types of the video pipeline: what a container says, what to sample, what was decoded.

Times are seconds from the start of the file (presentation time), never from the start of a clip,
so a frame's time means the same thing in every stage and in every log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class VideoMeta:
    """What the container says, read without decoding frames (probe)."""

    path: str
    num_frames: int  # decodable video frames (counted or from the container when trusted)
    fps: float  # average frame rate
    duration_s: float
    width: int
    height: int
    codec: str = ""
    variable_frame_rate: bool = False
    frame_times_s: tuple[float, ...] | None = None  # per-frame presentation times when known (needed for VFR)
    backend: str = ""
    notes: tuple[str, ...] = ()  # what was counted or derived because the container's metadata was missing or wrong

    def time_of(self, index: int) -> float:
        if self.frame_times_s is not None:
            return self.frame_times_s[index]
        return index / self.fps


@dataclass(frozen=True)
class SamplingSpec:
    """Which frames of a clip to decode. Per dataset, overridable per sample.

    The clip is [start_s, end_s) of the file, further cut at observe_until_s: no frame whose time is
    after observe_until_s is ever decoded (action-remaining-time and next-action tasks must not see
    the future). Frame count: fps * clip duration, clamped to [min_frames, max_frames]; or exactly
    num_frames when set.
    """

    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 2
    max_frames: int = 32
    mode: Literal["uniform", "segment_random"] = "uniform"  # segment_random: jitter seeded by sample id + epoch
    start_s: float | None = None
    end_s: float | None = None
    observe_until_s: float | None = None


@dataclass(frozen=True)
class VideoClip:
    """Frames decoded for one clip, with where and when they came from."""

    frames_THWC: np.ndarray  # uint8
    frame_indices: tuple[int, ...]  # indices into the source file
    timestamps_s: tuple[float, ...]  # presentation time of each frame in the source file
    source_fps: float
    source_num_frames: int
    backend: str
    path: str
    extra: dict = field(default_factory=dict, compare=False)
