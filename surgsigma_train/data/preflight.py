"""`surgsigma-train validate`: check every record and media file of a recipe before anything expensive runs.

What is checked, per record (the readers already refuse malformed JSON/JSONL, wrong field types, empty
conversations, missing assistant turns, placeholder/media mismatches, unknown task ids, corrupted boxes,
duplicate ids within a file, missing media and paths leaving the data root):
* ids are unique over the whole recipe, the task is a registered one, and the answer has the shape its task
  needs (boxes for localization, a number of seconds for remaining time);
* every media path resolves inside its data root (symlinks followed) to a regular file;
* every distinct VIDEO file is probed once, in child processes with a timeout (``video/isolation.py``), several
  in parallel: it must open, have a video stream, frames, a positive fps and duration and a size, and its first
  and last frames must decode at that size. A decoder that crashes natively or hangs costs that file only;
* every distinct IMAGE is fully decoded (Pillow, in threads), under the decompression-bomb limit of
  ``media.py`` and in a mode that converts to RGB faithfully (``media.image_mode_problem``);
* the planned token length (text tokenised, visual tokens planned from metadata exactly as the encoder does,
  ``stats.planned_length``) fits ``data.max_seq_len``; video clips lie inside their file;
* one clean sample of each media kind (text only, image, video) per split is then encoded for real (decoded,
  processed by the family's processor, loss mask built), so that ``validate`` fails where training would drop
  (up to 3 tries a kind; each failure is a bad sample). A token plan that disagrees with the processor is a bug
  in this project, not bad data: ``InternalError``, exit 1.
Things that train correctly but may surprise (variable frame rate, fewer frames than requested, CMYK/palette
images, an image file with a video extension) are warnings, not bad samples.

Writes ``<output.dir>/preflight/``: ``manifest.jsonl`` (one line per clean sample: split, id, task, planned
tokens), ``bad_samples.jsonl`` (split, id, file, media, reason), ``warnings.jsonl`` and ``summary.json``
(counts, reasons, ``data_fingerprint`` of the clean training samples, timings). ``train`` applies the same
``data.max_bad_fraction`` rule before it starts, with these counts when ``summary.json`` is fresh for the same data
files (``training/run.py``); the manifest itself is not read: at train time a sample that fails to load or encode is
dropped, logged and counted (data/loader.py), and too many drops stop the run (``data.max_dropped_fraction``).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.boxes import box_problem
from surgsigma_train.data.encode import EncodeError, SampleEncoder
from surgsigma_train.data.media import MediaError, image_mode_problem, resolve_media_path
from surgsigma_train.data.readers import ReadReport, read_source
from surgsigma_train.data.sample import Sample
from surgsigma_train.data.stats import planned_length
from surgsigma_train.data.tasks import get_task
from surgsigma_train.data.video import IsolatedDecoder, SamplingSpec, VideoError
from surgsigma_train.data.video.decoders import BackendUnavailableError
from surgsigma_train.data.video.planning import PlanningError
from surgsigma_train.data.video.sampling import clip_window, frame_count
from surgsigma_train.data.video.types import VideoMeta
from surgsigma_train.errors import DataError

# Codecs of still-image formats: FFmpeg opens a PNG/JPEG/... as a one-frame "video".
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "tiff", "webp", "gif", "jpeg2000", "apng"}
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Finding:
    split: str
    id: str
    file: str  # the data file of the record
    reason: str
    media: str | None = None  # the media path at fault, when a media file is the cause

    def row(self) -> dict[str, Any]:
        return {"split": self.split, "id": self.id, "file": self.file, "media": self.media, "reason": self.reason}


@dataclass
class FileCheck:
    """The outcome of checking one media file: a problem (bad) or notes (warnings), and a video's metadata."""

    problem: str | None = None
    notes: tuple[str, ...] = ()
    meta: VideoMeta | None = None


