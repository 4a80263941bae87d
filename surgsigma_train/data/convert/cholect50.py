"""CholecT50 (Nwoye et al. 2022, CAMMA) -> triplet and instrument recognition conversations.

Published format (CAMMA-public/cholect50, docs/README-Format.md, and its data loader's slicing):
`labels/VIDNN.json` holds `categories` ({"instrument"|"verb"|"target"|"triplet"|"phase": {"id": name}},
a triplet named "grasper,dissect,cystic_plate") and `annotations` {frame id: [instance, ...]}, each
instance a 15-vector: [triplet, instrument, instrument score, box x, y, w, h, verb, target, target
score, box x, y, w, h, phase]; -1 means null/absent. Frames are `videos/VIDNN/NNNNNN.png` at 1 fps.
A frame whose list is empty (or holds only null instances) shows no instrument.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from surgsigma_train.data.convert.common import ReleaseBuilder, check_pattern, format_path
from surgsigma_train.data.demo import instrument_recognition_answer, triplet_answer
from surgsigma_train.errors import DataError

DATASET = "CholecT50"
SOURCE_URL = "https://github.com/CAMMA-public/cholect50"
FRAME_PATTERN = "CholecT50/videos/VID{video:02d}/{frame:06d}.png"
VIDEO_PATTERN = "CholecT50/videos/VID{video:02d}"  # the data set ships frame folders, not video files
ROW_LENGTH = 15
POSITIONS = {"triplet": 0, "instrument": 1, "verb": 7, "target": 8}  # of the ids in an instance vector
_FILE_RE = re.compile(r"VID(\d+)\.json")


def _category_id(value: Any) -> int | None:
    """An id from the JSON (int, or an integral float); None if it is neither."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's default keeps the last of two equal keys: a frame listed twice would lose a label unseen."""
    if duplicates := sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1):
        raise ValueError(f"key(s) {duplicates} appear twice in one object")
    return dict(pairs)


def _categories(doc: dict) -> dict[str, dict[int, str]]:
    raw = doc.get("categories")
    if not isinstance(raw, dict):
        raise ValueError("no 'categories' object")
    tables = {}
    for kind in ("instrument", "verb", "target", "triplet"):
        table = raw.get(kind)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"categories has no '{kind}' table")
        tables[kind] = {int(key): str(name) for key, name in table.items()}
    return tables


def _frame_answers(rows: Any, cats: dict[str, dict[int, str]]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(instruments, triplets) of one frame; ValueError names the first unusable instance."""
    if not isinstance(rows, list):
        raise ValueError("annotation is not a list of instances")
    instruments, triplets = [], []
    for k, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != ROW_LENGTH:
            raise ValueError(f"instance {k}: not a list of {ROW_LENGTH} values")
        ids = {name: _category_id(row[pos]) for name, pos in POSITIONS.items()}
        for name, value in ids.items():
            if value is None or (value != -1 and value not in cats[name]):
                raise ValueError(f"instance {k}: {name} id {row[POSITIONS[name]]!r} is not -1 or an id of "
                                 f"categories.{name}")
        if ids["triplet"] == -1:
            if ids["instrument"] != -1:  # an instrument without a triplet: the triplet label is missing
                instrument = cats["instrument"][ids["instrument"]]
                raise ValueError(f"instance {k}: instrument {instrument} without a triplet id")
            continue  # a null instance: nothing in view
        triplet = cats["triplet"][ids["triplet"]]
        parts = tuple(triplet.split(","))
        if len(parts) != 3:
            raise ValueError(f"instance {k}: triplet name {triplet!r} is not instrument,verb,target")
        for position, name in enumerate(("instrument", "verb", "target")):
            if ids[name] != -1 and cats[name][ids[name]] != parts[position]:
                raise ValueError(f"instance {k}: {name} {cats[name][ids[name]]!r} disagrees with triplet "
                                 f"{','.join(parts)!r}")
        if parts[0] not in cats["instrument"].values():
            raise ValueError(f"instance {k}: triplet instrument {parts[0]!r} is not in categories.instrument")
        if parts[0] not in instruments:
            instruments.append(parts[0])
        if parts not in triplets:  # two graspers retracting the gallbladder are one triplet in the answer
            triplets.append(parts)
    return instruments, triplets


def convert(root: Path, builder: ReleaseBuilder, *, frame_pattern: str | None = None,
            video_pattern: str | None = None, videos: set[int] | None = None) -> None:
    frame_pattern, video_pattern = frame_pattern or FRAME_PATTERN, video_pattern or VIDEO_PATTERN
    check_pattern(frame_pattern, "--frame-pattern", DATASET, video=1, frame=0)
    check_pattern(video_pattern, "--video-pattern", DATASET, video=1)
    files = sorted((root / "labels").glob("*.json"))
    if not files:
        raise DataError(f"{root}: no labels/VIDNN.json files")
    for path in files:
        match = _FILE_RE.fullmatch(path.name)
        if not match:
            builder.add_bad(path, "#file", "not named VID<NN>.json")
            continue
        video = int(match.group(1))
        if videos is not None and video not in videos:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            cats = _categories(doc)
            annotations = doc.get("annotations")
            if not isinstance(annotations, dict):
                raise ValueError("no 'annotations' object")
            if doc.get("video") not in (None, video):
                raise ValueError(f"'video' is {doc['video']!r} but the file name says {video}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            builder.add_bad(path, "#file", f"cannot use ({exc})")
            continue
        builder.add_video(video, format_path(video_pattern, "--video-pattern", video=video))
        order = [cats["instrument"][key] for key in sorted(cats["instrument"])]
        for key in sorted(annotations, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, k)):
            builder.rows += 1
            if not str(key).isdigit():
                builder.add_bad(path, f"frame {key!r}", "frame id is not a non-negative integer")
                continue
            try:
                instruments, triplets = _frame_answers(annotations[key], cats)
            except ValueError as exc:
                builder.add_bad(path, f"frame {key}", str(exc))
                continue
            frame = int(key)
            image = builder.add_image(video, f"{frame:06d}", format_path(
                frame_pattern, "--frame-pattern", video=video, frame=frame))
            builder.add_anno(image, "instruments", "instrument_recognition",
                             instrument_recognition_answer(instruments, order=order))
            if triplets:  # as in the demo data: no triplet conversation for a frame without instruments
                builder.add_anno(image, "triplets", "triplet_recognition", triplet_answer(triplets, order=order))
