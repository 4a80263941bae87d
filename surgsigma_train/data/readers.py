"""Readers: LLaVA/ShareGPT, OpenAI-style messages and SurgΣ-DB-style records -> `Sample`s.

Every record either becomes a sample, is excluded for a stated and counted reason (e.g. generation
tasks), or is reported as bad with its file, record and reason. Nothing is dropped silently.
SurgΣ-DB release quirks handled here: tables found by content, unpadded `VIDn` paths repaired where only the
padded file exists, missing media (e.g. Cholec80 videos not in the public set) reported per record, corrupted
box answers quarantined (data/boxes.py); every repair and every field that could not be mapped is counted.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from surgsigma_train.config.schema import DataSource
from surgsigma_train.data.boxes import box_problem
from surgsigma_train.data.media import MediaError, resolve_media_path
from surgsigma_train.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MediaRef, Message, Sample
from surgsigma_train.data.tasks import get_task
from surgsigma_train.errors import DataError


@dataclass(frozen=True)
class BadRecord:
    file: str
    record: str  # record id, or "#<index>" / "line <n>" when it has none
    reason: str


@dataclass
class ReadReport:
    file: str
    format: str = "unknown"
    records: int = 0
    samples: int = 0
    excluded: Counter = field(default_factory=Counter)  # reason -> count
    bad: list[BadRecord] = field(default_factory=list)
    unmapped_fields: Counter = field(default_factory=Counter)  # field name -> records carrying it
    repaired: Counter = field(default_factory=Counter)  # repair -> media references repaired
    missing_media: Counter = field(default_factory=Counter)  # media path -> records (all of them are in `bad`)

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.file, "format": self.format, "records": self.records, "samples": self.samples,
            "excluded": dict(self.excluded), "bad": len(self.bad), "unmapped_fields": dict(self.unmapped_fields),
            "repaired": dict(self.repaired), "missing_media": dict(self.missing_media),
        }


class RecordError(ValueError):
    """A record that cannot become a sample; the message is the reason reported for it."""


def _kind(value: Any) -> str:
    """A JSON value's type, as a reason names it."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return next((name for t, name in names.items() if isinstance(value, t)), type(value).__name__)


def _optional_str(record: dict, key: str, where: str = "") -> str | None:
    """`record[key]` when it is a string, None when absent or null; any other value makes the record bad."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{where}{key!r} must be a string, got {_kind(value)}")
    return value


def record_id(record: dict, default: str) -> str:
    """A record's id (`default`, its position, when it has none); an unusable id makes the record bad."""
    value = record.get("id")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise RecordError(f"'id' must be a non-empty string or an integer, got {_kind(value)} {value!r}")
    return str(value)


def _never_raises(reader: Any) -> Any:
    """Last line of defence: an unforeseen error on a malformed field makes the record bad, never the run.

    The fields a reader knows are type-checked with their own reasons; this only turns what slipped through
    into a reason too (tests/data/test_reader_fuzz.py checks that nothing does).
    """

    @functools.wraps(reader)
    def read(record: dict, sample_id: str, **context: Any) -> Sample | None:
        try:
            return reader(record, sample_id, **context)
        except RecordError:
            raise
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
            raise RecordError(f"malformed record ({type(exc).__name__}: {exc})") from exc

    return read


_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "model": "assistant", "system": "system"}
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _video_key(path: str) -> str:
    """The patient/source video a media file belongs to, derived from its path.

    `Cholec80/videos/vid92.mp4` and `CholecT50/videos/VID92/000509.png` name their video in a path
    component (`vidNN`, zero-padding ignored); otherwise the file's folder (frames) or stem (videos).
    """
    parts = Path(path).parts
    for i, part in enumerate(parts):
        match = re.fullmatch(r"(?i)vid(?:eo)?[_-]?(\d+)(\.\w+)?", part)
        if match:
            return f"{parts[0]}/VID{int(match.group(1)):02d}" if i > 0 else f"VID{int(match.group(1)):02d}"
    p = Path(path)
    return str(p.parent) if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"} else str(p.with_suffix(""))


