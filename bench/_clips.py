"""Deterministic synthetic H.264 test clips for the data-pipeline benchmark.

Content: a large smooth "tissue" texture panned and slowly zoomed (global motion, as an endoscope moves),
two instrument-like bars moving across it, specular highlights and mild per-frame sensor noise, so that
the encoder produces realistic P/B-frames and decoding costs what real laparoscopic footage costs
(a flat synthetic picture would decode several times faster than real video).

Encoding: libx264, yuv420p, CRF 23, preset veryfast, ONE thread, a fixed GOP (keyframe every
`gop_s` seconds, no scene-cut keyframes, B-frames on), so that seeking matters as it does on real clips.
RGB -> yuv420p (BT.601 limited range) is converted here in integer arithmetic before encoding, as
surgsigma_train/data/demo.py does: FFmpeg's own conversion inside PyAV was measured to give different
bitstreams for identical frames. Same parameters -> byte-identical files on the same software stack;
the cache key holds the parameters, this file's generator version and the PyAV/FFmpeg versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from surgsigma_train.data.demo import rgb_to_yuv420p_planes  # exact-integer conversion: deterministic mp4s

GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class ClipSpec:
    name: str
    width: int
    height: int
    fps: int = 25
    duration_s: float = 12.0
    gop_s: float = 2.0
    crf: int = 23
    seed: int = 0

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.duration_s))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scales: tuple[int, ...]) -> np.ndarray:
    """Sum of bilinearly upsampled random grids (value noise), in [0, 1]."""
    out = np.zeros((height, width), np.float32)
    weight_sum = 0.0
    for i, cell in enumerate(scales):
        gh, gw = height // cell + 2, width // cell + 2
        grid = rng.random((gh, gw), dtype=np.float32)
        ys = np.arange(height, dtype=np.float32) / cell
        xs = np.arange(width, dtype=np.float32) / cell
        y0, x0 = ys.astype(np.int32), xs.astype(np.int32)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        a = grid[y0][:, x0]
        b = grid[y0][:, x0 + 1]
        c = grid[y0 + 1][:, x0]
        d = grid[y0 + 1][:, x0 + 1]
        layer = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
        weight = 1.0 / (i + 1)
        out += weight * layer
        weight_sum += weight
    return out / weight_sum


def _frames(spec: ClipSpec):
    """Yields the RGB frames of a clip (uint8 HxWx3), deterministically from spec.seed."""
    rng = np.random.default_rng([spec.seed, spec.width, spec.height, 7])
    h, w = spec.height, spec.width
    # A texture larger than the frame, panned over time.
    th, tw = int(h * 1.5) // 2 * 2, int(w * 1.5) // 2 * 2
    base = _smooth_noise(rng, th, tw, (max(8, w // 6), max(4, w // 20), max(2, w // 80)))
    veins = _smooth_noise(rng, th, tw, (max(4, w // 40),))
    tissue = np.empty((th, tw, 3), np.float32)
    tissue[..., 0] = 150 + 90 * base
    tissue[..., 1] = 60 + 70 * base - 40 * (veins > 0.62)
    tissue[..., 2] = 55 + 50 * base - 30 * (veins > 0.62)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - 0.55 * (((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    vignette = np.clip(vignette, 0.25, 1.0)[..., None]
    noise_rng = np.random.default_rng([spec.seed, spec.width, spec.height, 11])
    for t in range(spec.num_frames):
        phase = t / spec.fps
        oy = int((th - h) / 2 + (th - h) / 2.2 * np.sin(0.21 * phase + spec.seed))
        ox = int((tw - w) / 2 + (tw - w) / 2.2 * np.sin(0.17 * phase + 1.3 * spec.seed + 0.5))
        frame = tissue[oy:oy + h, ox:ox + w].copy()
        # two instrument shafts sweeping in from the borders
        for k, (colour, speed) in enumerate((((70, 75, 85), 0.5), ((180, 185, 190), 0.33))):
            angle = 0.6 + 0.4 * np.sin(speed * phase + k)
            tip_x = w * (0.35 + 0.25 * np.sin(0.4 * phase + 2 * k))
            tip_y = h * (0.45 + 0.2 * np.cos(0.3 * phase + k))
            dist = np.abs((xx - tip_x) * np.sin(angle) - (yy - tip_y) * np.cos(angle))
            along = (xx - tip_x) * np.cos(angle) + (yy - tip_y) * np.sin(angle)
            mask = (dist < h * 0.035) & (along > 0) if k == 0 else (dist < h * 0.03) & (along < 0)
            frame[mask] = colour
        spot = np.exp(-(((xx - w * 0.55) ** 2 + (yy - h * 0.4) ** 2) / (2 * (0.05 * w) ** 2)))
        frame = frame * vignette + 120 * spot[..., None]
        frame += noise_rng.normal(0.0, 2.0, size=(h, w, 1)).astype(np.float32)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def _cache_key(spec: ClipSpec) -> str:
    import av

    recipe = {"spec": asdict(spec), "generator": GENERATOR_VERSION, "av": av.__version__,
              "ffmpeg": list(av.library_versions.get("libavcodec", ()))}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def write_clip(spec: ClipSpec, path: Path) -> None:
    import av

    gop = int(round(spec.gop_s * spec.fps))
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = {
            "crf": str(spec.crf), "preset": "veryfast", "threads": "1",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3",
        }
        stream.codec_context.thread_count = 1
        for index, frame_HWC in enumerate(_frames(spec)):
            video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p_planes(frame_HWC), format="yuv420p")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def keyframe_indices(path: Path) -> list[int]:
    """Indices (in presentation order) of the keyframes, from demuxing only."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts_key = sorted((p.pts, bool(p.is_keyframe)) for p in container.demux(stream) if p.pts is not None)
    return [i for i, (_, key) in enumerate(pts_key) if key]


def ensure_clips(specs: list[ClipSpec], cache_dir: Path, log=print) -> dict[str, Path]:
    """Generate missing clips into cache_dir (atomic rename); returns name -> path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    ignore = cache_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    paths = {}
    for spec in specs:
        path = cache_dir / f"{spec.name}-{spec.width}x{spec.height}-{spec.duration_s:g}s-{_cache_key(spec)}.mp4"
        if not path.is_file():
            log(f"  generating {path.name} ({spec.num_frames} frames) ...")
            fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=cache_dir)
            os.close(fd)
            try:
                write_clip(spec, Path(tmp))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        paths[spec.name] = path
    return paths