@dataclass
class PreflightResult:
    records: int = 0
    clean: list[tuple[str, Sample, int]] = field(default_factory=list)  # (split, sample, planned tokens)
    bad: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    files: list[dict[str, Any]] = field(default_factory=list)  # per data file: records, samples, bad, excluded
    reports: list[ReadReport] = field(default_factory=list)  # the readers' own reports
    read: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (samples read, source videos)
    videos_probed: int = 0
    images_checked: int = 0
    workers: int = 1
    timings_s: dict[str, float] = field(default_factory=dict)
    max_seq_len: int = 0
    max_bad_fraction: float = 0.0
    fingerprint: str = ""
    encoded: dict[tuple[str, str], str] = field(default_factory=dict)  # (split, media kind) -> id of a sample encoded

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.records if self.records else 0.0

    @property
    def ok(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records, "clean": len(self.clean), "bad": len(self.bad), "warnings": len(self.warnings),
            "excluded": dict(self.excluded), "bad_fraction": self.bad_fraction,
            "max_bad_fraction": self.max_bad_fraction, "ok": self.ok, "train_fingerprint": self.fingerprint,
            "files": self.files, "bad_reasons": dict(reason_counts(self.bad)),
            "warning_reasons": dict(reason_counts(self.warnings)), "videos_probed": self.videos_probed,
            "images_checked": self.images_checked, "workers": self.workers, "timings_s": self.timings_s,
            "encoded": {f"{split}/{kind}": sample_id for (split, kind), sample_id in self.encoded.items()},
        }


def reason_kind(reason: str) -> str:
    """A reason with its numbers and quoted values generalised, so that like problems group in the summary."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    text = re.sub(r"[^\s'\"(),;:]*/[^\s'\"(),;:]*", "<path>", text)  # missing files differ only by their path
    text = re.sub(r"\d+(?:\.\d+)?", "N", text)
    return text[:110]


def reason_counts(findings: Sequence[Finding]) -> Counter:
    return Counter(reason_kind(f.reason) for f in findings)


# ---------------------------------------------------------------- media files
def check_image(path: Path) -> FileCheck:
    """Decode the whole image (a truncated file only fails when its pixels are read)."""
    try:
        with Image.open(path) as img:  # raises over twice MAX_IMAGE_PIXELS (header only: nothing allocated)
            mode, (width, height) = img.mode, img.size
            if width * height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns up to twice it: here the limit is the limit
                return FileCheck(f"{width}x{height} is over the decompression-bomb limit of "
                                 f"{Image.MAX_IMAGE_PIXELS} pixels")
            if problem := image_mode_problem(mode):
                return FileCheck(problem)
            img.load()
    except Image.DecompressionBombError as exc:
        return FileCheck(f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels ({exc})")
    except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: Pillow's parsers use it for broken headers
        return FileCheck(f"cannot decode image ({exc})")
    notes = []
    if width < 1 or height < 1:
        return FileCheck(f"image has no pixels ({width}x{height})")
    if mode == "CMYK":
        notes.append("CMYK image: converted to RGB without a colour profile (colours approximate)")
    elif mode not in ("RGB", "L"):
        notes.append(f"image mode {mode} converted to RGB" + (" (alpha dropped)" if "A" in mode else ""))
    return FileCheck(notes=tuple(notes))


class DecoderPool:
    """One decoder child process per pool thread (the probes of different files run in parallel), all closed at
    the end."""

    def __init__(self, timeout_s: float, initializer: str | None = None, sys_path: Sequence[str] = ()):
        self.timeout_s, self.initializer, self.sys_path = timeout_s, initializer, list(sys_path)
        self._local = threading.local()
        self._all: list[IsolatedDecoder] = []
        self._lock = threading.Lock()

    def get(self) -> IsolatedDecoder:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._local.decoder = IsolatedDecoder(timeout_s=self.timeout_s, initializer=self.initializer,
                                                            sys_path=self.sys_path)
            with self._lock:
                self._all.append(decoder)
        return decoder

    def close(self) -> None:
        with self._lock:
            for decoder in self._all:
                decoder.close()
            self._all.clear()


def check_video(path: Path, backend: str, decoders: DecoderPool) -> FileCheck:
    """Probe in a child process, then decode the first and last frames there: both bounded by the pool's timeout."""
    decoder = decoders.get()
    try:
        meta = decoder.probe(path, backend)
        problem = _meta_problem(meta)
        if problem:
            return FileCheck(problem, meta=meta)
        last = meta.num_frames - 1
        _, _, frames_THWC, _ = decoder.load(path, SamplingSpec(), backend=backend, frame_indices=[0, last])
        if tuple(frames_THWC.shape[1:3]) != (meta.height, meta.width):
            return FileCheck(f"frames decode at {frames_THWC.shape[2]}x{frames_THWC.shape[1]}, the container says "
                             f"{meta.width}x{meta.height}", meta=meta)
    except VideoError as exc:  # also a crash (DecoderCrashedError) or a hang (DecoderTimeoutError) of the child
        return FileCheck(exc.reason)
    except BackendUnavailableError as exc:
        return FileCheck(f"video backend unavailable: {exc}")
    notes = []
    if meta.variable_frame_rate:
        notes.append("variable frame rate (frames are placed by their own times)")
    if meta.codec in _IMAGE_CODECS and meta.num_frames == 1:
        notes.append(f"a single {meta.codec} image, not a video (wrong file extension?)")
    return FileCheck(notes=tuple(notes), meta=meta)


