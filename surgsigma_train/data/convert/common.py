"""What every converter shares: building the release tables, reporting unusable rows, writing the JSON.

A converter reads a public dataset's own label files and calls `ReleaseBuilder` once per video, frame
and conversation; rows it cannot use go to `ReleaseBuilder.bad` with file, line/record and reason.
`ReleaseBuilder.release()` refuses to produce a document with no conversation, or one whose frame
paths would not let `readers._video_key` tell the patient videos apart (a frame-level split would
leak near-duplicate frames between train and held-out).
"""

from __future__ import annotations

import json
import string
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgsigma_train.config.schema import DEFAULT_TASK_IDS
from surgsigma_train.data.demo import QUESTIONS
from surgsigma_train.data.readers import BadRecord, _video_key
from surgsigma_train.errors import ConfigError, DataError

TASK_ID: dict[str, int] = {name: task_id for task_id, name in DEFAULT_TASK_IDS.items()}
CHOLECYSTECTOMY = {"clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy"}


def format_path(pattern: str, option: str, **fields: Any) -> str:
    """`pattern.format(**fields)`, with an error naming the option and the fields it may use."""
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{option} {pattern!r}: {exc!r}; available fields: "
                          f"{', '.join('{' + name + '}' for name in fields)}") from None


def check_pattern(pattern: str, option: str, dataset: str, **example: Any) -> None:
    """Fail before reading any label file if a path pattern is unusable."""
    fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name}
    if unknown := fields - set(example):
        raise ConfigError(f"{option} {pattern!r}: unknown field(s) {sorted(unknown)}; "
                          f"available: {', '.join('{' + name + '}' for name in example)}")
    path = format_path(pattern, option, **example)
    # readers attribute an image to the dataset named by its first path component
    if Path(path).is_absolute() or Path(path).parts[0] != dataset:
        raise ConfigError(f"{option} {pattern!r} must be a relative path starting with '{dataset}/' "
                          f"(media paths are relative to the data root; readers name the source dataset from it)")


def parse_video_selection(text: str | None) -> set[int] | None:
    """'1-40,45' -> {1, ..., 40, 45}; None -> every video."""
    if text is None:
        return None
    selected: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            first, _, last = part.partition("-")
            selected.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ConfigError(f"--videos {text!r}: {part!r} is not a number or a range like 1-40") from None
    if not selected:
        raise ConfigError(f"--videos {text!r} selects no video")
    return selected


def question_for(task: str, anno_id: str) -> str:
    """One of the project's paraphrases, chosen by a hash of the record id: stable whatever else is converted."""
    options = QUESTIONS[TASK_ID[task]]
    return options[zlib.crc32(anno_id.encode("utf-8")) % len(options)]


@dataclass
class ReleaseBuilder:
    dataset: str
    source_url: str
    videos: dict[int, dict] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)
    annos: list[dict] = field(default_factory=list)
    video_of_image: dict[str, int] = field(default_factory=dict)
    bad: list[BadRecord] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)  # reason -> rows not converted on purpose
    rows: int = 0  # label rows read (frames, lines)

    def add_video(self, number: int, video_path: str) -> None:
        self.videos.setdefault(number, {
            "id": f"{self.dataset}_VID{number:02d}", "source dataset": self.dataset, "source url": self.source_url,
            **CHOLECYSTECTOMY, "video path": video_path,
        })

    def add_image(self, video: int, key: str, image_path: str) -> str:
        """Register a frame (once) and return its image id."""
        image_id = f"{self.dataset}_VID{video:02d}_{key}"
        if image_id not in self.images:
            self.images[image_id] = {"id": image_id, "image path": image_path}
            self.video_of_image[image_id] = video
        return image_id

    def add_anno(self, image_id: str, suffix: str, task: str, answer: str) -> None:
        anno_id = f"{image_id}_{suffix}"
        self.annos.append({"id": anno_id, "images": [image_id], "task type": [TASK_ID[task]],
                           "question": question_for(task, anno_id), "answer": answer})

    def add_bad(self, file: Path | str, record: str, reason: str) -> None:
        self.bad.append(BadRecord(str(file), record, reason))

    def release(self) -> dict[str, list[dict]]:
        if not self.annos:
            shown = "; ".join(f"{b.file} {b.record}: {b.reason}" for b in self.bad[:10])
            raise DataError(f"{self.dataset}: no usable conversation from {self.rows} label rows"
                            + (f" ({len(self.bad)} unusable, first: {shown})" if self.bad else ""))
        keys: dict[int, set[str]] = {}
        for image_id, video in self.video_of_image.items():
            keys.setdefault(video, set()).add(_video_key(self.images[image_id]["image path"]))
        owner: dict[str, int] = {}
        for video, found in sorted(keys.items()):
            if len(found) != 1:
                raise ConfigError(f"{self.dataset} VID{video:02d}: its frame paths give several source-video keys "
                                  f"{sorted(found)}; the frame pattern must put one video's frames in one folder")
            key = next(iter(found))
            if key in owner:
                raise ConfigError(f"{self.dataset} VID{owner[key]:02d} and VID{video:02d} get the same source-video "
                                  f"key {key!r} from their frame paths: a split by video would mix them; use a "
                                  f"frame pattern with one folder (or a vidNN path component) per video")
            owner[key] = video
        return {
            "videos": [self.videos[n] for n in sorted(self.videos) if n in keys],
            "images": list(self.images.values()),
            "annos": self.annos,
        }

    def summary(self) -> dict[str, Any]:
        tasks = Counter(DEFAULT_TASK_IDS[a["task type"][0]] for a in self.annos)
        return {
            "source dataset": self.dataset, "label rows": self.rows, "videos": len(self.videos),
            "images": len(self.images), "conversations": len(self.annos), "tasks": dict(sorted(tasks.items())),
            "excluded": dict(self.excluded), "bad": len(self.bad),
        }


def write_release(release: dict[str, list[dict]], path: Path) -> None:
    """Same layout and formatting as the demo data set writes (`surgsigma_train.data.demo`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a crash never leaves a half-written release behind
    tmp.write_text(json.dumps(release, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_lines(path: Path, builder: ReleaseBuilder) -> list[tuple[int, str]] | None:
    """Non-blank lines with their 1-based numbers; an unreadable file is reported and gives None."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # some label files carry a BOM
    except (OSError, UnicodeDecodeError) as exc:
        builder.add_bad(path, "#file", f"cannot read ({exc})")
        return None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        builder.add_bad(path, "#file", "empty file")
        return None
    return lines