def _finish(sample_id: str, messages: list[Message], media: list[MediaRef], **kw: Any) -> Sample:
    """Validate a conversation and its media, then build the sample."""
    if not messages:
        raise RecordError("empty conversation")
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("no assistant turn")
    if messages[-1].role != "assistant":
        raise RecordError("conversation does not end with an assistant turn")
    for m in messages:
        if m.role == "assistant" and _PLACEHOLDER_RE.search(m.content):
            raise RecordError("media placeholder in an assistant turn (media can only be inputs)")
        if m.role == "assistant" and not m.content.strip():
            raise RecordError("empty assistant turn")
        if m.role == "assistant" and (problem := box_problem(m.content)):
            raise RecordError(f"quarantined: {problem}")  # corrupted box tokens are never trained on
    for ref in media:
        bounds = {"start": ref.start_s, "end": ref.end_s, "observe_until": ref.observe_until_s}
        for name, value in bounds.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise RecordError(f"{ref.path}: {name} must be a non-negative number of seconds, got {value!r}")
        if ref.start_s is not None and ref.end_s is not None and ref.end_s <= ref.start_s:
            raise RecordError(f"{ref.path}: clip end {ref.end_s} s is not after its start {ref.start_s} s")
        if ref.observe_until_s is not None and ref.start_s is not None and ref.observe_until_s <= ref.start_s:
            raise RecordError(f"{ref.path}: observe_until {ref.observe_until_s} s is not after the clip start")
    kinds = [tok for m in messages for tok in _PLACEHOLDER_RE.findall(m.content)]
    expected = [IMAGE_PLACEHOLDER if r.kind == "image" else VIDEO_PLACEHOLDER for r in media]
    if kinds != expected:
        raise RecordError(
            f"placeholders {kinds.count(IMAGE_PLACEHOLDER)} <image> / {kinds.count(VIDEO_PLACEHOLDER)} <video> "
            f"in the text do not match the media given ({expected.count(IMAGE_PLACEHOLDER)} images, "
            f"{expected.count(VIDEO_PLACEHOLDER)} videos, in this order)"
        )
    if kw.get("source_video") is None and media:
        kw["source_video"] = _video_key(media[0].path)
    return Sample(id=sample_id, messages=tuple(messages), media=tuple(media), **kw)


def _prepend_placeholders(messages: list[Message], media: list[MediaRef]) -> list[Message]:
    """LLaVA convention: media given without placeholders go before the first user text."""
    if not media or any(_PLACEHOLDER_RE.search(m.content) for m in messages):
        return messages
    marks = "".join(IMAGE_PLACEHOLDER if r.kind == "image" else VIDEO_PLACEHOLDER for r in media)
    out = list(messages)
    for i, m in enumerate(out):
        if m.role == "user":
            out[i] = Message("user", marks + "\n" + m.content)
            break
    return out


def _media_from_fields(record: dict) -> list[MediaRef]:
    """Top-level `image(s)` / `video(s)` fields, in placeholder order images-then-videos."""
    refs = []
    for key, kind in (("image", "image"), ("images", "image"), ("video", "video"), ("videos", "video")):
        for item in _as_list(record.get(key)):
            if isinstance(item, dict):
                path = item.get("path")
                if not isinstance(path, str) or not path:
                    raise RecordError(f"{key!r} entry needs a non-empty string 'path', got {_kind(path)}")
                refs.append(MediaRef(kind, path, item.get("start"), item.get("end"), item.get("observe_until")))
            elif isinstance(item, str) and item:
                refs.append(MediaRef(kind, item))
            else:
                raise RecordError(f"{key!r} entries must be paths (or objects with a 'path'), got "
                                  + ("an empty string" if item == "" else _kind(item)))
    return refs


def _order_media_by_text(messages: list[Message], media: list[MediaRef]) -> list[MediaRef]:
    """Assign images and videos to placeholders in the order they appear in the text."""
    images = iter([r for r in media if r.kind == "image"])
    videos = iter([r for r in media if r.kind == "video"])
    ordered = []
    for m in messages:
        for tok in _PLACEHOLDER_RE.findall(m.content):
            nxt = next(images if tok == IMAGE_PLACEHOLDER else videos, None)
            if nxt is None:
                return media  # count mismatch: _finish reports it
            ordered.append(nxt)
    return ordered if len(ordered) == len(media) else media


def _common_fields(record: dict) -> dict[str, Any]:
    return {
        "task": _optional_str(record, "task") or "unknown",
        "specialty": _optional_str(record, "specialty") or _optional_str(record, "clinical specialty"),
        "source": _optional_str(record, "source") or _optional_str(record, "source dataset"),
        "source_video": _optional_str(record, "source_video"),
        "thinking": _optional_str(record, "thinking"),
    }