def _meta_problem(meta: VideoMeta) -> str | None:
    if meta.num_frames < 1:
        return "no decodable video frame"
    if not (math.isfinite(meta.fps) and meta.fps > 0):
        return f"frame rate {meta.fps} is not a positive number"
    if not (math.isfinite(meta.duration_s) and meta.duration_s > 0):
        return f"duration {meta.duration_s} s is not positive"
    if meta.width < 1 or meta.height < 1:
        return f"no frame size ({meta.width}x{meta.height})"
    if meta.width * meta.height > Image.MAX_IMAGE_PIXELS:
        return f"frames of {meta.width}x{meta.height} are over the {Image.MAX_IMAGE_PIXELS}-pixel limit"
    return None


# ---------------------------------------------------------------- records
def answer_problem(sample: Sample) -> str | None:
    """Whether the final answer has the shape its task needs (vocabularies are not enforced: sources differ)."""
    task = get_task(sample.task)
    if task is None:
        return None
    answer = sample.messages[-1].content
    if task.answer_kind.startswith("boxes"):
        problem = box_problem(answer, expect_boxes=True)
        return f"answer not parseable as boxes: {problem}" if problem else None
    if task.answer_kind == "seconds" and not _NUMBER_RE.search(answer):
        return "answer gives no number of seconds"
    return None


class _PlannedEncoder(SampleEncoder):
    """The training encoder, with video metadata from the preflight's isolated probes (never probed in-process)."""

    metas: dict[Path, FileCheck]

    def _probe(self, path: Path) -> VideoMeta:
        check = self.metas[path]
        if check.meta is None:
            raise VideoError(path, check.problem or "not probed")
        return check.meta


def _read(cfg: RecipeConfig, result: PreflightResult) -> list[tuple[str, str, Sample]]:
    """(split, data file, sample) of every readable record; reader-level problems go to ``result.bad``."""
    out = []
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        first = len(out)
        for source in sources:
            try:
                samples, reports = read_source(source, cfg.data.task_ids)
            except DataError as exc:
                result.records += 1
                result.bad.append(Finding(split, "#source", source.path, str(exc)))
                result.files.append({"split": split, "file": source.path, "records": 1, "samples": 0, "bad": 1})
                continue
            # Samples come in report order, report.samples of each: that tells each sample's data file.
            files = [r.file for r in reports for _ in range(r.samples)]
            if len(files) != len(samples):
                files = [source.path] * len(samples)
            for sample, file in zip(samples, files):
                out.append((split, file, sample))
            result.reports += reports
            for r in reports:
                records = max(r.records, len(r.bad))  # an unreadable file is one bad "#file" record
                result.records += records
                result.excluded.update(r.excluded)
                result.bad += [Finding(split, b.record, b.file, b.reason) for b in r.bad]
                result.files.append({"split": split, "file": r.file, "records": records, "samples": r.samples,
                                     "bad": len(r.bad), "excluded": sum(r.excluded.values())})
        result.read[split] = (len(out) - first, len({s.split_key for _, _, s in out[first:]}))
    return out


