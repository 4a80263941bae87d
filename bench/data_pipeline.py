#!/usr/bin/env python
"""Data-pipeline benchmark: how fast we build video conversation training samples, against two references.

    .venv/bin/python bench/data_pipeline.py            # full run (~8-10 min; the first run also installs LLaMA-Factory)
    .venv/bin/python bench/data_pipeline.py --quick    # smoke run (< 1 min once clips and LLaMA-Factory exist)

Measures samples/s and frames/s of OUR pipeline (SampleEncoder -> SFTDataset -> PadCollator -> build_loader:
video decode, frame sampling, Qwen2.5-VL preprocessing, tokenisation, labels, collation) per decoder backend
(decord, PyAV, torchcodec: each one that is importable and accepted by VideoConfig), with 1 and 2 DataLoader
workers, on deterministic synthetic H.264 clips (480p and 720p, 12 s, 25 fps, keyframe every 2 s), against

  (a) the raw decode floor: the same backend only seeking to and decoding the same frames (RGB uint8 out; no
      resize, processor or tokenizer), in the same DataLoader set-up;
  (b) LLaMA-Factory's SFT preprocessing + collation of the same samples (qwen2_vl template, Qwen2VLPlugin,
      PyAV reader, HF processor, tokenisation, labels), pinned in its own virtual environment that this
      script installs (default bench/.venv-llamafactory) and run by bench/_llamafactory_side.py.

Both sides get the same files, the same frame count (16), the same pixel budget (video max_pixels, default
360*420 as in Qwen2.5-VL's video example), the same min_pixels and the same conversation text; the script
checks and prints that both produce the same visual tokens (video grid, <|video_pad|> count, patch rows) and
the same text, and stops if they do not. All pipelines are timed by the same code (bench/_timing.py), in
interleaved rounds (median of the rounds per configuration), all in DataLoader workers, batch size 1.
`--frame-cache` adds our pipeline with a warm on-disk frame cache (what epochs after the first cost); it is
reported separately and is not part of the ratios.

The last line is `ratio_vs_llamafactory=X ratio_vs_decode_floor=Y`: X = our best samples/s (best backend)
/ LLaMA-Factory's samples/s at the same worker count (the largest measured); Y = our samples/s / the decode
floor's with the same backend and workers (the configuration of X). samples/s are for a 50/50 mix of the two
clips (total samples / total time). See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from _clips import ClipSpec, ensure_clips  # noqa: E402
from _timing import loader_kwargs, measure_loader  # noqa: E402

FAMILY = "qwen2_5_vl"
LLAMAFACTORY_VERSION = "0.9.5"
TORCH_SPEC = "torch==2.13.0"
PINS_FILE = BENCH_DIR / "llamafactory-pins.txt"
DEFAULT_LF_VENV = BENCH_DIR / ".venv-llamafactory"
CLIPS = {
    "480p": ClipSpec("bench480p", 854, 480, fps=25, duration_s=12.0, gop_s=2.0, seed=0),
    "720p": ClipSpec("bench720p", 1280, 720, fps=25, duration_s=12.0, gop_s=2.0, seed=1),
}
VIDEO_PAD = "<|video_pad|>"
# A SurgΣ-DB-like two-turn video conversation (loss on both assistant turns, as LLaMA-Factory does by default).
TURNS = [
    ("user", "<video>\nDescribe what happens in this laparoscopic clip: which instruments are used, on which "
             "structure, and what the surgeon is doing."),
    ("assistant", "A grasper retracts the gallbladder fundus upwards while a hook electrode dissects the "
                  "peritoneum over the hepatocystic triangle. The cystic duct and cystic artery are being "
                  "exposed; there is no bleeding and the field is clear."),
    ("user", "Which surgical phase is this?"),
    ("assistant", "Calot triangle dissection."),
]
BACKEND_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}


def log(message: str = "") -> None:
    print(message, flush=True)


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return machine_load()


def dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


# --------------------------------------------------------------------------------------------------------
# Isolation: the parent process never decodes video. Forking DataLoader workers after FFmpeg has run in the
# parent was seen to hang a worker inside FFmpeg; so setup work that touches video runs in a forked child.
# --------------------------------------------------------------------------------------------------------
def in_worker(fn: Callable[[], Any]) -> Any:
    from torch.utils.data import DataLoader

    return next(iter(DataLoader([0], batch_size=1, num_workers=1, collate_fn=lambda _batch: fn())))


# --------------------------------------------------------------------------------------------------------
# LLaMA-Factory environment
# --------------------------------------------------------------------------------------------------------
def ensure_llamafactory_venv(venv: Path) -> Path:
    """Creates/updates the pinned LLaMA-Factory venv; returns its python. Idempotent (marker = pins hash)."""
    python = venv / "bin" / "python"
    pins = PINS_FILE.read_text()
    digest = hashlib.sha256((TORCH_SPEC + "\n" + pins).encode()).hexdigest()[:16]
    marker = venv / ".surgsigma-bench-installed"
    if python.exists() and marker.is_file() and marker.read_text().strip() == digest:
        return python
    log(f"installing LLaMA-Factory {LLAMAFACTORY_VERSION} into {venv} (one time, ~1 min) ...")
    if marker.is_file():  # ours, from other pins: start afresh rather than layering versions
        import shutil

        shutil.rmtree(venv)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    if not python.exists():
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    # Self-ignoring folder (what virtualenv and uv write), so the venv never shows up in `git status`.
    (venv / ".gitignore").write_text("*\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first (CPU wheel); then every package at an exact version with --no-deps, so that nothing can
    # pull a CUDA torch, torchvision or torchaudio.
    subprocess.run(pip + [TORCH_SPEC], check=True)
    subprocess.run(pip + ["--no-deps", "-r", str(PINS_FILE)], check=True)
    marker.write_text(digest + "\n")
    return python


class LlamaFactorySide:
    """The LLaMA-Factory process (bench/_llamafactory_side.py in its venv), driven by JSON lines."""

    def __init__(self, python: Path, spec: dict[str, Any], log_path: Path):
        spec_path = log_path.with_suffix(".spec.json")
        spec_path.write_text(json.dumps(spec))
        self.log_file = open(log_path, "w")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [str(python), str(BENCH_DIR / "_llamafactory_side.py"), str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env,
        )
        self.info = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@RESULT "):
                return json.loads(line[len("@@RESULT "):])
            self.log_file.write(line)
        raise RuntimeError(f"the LLaMA-Factory process ended (exit {self.proc.wait()}); see {self.log_file.name}")

    def request(self, **command: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(result["error"])
        return result

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.request_quit()
                self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log_file.close()

    def request_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()


# --------------------------------------------------------------------------------------------------------
# Decode floor: seek + decode the same frames, RGB uint8, nothing else
# --------------------------------------------------------------------------------------------------------
def floor_decord(path: str, indices: list[int]) -> int:
    import decord

    # As surgsigma_train's decord reader: one decoder thread (workers give the parallelism).
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    frames = reader.get_batch(indices).asnumpy()
    return int(frames.shape[0])


def floor_pyav(path: str, indices: list[int], collect: list | None = None) -> int:
    """Seeks to the keyframe before a target only when the target lies beyond the next keyframe; otherwise
    decodes forward. Like surgsigma_train's PyAV reader, it tells the decoder to skip the non-reference frames
    that are not wanted (skip_frame=NONREF for those packets): the least decoding that still gives exact frames.
    One decoder thread (DataLoader workers give the parallelism), as surgsigma_train's PyAV reader."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1
        packets = sorted((p.pts, bool(p.is_keyframe)) for p in container.demux(stream) if p.pts is not None)
        pts = [p for p, _ in packets]
        keys = [i for i, (_, key) in enumerate(packets) if key]
        wanted = {pts[i] for i in indices}

        def decode_from_here():
            for packet in container.demux(stream):
                codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
                yield from codec.decode(packet)

        out, position, frames = 0, None, None
        for target in sorted(indices):
            keyframe = keys[bisect_left(keys, target + 1) - 1]
            if frames is None or position is None or keyframe > position + 1:
                container.seek(pts[keyframe], backward=True, any_frame=False, stream=stream)
                frames = decode_from_here()
                position = None
            while position is None or position < target:
                frame = next(frames)
                position = bisect_left(pts, frame.pts)
            rgb = frame.to_ndarray(format="rgb24")
            if collect is not None:
                collect.append(rgb)
            out += 1
    return out