# ---------------------------------------------------------------- LLaVA / ShareGPT
@_never_raises
def _read_llava(record: dict, sample_id: str, **_: Any) -> Sample:
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise RecordError(f"'conversations' must be a list, got {_kind(conv)}")
    if not conv:
        raise RecordError("empty conversation ('conversations' is an empty list)")
    messages = []
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} must be an object with 'from' and 'value', got {_kind(turn)}")
        if not isinstance(turn.get("value"), str):
            raise RecordError(f"{where} needs a string 'value', got {_kind(turn.get('value'))}")
        speaker = turn.get("from")
        role = _ROLE_ALIASES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RecordError(f"{where}: unknown speaker {speaker!r} in 'from' (known: {', '.join(_ROLE_ALIASES)})")
        messages.append(Message(role, turn["value"]))
    media = _media_from_fields(record)
    messages = _prepend_placeholders(messages, media)
    return _finish(sample_id, messages, _order_media_by_text(messages, media), **_common_fields(record))


# ---------------------------------------------------------------- OpenAI-style messages
def _part_path(part: dict, media: str, where: str) -> str:
    """The path of an image/video part: `"image": p`, `"path": p`, `"image_url": {"url": p}` or `"image_url": p`.

    The plain-string `image_url` is the OpenAI-style form ms-swift documents; the first of these keys present
    (not null) is the one used, and it must hold a non-empty string.
    """
    url_key = f"{media}_url"
    for key in (media, "path", url_key):
        value = part.get(key)
        if value is None:
            continue
        if key == url_key and isinstance(value, dict):
            value, key = value.get("url"), f"{url_key}.url"
        if not isinstance(value, str) or not value:
            raise RecordError(f"{where}: {media} part {key!r} must be a non-empty path or URL string, got "
                              + ("an empty string" if value == "" else _kind(value)))
        return value
    raise RecordError(f"{where}: {media} part without a path (looked for {media!r}, 'path', {url_key!r})")


@_never_raises
def _read_openai(record: dict, sample_id: str, **_: Any) -> Sample:
    raw = record.get("messages")
    if not isinstance(raw, list):
        raise RecordError(f"'messages' must be a list, got {_kind(raw)}")
    if not raw:
        raise RecordError("empty conversation ('messages' is an empty list)")
    messages, media = [], []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}] must be an object with 'role' and 'content', got {_kind(turn)}")
        role = turn.get("role")
        role = _ROLE_ALIASES.get(role.lower(), role) if isinstance(role, str) else role
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}]: unknown role {turn.get('role')!r} (known: {', '.join(_ROLE_ALIASES)})")
        content = turn.get("content")
        if isinstance(content, str):
            messages.append(Message(role, content))
            continue
        if not isinstance(content, list):
            raise RecordError(f"messages[{i}].content must be a string or a list of parts, got {_kind(content)}")
        text = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise RecordError(f"{where} must be an object with a 'type', got {_kind(part)}")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RecordError(f"{where}: text part needs a string 'text', got {_kind(part.get('text'))}")
                text.append(part["text"])
            elif kind in ("image", "image_url"):
                media.append(MediaRef("image", _part_path(part, "image", where)))
                text.append(IMAGE_PLACEHOLDER)
            elif kind in ("video", "video_url"):
                path = _part_path(part, "video", where)
                media.append(MediaRef("video", path, part.get("start"), part.get("end"), part.get("observe_until")))
                text.append(VIDEO_PLACEHOLDER)
            else:
                raise RecordError(f"{where}: unknown content part type {kind!r} (known: text, image, image_url, "
                                  "video, video_url)")
        messages.append(Message(role, "".join(text)))
    if not media:  # string contents with top-level images/videos (LLaMA-Factory "sharegpt" messages)
        media = _media_from_fields(record)
        messages = _prepend_placeholders(messages, media)
        media = _order_media_by_text(messages, media)
    return _finish(sample_id, messages, media, **_common_fields(record))


# ---------------------------------------------------------------- SurgΣ-DB style
QUESTION_KEYS = ("question", "query", "prompt", "instruction", "input")
THINKING_KEYS = ("thinking", "reasoning", "think", "rationale")
KNOWN_ANNO_KEYS = {"id", "images", "task type", "answer", "image path", "video path", *QUESTION_KEYS, *THINKING_KEYS}
# Table-entry fields the loader maps: into the sample (path, source, specialty, clip bounds) or its `extra`.
KNOWN_TABLE_KEYS = {"id", "video path", "image path", "source dataset", "clinical specialty", "surgical type",
                    "source url", "start", "end"}
