"""Clip-accurate video pipeline: probe (``decoders``), choose frames (``sampling``), decode once (``pipeline``),
optionally in a crash-proof child process (``isolation``) and through an on-disk frame cache (``cache``).

Importing this package loads no decoder library; backends are imported on first use.
"""

from surgsigma_train.data.video.cache import FileIdentity, FrameCache, Resize
from surgsigma_train.data.video.decoders import (
    BackendUnavailableError,
    VideoError,
    VideoReader,
    available_backends,
    backend_version,
    open_video,
    probe,
)
from surgsigma_train.data.video.isolation import (
    DecoderCrashedError,
    DecoderTimeoutError,
    IsolatedDecoder,
    probe_in_subprocess,
)
from surgsigma_train.data.video.pipeline import decode_clip, load_clip
from surgsigma_train.data.video.sampling import select_frames
from surgsigma_train.data.video.types import SamplingSpec, VideoClip, VideoMeta

__all__ = [
    "BackendUnavailableError",
    "DecoderCrashedError",
    "DecoderTimeoutError",
    "FileIdentity",
    "FrameCache",
    "IsolatedDecoder",
    "Resize",
    "SamplingSpec",
    "VideoClip",
    "VideoError",
    "VideoMeta",
    "VideoReader",
    "available_backends",
    "backend_version",
    "decode_clip",
    "load_clip",
    "open_video",
    "probe",
    "probe_in_subprocess",
    "select_frames",
]