def check_floor_pyav(path: str, indices: list[int]) -> bool:
    """The seeking floor decodes exactly the frames a plain sequential decode gives at those indices."""
    import av
    import numpy as np

    seeking: list = []
    floor_pyav(path, indices, seeking)
    wanted, sequential = set(indices), []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                sequential.append(frame.to_ndarray(format="rgb24"))
            if i >= max(indices):
                break
    return len(seeking) == len(sequential) and all(np.array_equal(a, b) for a, b in zip(seeking, sequential))


def floor_torchcodec(path: str, indices: list[int]) -> int:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, num_ffmpeg_threads=1)
    return int(decoder.get_frames_at(indices=list(indices)).data.shape[0])


FLOOR_DECODERS = {"decord": floor_decord, "pyav": floor_pyav, "torchcodec": floor_torchcodec}


# --------------------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------------------
def video_config_kwargs(video_config_class: Any, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """VideoConfig options for this run, for the schema as it is (the video layer is being reworked): exactly
    `args.frames` uniformly sampled frames, the pixel budget, and no frame cache (every sample is decoded)."""
    fields = video_config_class.model_fields
    kwargs: dict[str, Any] = {"backend": backend, "video_min_pixels": args.min_pixels,
                              "video_max_pixels": args.max_pixels}
    if "num_frames" in fields:
        kwargs["num_frames"] = args.frames
    if "sampling" in fields:
        kwargs["sampling"] = {"num_frames": args.frames, "mode": "uniform"}
    if "cache_dir" in fields:
        kwargs["cache_dir"] = None
    return kwargs


def new_encoder(encoder_class: Any, processor: Any, family: Any, data_cfg: Any, video_cfg: Any) -> Any:
    """SampleEncoder(processor, [family,] data_cfg, video_cfg), whichever signature the library has."""
    import inspect

    available = {"processor": processor, "family": family, "data_cfg": data_cfg, "video_cfg": video_cfg}
    params = inspect.signature(encoder_class.__init__).parameters
    return encoder_class(**{name: value for name, value in available.items() if name in params})


def sampled_frame_indices(encoder: Any, sample: Any) -> list[int]:
    """The source-frame indices our encoder decodes for this sample (through its own media loading)."""
    import inspect

    text, _spans = encoder.render_with_spans(encoder.conversation(sample))
    params = inspect.signature(encoder.load_media).parameters
    loaded = encoder.load_media(sample, text) if "text" in params else encoder.load_media(sample)
    return [int(i) for i in loaded[1][0].frame_indices]


class OurSide:
    def __init__(self, clips: dict[str, Path], args: argparse.Namespace):
        from pydantic import ValidationError

        from surgsigma_train.config.schema import DataConfig, DataSource, VideoConfig
        from surgsigma_train.data.encode import SampleEncoder
        from surgsigma_train.data.loader import PadCollator
        from surgsigma_train.models.registry import get_family

        self.clips, self.args = clips, args
        family = get_family(FAMILY)
        self.processor = family.build_processor(
            "tiny", image_min_pixels=args.min_pixels, image_max_pixels=args.max_pixels,
            video_min_pixels=args.min_pixels, video_max_pixels=args.max_pixels,
        )
        self.tokenizer = self.processor.tokenizer
        self.video_pad_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.collator = PadCollator(self.tokenizer.pad_token_id)
        data_cfg = DataConfig(train=[DataSource(path="bench")], max_seq_len=args.cutoff_len)
        self.encoders: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        for backend in args.backends:
            if importlib.util.find_spec(BACKEND_MODULES[backend]) is None:
                self.skipped[backend] = "not importable"
                continue
            try:
                video_cfg = VideoConfig(**video_config_kwargs(VideoConfig, backend, args))
            except ValidationError:
                self.skipped[backend] = "importable, but not a surgsigma_train VideoConfig.backend (floor only)"
                continue
            self.encoders[backend] = new_encoder(SampleEncoder, self.processor, family, data_cfg, video_cfg)
        self.floor_backends = [b for b in args.backends if importlib.util.find_spec(BACKEND_MODULES[b])]
        # Optional: the same pipeline reading decoded frames from the reworked video layer's on-disk frame
        # cache (warm: what every epoch after the first costs). Not part of X or Y.
        self.cached_encoders: dict[str, Any] = {}
        if args.frame_cache and "cache_dir" in VideoConfig.model_fields and self.encoders:
            import shutil

            backend = "pyav" if "pyav" in self.encoders else next(iter(self.encoders))
            cache_dir = args.cache_dir / "frame-cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            kwargs = video_config_kwargs(VideoConfig, backend, args)
            kwargs["cache_dir"] = str(cache_dir)
            self.cached_encoders[backend] = new_encoder(SampleEncoder, self.processor, family, data_cfg,
                                                        VideoConfig(**kwargs))

    def sample(self, clip: str):
        from surgsigma_train.data.sample import MediaRef, Message, Sample

        path = self.clips[clip]
        return Sample(id=f"bench-{clip}", messages=tuple(Message(role, text) for role, text in TURNS),
                      media=(MediaRef("video", path.name),), task="video_captioning",
                      source_video=f"bench-{clip}", media_root=str(path.parent))

    # ---- checks (in a worker) ----
    def frame_indices(self) -> dict[str, list[int]]:
        """The source frames our reader samples for each clip (what the floor decodes)."""
        def run() -> dict[str, list[int]]:
            encoder = next(iter(self.encoders.values()))
            return {clip: sampled_frame_indices(encoder, self.sample(clip)) for clip in self.clips}

        return in_worker(run)

    def check(self, backend: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            results = {}
            for clip in self.clips:
                encoded = self.encoders[backend].encode(self.sample(clip))
                ids = encoded.input_ids
                grid = encoded.vision["video_grid_thw"].tolist()
                results[clip] = {
                    "video_tokens": int((ids == self.video_pad_id).sum()),
                    "pixel_rows": int(encoded.vision["pixel_values_videos"].shape[0]),
                    "grid_thw": grid,
                    "frames": int(grid[0][0]) * 2,
                    "seq_len": int(ids.numel()),
                    "loss_tokens": int((encoded.labels != -100).sum()),
                    "text": self.tokenizer.decode(ids[ids != self.video_pad_id]),
                }
            return results

        return in_worker(run)

    # ---- measurements ----
    def measure(self, backend: str, clip: str, workers: int, num_batches: int, warmup: int,
                cached: bool = False) -> dict[str, float]:
        from surgsigma_train.data.loader import SFTDataset, build_loader

        count = (warmup + num_batches) * self.args.batch_size
        encoder = self.encoders[backend] if not cached else self.cached_encoders[backend]
        if cached:  # fill the cache first (in a worker: the parent never decodes)
            in_worker(lambda: encoder.encode(self.sample(clip)) and None)
        dataset = SFTDataset([self.sample(clip)] * count, encoder)
        loader = build_loader(dataset, None, self.collator, workers, batch_size=self.args.batch_size)

        def samples_in(batch) -> int:
            if batch.dropped:
                raise RuntimeError(f"sample dropped: {batch.dropped[0].reason}")
            return batch.num_samples

        return measure_loader(loader, num_batches, warmup, samples_in)

    def measure_floor(self, backend: str, clip: str, indices: list[int], workers: int, num_batches: int,
                      warmup: int) -> dict[str, float]:
        import torch
        from torch.utils.data import DataLoader

        decode = FLOOR_DECODERS[backend]
        path = str(self.clips[clip])

        class FloorDataset(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return (warmup + num_batches) * batch_size

            def __getitem__(self, index: int) -> int:
                return decode(path, indices)

        batch_size = self.args.batch_size
        loader = DataLoader(FloorDataset(), batch_size=batch_size, shuffle=False, collate_fn=list,
                            **loader_kwargs(workers))
        return measure_loader(loader, num_batches, warmup, len)

    # ---- profile (in a worker) ----
    def profile(self, backend: str, clip: str, n: int) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            import cProfile
            import io
            import pstats

            encoder, sample = self.encoders[backend], self.sample(clip)
            self.collator([encoder.encode(sample)])  # warm caches
            profiler = cProfile.Profile()
            t0 = time.perf_counter()
            profiler.enable()
            for _ in range(n):
                self.collator([encoder.encode(sample)])
            profiler.disable()
            per_sample = (time.perf_counter() - t0) / n
            # Without the profiler, for the overhead estimate.
            t0 = time.perf_counter()
            for _ in range(n):
                self.collator([encoder.encode(sample)])
            plain = (time.perf_counter() - t0) / n
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            stats.sort_stats("cumulative").print_stats(35)
            return {"per_sample_s": per_sample, "plain_per_sample_s": plain, "stages": our_stages(stats, n),
                    "profile": stream.getvalue()}

        return in_worker(run)


def _cumulative(stats, filename: str, function: str) -> float | None:
    found = None
    for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        if path.endswith(filename) and name == function:
            found = max(found or 0.0, cumulative)
    return found


def our_stages(stats, n: int) -> dict[str, float | None]:
    """Per-sample seconds of each stage of SampleEncoder.encode + PadCollator (cProfile cumulative times)."""
    def get(filename: str, function: str) -> float | None:
        value = _cumulative(stats, filename, function)
        return None if value is None else value / n

    encode = get("encode.py", "encode")
    load_media = get("encode.py", "load_media")
    plan = get("encode.py", "plan_videos")  # probe + frame/pixel planning (reworked video layer)
    decode = _minus(load_media, plan)
    render = get("encode.py", "render_with_spans")
    process = get("encode.py", "_process")
    video = get("video_processor.py", "preprocess")
    resize = get("vision_ops.py", "resize_like_torchvision")
    normalise = get("vision_ops.py", "rescale_and_normalize_like_transformers")
    patchify = get("vision_ops.py", "patchify_videos")
    collate = get("loader.py", "__call__")
    stages: dict[str, float | None] = {
        "probe + token-budget planning": plan,
        "decode (reader: open, seek, decode, RGB)": decode,
        "resize (uint8 bicubic antialias)": resize,
        "rescale+normalise (float32)": normalise,
        "patchify (permute+copy)": patchify,
        "frames THWC->TCHW contiguous copy, grouping, cat": _minus(video, resize, normalise, patchify),
        "tokenise + placeholder expansion + offsets": _minus(process, video),
        "chat template render + loss spans": render,
        "labels (offset mapping -> mask)": _minus(encode, load_media, render, process),
        "collate (PadCollator)": collate,
    }
    return stages


def _minus(total: float | None, *parts: float | None) -> float | None:
    if total is None:
        return None
    return max(0.0, total - sum(p for p in parts if p is not None))


# --------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------
def mix_rate(rates: dict[str, float]) -> float:
    """samples/s of an equal mix of the clips: total samples / total time = harmonic mean of the rates."""
    return len(rates) / sum(1.0 / r for r in rates.values())


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 batches, 1 worker, no profile")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; their median is reported")
    parser.add_argument("--batches", type=int, default=12, help="measured batches per configuration and round")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--backends", default="decord,pyav,torchcodec", help="decoders to try, comma-separated")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--max-pixels", type=int, default=360 * 420, help="video max_pixels (per frame)")
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    parser.add_argument("--cutoff-len", type=int, default=16384, help="max sequence length (no truncation happens)")
    parser.add_argument("--profile-samples", type=int, default=6, help="samples per clip for the cProfile breakdown")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--frame-cache", action="store_true",
                        help="also measure our pipeline with a warm on-disk frame cache (VideoConfig.cache_dir)")
    parser.add_argument("--skip-llamafactory", action="store_true")
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="clips and tokenizer cache (default $SURGSIGMA_CACHE/bench or ~/.cache/surgsigma_train/bench)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.workers, args.no_profile = 1, 2, "1", True
    args.workers = [int(w) for w in str(args.workers).split(",")]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKEND_MODULES]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {sorted(BACKEND_MODULES)}")
    if args.cache_dir is None:
        base = os.environ.get("SURGSIGMA_CACHE")
        args.cache_dir = (Path(base).expanduser() if base else Path.home() / ".cache" / "surgsigma_train") / "bench"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    log(f"# data pipeline benchmark ({'quick' if args.quick else 'full'}): {FAMILY}, {args.frames} frames/clip, "
        f"video max_pixels={args.max_pixels} min_pixels={args.min_pixels}, batch size {args.batch_size}, "
        f"workers {args.workers}, {args.rounds} round(s) x {args.batches} batches")
    log(f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; {uptime_line()}")

    lf_python = None
    if not args.skip_llamafactory:
        lf_python = ensure_llamafactory_venv(args.lf_venv)

    clip_paths = in_worker(lambda: ensure_clips(list(CLIPS.values()), args.cache_dir / "clips", log))
    clips = {label: clip_paths[spec.name] for label, spec in CLIPS.items()}
    for label, path in clips.items():
        spec = CLIPS[label]
        log(f"# clip {label}: {path} ({spec.width}x{spec.height}, {spec.duration_s:g} s, {spec.fps} fps, "
            f"keyframe every {spec.gop_s:g} s, {path.stat().st_size // 1024} KiB)")

    lf = None
    if lf_python is not None:
        lf_spec = {
            "repo_root": str(REPO_ROOT), "tokenizer_cache": str(args.cache_dir / "lf-tokenizers"),
            "max_pixels": args.max_pixels, "min_pixels": args.min_pixels, "num_frames": args.frames,
            # LLaMA-Factory samples min(video_maxlen, duration * video_fps) frames: 2 fps * 12 s >= 16.
            "video_fps": 2.0, "cutoff_len": args.cutoff_len, "system": "",
            "turns": [list(turn) for turn in TURNS], "clips": {k: str(v) for k, v in clips.items()},
        }
        lf = LlamaFactorySide(lf_python, lf_spec, args.cache_dir / "llamafactory-side.log")
    try:
        return run(args, clips, lf, started)
    finally:
        if lf is not None:
            lf.close()


def run(args: argparse.Namespace, clips: dict[str, Path], lf: LlamaFactorySide | None, started: float) -> int:
    ours = OurSide(clips, args)
    versions = {name: dist_version(name) for name in ("torch", "transformers", "tokenizers", "decord", "av",
                                                      "torchcodec", "numpy", "pillow")}
    log("# ours: surgsigma_train " + dist_version("surgsigma_train") + ", " +
        ", ".join(f"{k} {v}" for k, v in versions.items()))
    if lf is not None:
        log(f"# LLaMA-Factory: llamafactory {lf.info['llamafactory']}, transformers {lf.info['transformers']}, "
            f"torch {lf.info['torch']}, av {lf.info['av']}; processor: {lf.info['processor']}")
    for backend, reason in ours.skipped.items():
        log(f"# backend {backend}: {reason}")
    if not ours.encoders:
        log("no usable decoder backend for surgsigma_train")
        return 1

    # ---- same work on both sides? ----
    indices = ours.frame_indices()
    checks = {backend: ours.check(backend) for backend in ours.encoders}
    lf_check = lf.request(op="check") if lf is not None else None
    log("")
    log("## Same work on both sides (per sample)")
    log("| clip | side | frames | video grid (t,h,w) | <|video_pad|> tokens | patch rows | seq len | loss tokens |")
    log("|---|---|---|---|---|---|---|---|")
    mismatch = []
    for clip in clips:
        rows = [(f"ours ({b})", checks[b][clip]) for b in checks]
        if lf_check is not None:
            rows.append(("LLaMA-Factory", lf_check[clip]))
        for side, c in rows:
            log(f"| {clip} | {side} | {c['frames']} | {c['grid_thw'][0]} | {c['video_tokens']} | {c['pixel_rows']} "
                f"| {c['seq_len']} | {c['loss_tokens']} |")
        reference = rows[0][1]
        for side, c in rows[1:]:
            for key in ("frames", "grid_thw", "video_tokens", "pixel_rows"):
                if c[key] != reference[key]:
                    mismatch.append(f"{clip}: {side} {key}={c[key]} vs {rows[0][0]} {reference[key]}")
        if lf_check is not None:
            same_text = lf_check[clip]["text"].rstrip("\n") == reference["text"].rstrip("\n")
            log(f"| {clip} | text (without video pads) identical on both sides: {'yes' if same_text else 'NO'} "
                "| | | | | | |")
            if not same_text:
                mismatch.append(f"{clip}: rendered text differs:\n ours: {reference['text']!r}\n LF:   "
                                f"{lf_check[clip]['text']!r}")
    if mismatch:
        log("\nNOT THE SAME WORK, refusing to compare:\n" + "\n".join(mismatch))
        log("(try another --max-pixels: LLaMA-Factory pre-resizes frames with PIL before smart_resize, which can "
            "land on another grid)")
        return 2
    log("frame indices decoded (ours and floor): " + "; ".join(f"{c}: {indices[c]}" for c in clips))
    if "pyav" in ours.floor_backends:
        exact = in_worker(lambda: all(check_floor_pyav(str(clips[c]), indices[c]) for c in clips))
        log(f"PyAV floor (seek to keyframe, decode forward) returns the same frames as a sequential decode: "
            f"{'yes' if exact else 'NO'}")
        if not exact:
            return 2

    # ---- interleaved measurement rounds ----
    # One configuration = (pipeline, decoder, workers), measured on each clip back to back, so that its 50/50
    # mix comes from one moment. Every round runs every configuration; the order is rotated from round to
    # round so that no pipeline always runs at the same point of a round. Reported: the median over rounds.
    configs: list[tuple[str, str, int]] = []
    for workers in args.workers:
        configs += [("ours", backend, workers) for backend in ours.encoders]
        configs += [("floor", backend, workers) for backend in ours.floor_backends]
        configs += [("ours_cached", backend, workers) for backend in ours.cached_encoders]
        if lf is not None:
            configs.append(("llamafactory", "pyav", workers))

    def measure(pipeline: str, backend: str, workers: int, clip: str) -> dict[str, float]:
        warmup = max(1, workers)
        if pipeline == "ours":
            return ours.measure(backend, clip, workers, args.batches, warmup)
        if pipeline == "ours_cached":
            return ours.measure(backend, clip, workers, args.batches, warmup, cached=True)
        if pipeline == "floor":
            return ours.measure_floor(backend, clip, indices[clip], workers, args.batches, warmup)
        assert lf is not None
        return lf.request(op="measure", clip=clip, workers=workers, num_batches=args.batches, warmup=warmup,
                          batch_size=args.batch_size)

    rounds: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    failed: set[tuple[str, str, int]] = set()
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        shift = (round_index * len(configs)) // max(1, args.rounds)
        for config in configs[shift:] + configs[:shift]:
            if config in failed:
                continue
            pipeline, backend, workers = config
            rates: dict[str, float] = {}
            try:
                for clip in clips:
                    rates[clip] = measure(pipeline, backend, workers, clip)["samples_per_s"]
            except Exception as exc:  # a floor decoder that fails here is reported, not fatal
                if pipeline != "floor":
                    raise
                log(f"# floor {backend} failed: {type(exc).__name__}: {exc}")
                failed.add(config)
                continue
            rates["mix"] = mix_rate(rates)
            rounds.setdefault(config, []).append(rates)
            log(f"  round {round_index + 1} workers={workers} {pipeline:12s} {backend:10s} " +
                "  ".join(f"{clip} {rates[clip]:6.2f}" for clip in clips) +
                f"  mix {rates['mix']:6.2f} samples/s  (load {os.getloadavg()[0]:.2f})")
    ours.floor_backends = [b for b in ours.floor_backends if ("floor", b, min(args.workers)) not in failed]

    def best(pipeline: str, backend: str, workers: int) -> dict[str, float] | None:
        runs = rounds.get((pipeline, backend, workers))
        if not runs:
            return None
        summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        summary["mix_min"] = min(run["mix"] for run in runs)
        summary["mix_max"] = max(run["mix"] for run in runs)
        return summary

    table = []
    for workers in args.workers:
        for pipeline, backends in (("ours", list(ours.encoders)), ("floor", ours.floor_backends),
                                   ("llamafactory", ["pyav"] if lf is not None else []),
                                   ("ours_cached", list(ours.cached_encoders))):
            for backend in backends:
                rates = best(pipeline, backend, workers)
                if rates is not None:
                    table.append((pipeline, backend, workers, rates))

    def lookup(pipeline: str, backend: str, workers: int) -> dict[str, float] | None:
        for p, b, w, rates in table:
            if (p, b, w) == (pipeline, backend, workers):
                return rates
        return None

    top_workers = max(args.workers)
    our_best_backend = max(ours.encoders, key=lambda b: (lookup("ours", b, top_workers) or {"mix": 0})["mix"])
    our_best = lookup("ours", our_best_backend, top_workers)
    lf_rates = lookup("llamafactory", "pyav", top_workers)
    floor_same = lookup("floor", our_best_backend, top_workers)
    floor_best_backend = max(ours.floor_backends, key=lambda b: (lookup("floor", b, top_workers) or {"mix": 0})["mix"])

    log("")
    log(f"## Throughput (median of {args.rounds} round(s); samples/s; frames/s = samples/s x {args.frames}; "
        f"mix = 50/50 480p/720p; range = min-max of the rounds' mix)")
    log(f"load during the rounds (1-min load average at each round start): {', '.join(f'{x:.2f}' for x in loads)}; "
        f"now: {uptime_line()}")
    log("| pipeline | decoder | workers | 480p samples/s | 720p samples/s | mix samples/s (range) | mix frames/s | "
        "vs LLaMA-Factory | vs decode floor |")
    log("|---|---|---|---|---|---|---|---|---|")
    names = {"ours": "surgsigma_train", "floor": "decode floor", "llamafactory": f"LLaMA-Factory {LLAMAFACTORY_VERSION}",
             "ours_cached": "surgsigma_train, warm frame cache (epoch >= 2; not in X/Y)"}
    for pipeline, backend, workers, rates in table:
        lf_same = lookup("llamafactory", "pyav", workers)
        floor_b = lookup("floor", backend, workers)
        vs_lf = rates["mix"] / lf_same["mix"] if lf_same and pipeline != "llamafactory" else None
        vs_floor = rates["mix"] / floor_b["mix"] if floor_b and pipeline.startswith("ours") else None
        log(f"| {names[pipeline]} | {backend} | {workers} | {fmt(rates['480p'])} | {fmt(rates['720p'])} | "
            f"{fmt(rates['mix'])} ({fmt(rates['mix_min'])}-{fmt(rates['mix_max'])}) | "
            f"{fmt(rates['mix'] * args.frames, 1)} | {fmt(vs_lf)} | {fmt(vs_floor)} |")

    # ---- where our time goes ----
    profile_report: dict[str, Any] = {}
    if not args.no_profile:
        log("")
        log(f"## Where the time goes (one process, cProfile, {args.profile_samples} samples per clip, "
            f"decoder {our_best_backend}; seconds per sample)")
        our_profiles = {clip: ours.profile(our_best_backend, clip, args.profile_samples) for clip in clips}
        lf_profiles = ({clip: lf.request(op="profile", clip=clip, n=args.profile_samples) for clip in clips}
                       if lf is not None else {})
        profile_report = {"ours": our_profiles, "llamafactory": lf_profiles}
        log("| stage (ours) | " + " | ".join(clips) + " | share (mix) |")
        log("|---|" + "---|" * len(clips) + "---|")
        stage_names = list(next(iter(our_profiles.values()))["stages"])
        totals = {clip: sum(v for v in our_profiles[clip]["stages"].values() if v) for clip in clips}
        for stage in stage_names:
            values = [our_profiles[clip]["stages"][stage] for clip in clips]
            share = (sum(v or 0 for v in values) / sum(totals.values())) if sum(totals.values()) else None
            log(f"| {stage} | " + " | ".join(fmt(v, 3) for v in values) + f" | {fmt(share * 100 if share is not None else None, 0)}% |")
        log("| total (profiled) | " + " | ".join(fmt(our_profiles[c]["per_sample_s"], 3) for c in clips) + " | |")
        log("| total (no profiler) | " + " | ".join(fmt(our_profiles[c]["plain_per_sample_s"], 3) for c in clips) + " | |")
        rates = lookup("ours", our_best_backend, 1)
        if rates:
            overhead = [1.0 / rates[c] - our_profiles[c]["plain_per_sample_s"] for c in clips]
            log("| DataLoader hand-off (1 worker: 1/rate - in-process time) | " +
                " | ".join(fmt(v, 3) for v in overhead) + " | |")
        if lf_profiles:
            log("")
            log("| stage (LLaMA-Factory, same samples) | " + " | ".join(clips) + " |")
            log("|---|" + "---|" * len(clips))
            for stage in next(iter(lf_profiles.values()))["stages"]:
                log(f"| {stage} | " + " | ".join(fmt(lf_profiles[c]["stages"][stage], 3) for c in clips) + " |")
            log("| total (profiled, preprocess + collate) | " +
                " | ".join(fmt(lf_profiles[c]["per_sample_s"], 3) for c in clips) + " |")

    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()},
            "table": [{"pipeline": p, "backend": b, "workers": w, **r} for p, b, w, r in table],
            "rounds": {"|".join(map(str, k)): v for k, v in rounds.items()},
            "checks": {"ours": checks, "llamafactory": lf_check}, "profile": profile_report,
            "load": loads, "uptime_end": uptime_line(),
        }, indent=1, default=str))

    for pipeline, backend, workers, rates in table:
        floor_b = lookup("floor", backend, workers)
        if pipeline == "ours" and floor_b and rates["mix"] > 1.2 * floor_b["mix"]:
            log(f"WARNING: ours ({backend}, {workers} workers) is faster than decoding alone: frames are probably "
                "served from a cache, so this is not a decode benchmark any more (disable the frame cache)")
    ratio_lf = our_best["mix"] / lf_rates["mix"] if (our_best and lf_rates) else float("nan")
    ratio_floor = our_best["mix"] / floor_same["mix"] if (our_best and floor_same) else float("nan")
    log("")
    for workers in args.workers:
        lf_w = lookup("llamafactory", "pyav", workers)
        line = []
        for backend in ours.encoders:
            mine, floor_b = lookup("ours", backend, workers), lookup("floor", backend, workers)
            if mine:
                line.append(f"{backend}: {fmt(mine['mix'] / lf_w['mix']) if lf_w else 'n/a'} x LLaMA-Factory, "
                            f"{fmt(mine['mix'] / floor_b['mix']) if floor_b else 'n/a'} x floor")
        log(f"{workers} worker(s): " + "; ".join(line))
    log(f"X: ours ({our_best_backend}, {top_workers} worker(s)) {fmt(our_best['mix'])} samples/s / LLaMA-Factory "
        f"({top_workers} worker(s)) {fmt(lf_rates['mix'] if lf_rates else None)} samples/s; target >= 3")
    log(f"Y: ours ({our_best_backend}, {top_workers} worker(s)) / decode floor ({our_best_backend}, {top_workers} "
        f"worker(s)) {fmt(floor_same['mix'] if floor_same else None)} samples/s; target >= 0.7; fastest floor: "
        f"{floor_best_backend} {fmt((lookup('floor', floor_best_backend, top_workers) or {}).get('mix'))} samples/s")
    log(f"{uptime_line()}; wall time {time.perf_counter() - started:.0f} s")
    print(f"ratio_vs_llamafactory={fmt(ratio_lf)} ratio_vs_decode_floor={fmt(ratio_floor)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