# Table-entry fields copied into the sample as text: a value of another type makes the records using it bad.
TABLE_TEXT_KEYS = ("source dataset", "clinical specialty", "surgical type", "source url")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg"}


def table_entry_id(entry: Any) -> str | None:
    """The id of a media table entry, or None when it has no usable one (a string or an integer)."""
    value = entry.get("id") if isinstance(entry, dict) else None
    ok = isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""
    return str(value) if ok else None


def dataset_specialty(entry: dict) -> tuple[str, str] | None:
    """(source dataset, clinical specialty) of a video table entry when it names both as text."""
    dataset, specialty = entry.get("source dataset"), entry.get("clinical specialty")
    return (dataset, specialty) if isinstance(dataset, str) and isinstance(specialty, str) and dataset and specialty \
        else None


def no_annotations_reason(unmapped: Any) -> str:
    """Why a release document gives no records at all (`unmapped`: its unmapped-field counts)."""
    tops = sorted(k.removeprefix("top-level ") for k in unmapped if k.startswith("top-level "))
    return ("release document without annotations: no top-level list of objects with 'task type' or 'answer'"
            + (f" (not tables: {', '.join(tops)})" if tops else ""))


@dataclass
class SurgSigmaTables:
    videos: dict[str, dict]
    images: dict[str, dict]
    specialty_of_dataset: dict[str, str]


def _surgsigma_tables(doc: dict, report: ReadReport) -> tuple[SurgSigmaTables, list[dict]]:
    """Find the video, image and annotation tables by what their entries contain, not by key name."""
    videos, images, annos = {}, {}, []
    for key, value in doc.items():
        entries = value if isinstance(value, list) else None
        first = next((e for e in entries or [] if isinstance(e, dict)), None)
        if first is None:
            report.unmapped_fields[f"top-level {key!r}"] += 1
        elif "task type" in first or "answer" in first:
            annos.extend(entries)
        elif "video path" in first or "image path" in first:
            table = videos if "video path" in first else images
            for entry in entries:
                entry_id = table_entry_id(entry)
                if entry_id is None:
                    report.unmapped_fields[f"{key!r} entry without an id"] += 1
                    continue
                table[entry_id] = entry
                for name in entry.keys() - KNOWN_TABLE_KEYS:
                    report.unmapped_fields[f"{key!r} entry field {name!r}"] += 1
        else:
            report.unmapped_fields[f"top-level {key!r}"] += 1
    by_dataset: dict[str, set[str]] = {}
    for v in videos.values():
        if pair := dataset_specialty(v):
            by_dataset.setdefault(pair[0], set()).add(pair[1])
    unambiguous = {ds: next(iter(s)) for ds, s in by_dataset.items() if len(s) == 1}
    return SurgSigmaTables(videos, images, unambiguous), annos


def _task_id(value: Any) -> int:
    """`task type` 5, "5", 5.0 or [5] -> 5."""
    raw = _as_list(value)
    if not raw:
        raise RecordError("no 'task type'")
    first = raw[0]
    if isinstance(first, str) and first.strip().lstrip("-").isdigit():
        return int(first)
    if isinstance(first, int) and not isinstance(first, bool):
        return first
    if isinstance(first, float) and first.is_integer():
        return int(first)
    raise RecordError(f"'task type' {first!r} is not an integer")