def run_preflight(cfg: RecipeConfig, *, workers: int = 2, timeout_s: float | None = None,
                  write: bool = True, decoder_initializer: str | None = None,
                  decoder_sys_path: Sequence[str] = ()) -> PreflightResult:
    """Check the recipe's data fully (see the module docstring); with ``write``, the files under output.dir.

    ``workers``: decoder child processes (and image threads) working in parallel. ``timeout_s``: per video
    probe or decode (default ``video.decode_timeout_s``). ``decoder_initializer``: see ``IsolatedDecoder``.
    """
    from surgsigma_train.models.registry import get_family
    from surgsigma_train.training.run import build_processor, data_fingerprint

    result = PreflightResult(workers=workers, max_seq_len=cfg.data.max_seq_len,
                             max_bad_fraction=cfg.data.max_bad_fraction)
    started = time.perf_counter()
    read = _read(cfg, result)
    result.timings_s["read"] = time.perf_counter() - started

    # Record-level checks and media paths; what is left needs its media files checked.
    seen: dict[str, str] = {}
    pending: list[tuple[str, str, Sample, list[tuple[str, Path]]]] = []
    images: set[Path] = set()
    videos: set[Path] = set()
    for split, file, sample in read:
        def bad(reason: str, media: str | None = None) -> None:
            result.bad.append(Finding(split, sample.id, file, reason, media))

        if sample.id in seen:
            bad(f"duplicate id (first in {seen[sample.id]})")
            continue
        seen[sample.id] = file
        if sample.task != "unknown" and get_task(sample.task) is None:
            bad(f"unknown task {sample.task!r} (not in the task registry)")
            continue
        if problem := answer_problem(sample):
            bad(problem)
            continue
        paths, failed = [], False
        for ref in sample.media:
            try:
                path = resolve_media_path(Path(sample.media_root), ref.path)
            except MediaError as exc:
                bad(exc.reason, ref.path)
                failed = True
                break
            if not path.is_file():
                bad("file not found" if not path.exists() else "not a regular file", ref.path)
                failed = True
                break
            paths.append((ref.path, path))
            (images if ref.kind == "image" else videos).add(path)
        if not failed:
            pending.append((split, file, sample, paths))

    checked: dict[Path, FileCheck] = {}
    t0 = time.perf_counter()
    timeout = timeout_s if timeout_s is not None else cfg.video.decode_timeout_s
    decoders = DecoderPool(timeout, decoder_initializer, decoder_sys_path)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Videos first (the slow ones); images fill the gaps.
            futures = {p: pool.submit(check_video, p, cfg.video.backend, decoders) for p in sorted(videos)}
            futures.update({p: pool.submit(check_image, p) for p in sorted(images)})
            checked = {p: f.result() for p, f in futures.items()}
    finally:
        decoders.close()
    result.videos_probed, result.images_checked = len(videos), len(images)
    result.timings_s["media"] = time.perf_counter() - t0

    # Media verdicts, clip windows and the planned token length (tokenizer + metadata, nothing decoded here).
    t0 = time.perf_counter()
    family = get_family(cfg.model.family)
    encoder = _PlannedEncoder(build_processor(cfg, family), family, cfg.data, cfg.video, seed=cfg.train.seed)
    encoder.metas = checked
    for split, file, sample, paths in pending:
        reason, media, notes = None, None, []
        for (relative, path), ref in zip(paths, sample.media):
            check = checked[path]
            if check.problem:
                reason, media = check.problem, relative
                break
            notes += [(relative, n) for n in check.notes]
            if check.meta is not None:
                spec = encoder.sampling_spec(sample, ref)
                try:
                    first, stop, seconds = clip_window(check.meta, spec)
                except VideoError as exc:
                    reason, media = exc.reason, relative
                    break
                wanted = frame_count(spec, seconds)
                if stop - first < wanted:
                    notes.append((relative, f"the clip holds {stop - first} frame(s), {wanted} requested"))
        tokens = 0
        if reason is None:
            try:
                tokens = planned_length(encoder, sample)
                if tokens > cfg.data.max_seq_len:
                    reason = (f"{tokens} planned tokens > data.max_seq_len {cfg.data.max_seq_len} "
                              "(over-long: dropped, never truncated)")
            except (MediaError, EncodeError, PlanningError, ValueError, OSError) as exc:
                reason = str(exc)
        if reason is not None:
            result.bad.append(Finding(split, sample.id, file, reason, media))
            continue
        result.warnings += [Finding(split, sample.id, file, note, rel) for rel, note in notes]
        result.clean.append((split, sample, tokens))
    result.timings_s["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = {(split, sample.id): file for split, file, sample, _ in pending}
    _encode_one_of_each_kind(encoder, result, files)
    result.timings_s["encode"] = time.perf_counter() - t0
    clean_per_file = Counter((split, files[(split, sample.id)]) for split, sample, _ in result.clean)
    bad_per_file = Counter((f.split, f.file) for f in result.bad)
    for entry in result.files:
        entry["clean"] = clean_per_file[(entry["split"], entry["file"])]
        entry["bad"] = bad_per_file[(entry["split"], entry["file"])]
    result.timings_s["total"] = time.perf_counter() - started
    result.fingerprint = data_fingerprint([s for split, s, _ in result.clean if split == "train"])
    if write:
        write_preflight(result, Path(cfg.output.dir) / "preflight")
    return result


def media_kind(sample: Sample) -> str:
    kinds = {ref.kind for ref in sample.media}
    return "video" if "video" in kinds else "image" if "image" in kinds else "text"


def _encode_one_of_each_kind(encoder: SampleEncoder, result: PreflightResult, files: dict[tuple[str, str], str],
                             tries: int = 3) -> None:
    """Encode clean samples for real (decode, the family's processor, the loss mask) until one of each media kind
    (text only, image, video) per split encodes, at most ``tries`` of a kind: planning alone can agree with itself
    where the processor does not, and then training would drop every sample of that kind. A sample that fails
    here is bad, as at train time; a plan that disagrees with the processor raises ``InternalError`` (a bug)."""
    attempts: Counter = Counter()
    failed: set[tuple[str, str]] = set()
    for split, sample, _ in list(result.clean):
        key = (split, media_kind(sample))
        if key in result.encoded or attempts[key] >= tries:
            continue
        attempts[key] += 1
        try:
            encoder.encode(sample)
        except (MediaError, EncodeError, PlanningError, VideoError) as exc:
            result.bad.append(Finding(split, sample.id, files[(split, sample.id)], f"does not encode: {exc}"))
            failed.add((split, sample.id))
            continue
        result.encoded[key] = sample.id
    result.clean = [entry for entry in result.clean if (entry[0], entry[1].id) not in failed]


def write_preflight(result: PreflightResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "manifest.jsonl").open("w") as fh:
        for split, sample, tokens in result.clean:
            fh.write(json.dumps({"split": split, "id": sample.id, "task": sample.task, "tokens": tokens}) + "\n")
    for name, rows in (("bad_samples.jsonl", result.bad), ("warnings.jsonl", result.warnings)):
        with (out_dir / name).open("w") as fh:
            for finding in rows:
                fh.write(json.dumps(finding.row(), ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2, ensure_ascii=False))


def format_preflight(result: PreflightResult, out_dir: Path | None = None, max_rows: int = 15) -> str:
    lines = [f"{'split':<6} {'records':>8} {'clean':>8} {'bad':>6} {'excluded':>8}  data file"]
    for f in result.files:
        lines.append(f"{f['split']:<6} {f['records']:>8} {f.get('clean', 0):>8} {f['bad']:>6} "
                     f"{f.get('excluded', 0):>8}  {f['file']}")
    lines.append(f"media: {result.videos_probed} videos probed (each once, {result.workers} decoder processes), "
                 f"{result.images_checked} images decoded in {result.timings_s.get('media', 0):.1f} s")
    tokens = sorted(t for _, _, t in result.clean)
    if tokens:
        lines.append(f"planned tokens: median {tokens[len(tokens) // 2]}, max {tokens[-1]} "
                     f"(data.max_seq_len {result.max_seq_len})")
    if result.encoded:
        lines.append("encoded for real (decode + processor + loss mask): " + ", ".join(
            f"{split} {kind} {sample_id}" for (split, kind), sample_id in sorted(result.encoded.items())))
    for title, findings in (("bad", result.bad), ("warnings", result.warnings)):
        if findings:
            lines.append(f"{title}: {len(findings)}")
            kinds = reason_counts(findings)
            for kind, n in kinds.most_common(max_rows):
                example = next(f for f in findings if reason_kind(f.reason) == kind)
                where = example.media or example.file
                lines.append(f"  {n:>6} x {kind}   (e.g. {example.id} {where})")
            if len(kinds) > max_rows:
                lines.append(f"  ... {len(kinds) - max_rows} more kinds (every one in the .jsonl files)")
    for reason, n in sorted(result.excluded.items()):
        lines.append(f"excluded {n}: {reason}")
    verdict = "ok" if result.ok else "FAIL"
    lines.append(f"preflight: {result.records} records, {len(result.clean)} clean, {len(result.bad)} bad "
                 f"({result.bad_fraction:.2%}; data.max_bad_fraction {result.max_bad_fraction:.2%}): {verdict}")
    if out_dir is not None:
        lines.append(f"written: {out_dir}/manifest.jsonl, bad_samples.jsonl, warnings.jsonl, summary.json")
    return "\n".join(lines)