def _first_text(record: dict, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` the record has (not null); it must be a string."""
    key = next((k for k in keys if record.get(k) is not None), None)
    return None if key is None else _optional_str(record, key)


def _table_media(media_id: str, tables: SurgSigmaTables) -> tuple[MediaRef, dict] | None:
    """The media a table id names, with its video table entry (empty for images); None if no table has it."""
    if media_id in tables.images:
        kind, entry = "image", tables.images[media_id]
    elif media_id in tables.videos:
        kind, entry = "video", tables.videos[media_id]
    else:
        return None
    path = entry.get(f"{kind} path")
    if not isinstance(path, str) or not path:
        raise RecordError(f"{kind} table entry {media_id!r}: '{kind} path' must be a non-empty string, got "
                          + ("an empty string" if path == "" else _kind(path)))
    if kind == "image":
        return MediaRef("image", path), {}
    for key in TABLE_TEXT_KEYS:
        _optional_str(entry, key, f"video table entry {media_id!r}: ")
    return MediaRef("video", path, entry.get("start"), entry.get("end")), entry


@_never_raises
def _read_surgsigma(record: dict, sample_id: str, *, tables: SurgSigmaTables, task_ids: dict[int, str],
                    report: ReadReport) -> Sample | None:
    for key in record:
        if key not in KNOWN_ANNO_KEYS:
            report.unmapped_fields[key] += 1
    task_id = _task_id(record.get("task type"))
    task_name = task_ids.get(task_id)
    if task_name is None:
        raise RecordError(f"unknown task id {task_id} (known: {sorted(task_ids)}; set data.task_ids)")
    task = get_task(task_name)
    if task is not None and not task.trainable:
        report.excluded[f"generation task {task_name} (needs an image/video generator, not a text VLM)"] += 1
        return None
    answer = record.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError("missing or empty 'answer'" + ("" if isinstance(answer, str) else f" (got {_kind(answer)})"))
    # Localization answers get the full box check here; every other answer's special-token boxes are checked
    # once, in _finish, for all readers alike.
    if task is not None and task.answer_kind.startswith("boxes") and (problem := box_problem(answer, expect_boxes=True)):
        raise RecordError(f"quarantined: {problem}")
    question = _first_text(record, QUESTION_KEYS)
    if question is None:
        raise RecordError(f"no question field (looked for {', '.join(QUESTION_KEYS)})")
    thinking = _first_text(record, THINKING_KEYS)

    media, meta = [], {}
    # Standalone annotation records (JSONL, datasets rows) may name their media by path instead of by table id.
    refs = []
    for field_name in ("images", "image path", "video path"):
        for media_id in _as_list(record.get(field_name)):
            if isinstance(media_id, bool) or not isinstance(media_id, (str, int)) or media_id == "":
                raise RecordError(f"{field_name!r} entries must be media ids or paths, got "
                                  + ("an empty string" if media_id == "" else _kind(media_id)))
            refs.append(str(media_id))
    for media_id in refs:
        suffix = Path(media_id).suffix.lower()
        if found := _table_media(media_id, tables):
            media.append(found[0])
            meta = meta or found[1]
        elif suffix in _IMAGE_SUFFIXES or suffix in _VIDEO_SUFFIXES:
            media.append(MediaRef("image" if suffix in _IMAGE_SUFFIXES else "video", media_id))
        else:
            raise RecordError(f"references unknown media id {media_id!r}")
    if not media:
        raise RecordError("references no media (no 'images', 'image path' or 'video path')")
    source = meta.get("source dataset") or Path(media[0].path).parts[0]
    messages = _prepend_placeholders([Message("user", question), Message("assistant", answer)], media)
    return _finish(
        sample_id, messages, media, task=task_name, source=str(source),
        specialty=meta.get("clinical specialty") or tables.specialty_of_dataset.get(str(source)),
        thinking=thinking,
        extra={k.replace(" ", "_"): meta[k] for k in ("surgical type", "source url") if meta.get(k) is not None},
    )


# ---------------------------------------------------------------- files and format detection
def _iter_json_records(path: Path, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """(position label, record) pairs; a malformed JSONL line is reported and skipped, not fatal."""
    if path.suffix == ".jsonl":
        with path.open("r", encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    report.records += 1
                    report.bad.append(BadRecord(str(path), f"line {lineno}", f"malformed JSON ({exc.msg})"))
        return
    doc = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(doc, list):
        yield from ((f"#{i}", r) for i, r in enumerate(doc))
    else:
        yield "#document", doc


def detect_format(first_record: Any) -> str:
    if isinstance(first_record, dict):
        if "conversations" in first_record:
            return "llava"
        if "messages" in first_record:
            return "openai"
        if "task type" in first_record or any(
            isinstance(v, list) and v and isinstance(v[0], dict) and ("task type" in v[0] or "image path" in v[0])
            for v in first_record.values()
        ):
            return "surgsigma"
    return "unknown"


def default_media_root(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    return folder / "raw_data" if (folder / "raw_data").is_dir() else folder


# ---------------------------------------------------------------- media on disk: path repair, missing files
# An unpadded one-digit `VIDn` path component (`VID2/...`); the release mixes it with the padded `VID02/...`.
_UNPADDED_VID_RE = re.compile(r"(?i)(?<![^/])(vid)(\d)(?=/|\.|$)")
REPAIR_VID_PADDING = "VIDn -> VID0n path (only the zero-padded file exists on disk)"


class MediaCheck:
    """Which media paths exist under the root, from one listing per folder.

    A release references about a million 1-fps frames in a few hundred folders: listing each folder once is
    far cheaper than one stat per file, which matters on network file systems.
    """

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[str, frozenset[str] | str] = {}  # folder -> file names, or why it is refused

    def exists(self, relative: str) -> bool:
        folder, _, name = relative.rpartition("/")
        listing = self._listings.get(folder)
        if listing is None:
            try:
                listing = frozenset(e.name for e in os.scandir(resolve_media_path(self.root, folder or "."))
                                    if e.is_file())
            except MediaError as exc:  # absolute, or leads out of the data root
                listing = exc.reason
            except (OSError, ValueError):  # no such folder, or a name the OS refuses (a NUL byte)
                listing = frozenset()
            self._listings[folder] = listing
        if isinstance(listing, str):
            raise RecordError(f"media {relative}: {listing}")
        return name in listing

    def check(self, sample: Sample, report: ReadReport) -> Sample:
        """Repair `VIDn` paths that only exist padded; a record with missing media is bad (RecordError)."""
        media, repairs, missing = [], 0, []
        for ref in sample.media:
            if not self.exists(ref.path):
                padded = _UNPADDED_VID_RE.sub(r"\g<1>0\2", ref.path)
                if padded != ref.path and self.exists(padded):
                    ref, repairs = replace(ref, path=padded), repairs + 1
                else:
                    missing.append(ref.path)
            media.append(ref)
        if missing:
            report.missing_media.update(missing)
            raise RecordError(f"media not found under {self.root}: {', '.join(missing)}")
        if repairs:
            report.repaired[REPAIR_VID_PADDING] += repairs
        return replace(sample, media=tuple(media))


# ---------------------------------------------------------------- reading
def read_file(path: Path, fmt: str, task_ids: dict[int, str], media_root: Path,
              max_samples: int | None = None, check_media: bool = False) -> tuple[list[Sample], ReadReport]:
    """One JSON (list or release document) or JSONL file. See `read_records` for `check_media`."""
    report = ReadReport(str(path))
    try:
        records = list(_iter_json_records(path, report))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.bad.append(BadRecord(str(path), "#file", f"cannot read as JSON/JSONL ({exc})"))
        return [], report
    return read_records(records, report, fmt, task_ids, media_root, max_samples, check_media)


def read_records(records: list[tuple[str, Any]], report: ReadReport, fmt: str, task_ids: dict[int, str],
                 media_root: Path, max_samples: int | None = None,
                 check_media: bool = False) -> tuple[list[Sample], ReadReport]:
    """(position, record) pairs -> samples, everything else counted in `report`.

    With `check_media`, media are looked up under `media_root` at read time: `VIDn` paths are repaired where
    only the padded file exists, and a record whose media is missing is bad (counted in `missing_media`), so
    that training never plans or batches a sample it cannot load.
    """
    where = report.file
    if fmt == "auto":
        fmt = detect_format(records[0][1]) if records else "unknown"
    report.format = fmt
    if fmt == "unknown":
        if records:
            report.bad.append(BadRecord(where, "#file", "cannot tell the format (no 'conversations', "
                                        "'messages' or SurgΣ-DB 'task type'/'image path' fields)"))
        return [], report

    context: dict[str, Any] = {}
    if fmt == "surgsigma":
        docs = [r for _, r in records if isinstance(r, dict)]
        if len(docs) == 1 and "task type" not in docs[0]:  # one release document with tables
            tables, annos = _surgsigma_tables(docs[0], report)
            records = [(f"annos#{i}", a) for i, a in enumerate(annos)]
            if not annos:
                report.records += 1
                report.bad.append(BadRecord(where, "#document", no_annotations_reason(report.unmapped_fields)))
        else:  # standalone annotation records: media named by path
            tables = SurgSigmaTables({}, {}, {})
        context = {"tables": tables, "task_ids": task_ids, "report": report}
    reader = {"llava": _read_llava, "openai": _read_openai, "surgsigma": _read_surgsigma}[fmt]
    media_check = MediaCheck(media_root) if check_media else None

    samples: list[Sample] = []
    seen: set[str] = set()
    for position, record in records:
        report.records += 1
        if not isinstance(record, dict):
            report.bad.append(BadRecord(where, position, f"record is a {type(record).__name__}, not an object"))
            continue
        try:
            sample_id = record_id(record, f"{Path(where).name}:{position}")
        except RecordError as exc:
            report.bad.append(BadRecord(where, position, str(exc)))
            continue
        if sample_id in seen:
            report.bad.append(BadRecord(where, sample_id, "duplicate id"))
            continue
        seen.add(sample_id)
        try:
            sample = reader(record, sample_id, **context)
            if sample is not None and media_check is not None:
                sample = media_check.check(sample, report)
        except RecordError as exc:
            report.bad.append(BadRecord(where, sample_id, str(exc)))
            continue
        if sample is None:
            continue
        samples.append(replace(sample, media_root=str(media_root)))
        if max_samples is not None and len(samples) >= max_samples:
            break
    report.samples = len(samples)
    return samples, report


# ---------------------------------------------------------------- Hugging Face datasets
def is_hf_dataset_dir(path: Path) -> bool:
    """A `save_to_disk` folder, or a folder of data files (parquet/arrow/csv, no JSON) for `load_dataset`."""
    if not path.is_dir():
        return False
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return True
    files = [p for p in path.rglob("*") if p.is_file()]
    return not any(p.suffix in (".json", ".jsonl") for p in files) and any(
        p.suffix in (".parquet", ".arrow", ".csv") for p in files)


def _drop_none(value: Any) -> Any:
    """Arrow gives every row every column (None where a record had no such field): put absence back."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _hf_records(source: DataSource) -> tuple[str, list[tuple[str, Any]]]:
    """Rows of a datasets-library dataset: a local `save_to_disk` folder, a local data folder or a hub id."""
    import datasets  # only sources of this kind need the library

    path = Path(source.path)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source.path, split=source.hf_split)
    except (OSError, ValueError) as exc:  # not found, no network, unreadable files, unknown split
        raise DataError(f"data source {source.path}: the datasets library cannot load it "
                        f"({type(exc).__name__}: {exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        split = source.hf_split or (next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise DataError(f"data source {source.path}: " + (f"no split {split!r}" if split else "several splits")
                            + f"; set `hf_split` to one of {sorted(ds)}")
        ds = ds[split]
    name = f"{source.path}[{source.hf_split}]" if source.hf_split else source.path
    return name, [(f"row {i}", _drop_none(row)) for i, row in enumerate(ds)]


def read_source(source: DataSource, task_ids: dict[int, str]) -> tuple[list[Sample], list[ReadReport]]:
    """A file, a folder of JSON/JSONL files, or a datasets-library dataset (`format: hf`, or detected)."""
    path = Path(source.path)
    if (path / "index_manifest.json").is_file():  # an Arrow index (`surgsigma-train data index`): memory-mapped
        from surgsigma_train.data.index import open_index_source

        return open_index_source(path, task_ids, source)  # type: ignore[return-value]
    use_hf = source.format == "hf" or (source.format == "auto" and is_hf_dataset_dir(path))
    if not use_hf and not path.exists():
        raise DataError(f"data source {path} does not exist")
    if source.media_root:
        media_root = Path(source.media_root)
    elif path.exists():
        media_root = default_media_root(path)
    else:
        raise DataError(f"data source {source.path}: a hub dataset needs `media_root` (the folder its media "
                        "paths are relative to; SurgΣ-DB releases do not ship the raw media)")
    fmt = "auto" if source.format == "hf" else source.format
    if use_hf:
        name, records = _hf_records(source)
        results = [read_records(records, ReadReport(name), fmt, task_ids, media_root, source.max_samples,
                                source.check_media)]
    else:
        files = sorted(p for p in path.glob("*") if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
        results = []
        for file in files:
            remaining = None if source.max_samples is None else source.max_samples - sum(len(g) for g, _ in results)
            if remaining is not None and remaining <= 0:
                break
            results.append(read_file(file, fmt, task_ids, media_root, remaining, source.check_media))
    samples, reports = [], []
    for got, report in results:
        if source.video is not None:
            got = [replace(s, sampling=source.video.model_dump()) for s in got]
        samples.extend(got)
        reports.append(report)
    return samples, reports
