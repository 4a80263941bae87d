"""Endoscapes2023 / Endoscapes-CVS201 (Mascagni et al., CAMMA) -> critical-view-of-safety conversations.

Published format (Endoscapes technical report, arXiv 2312.12429, and public loaders of the data set):
`all_metadata.csv` with one row per frame: `vid`, `frame`, `avg_cvs`, `C1`, `C2`, `C3` (the three
annotators' mean per criterion), `is_ds_keyframe`, `cvs_annotator_1..3` (each rater's three labels;
empty on rows the release interpolated between annotated keyframes), `mask_path`, `label_path`; and
the official video splits `train_vids.txt`, `val_vids.txt`, `test_vids.txt` (one video id a line).
A criterion counts as achieved when the mean is >= 0.5, i.e. a majority of the three raters (the
convention of the report's CVS benchmark). Only rater-annotated rows are converted unless
`include_interpolated` is set; the others are counted as excluded.

The zip stores frames flat per split (`train/8_14775.jpg`), which cannot name the patient video in a
path; the default pattern expects one folder per video (`Endoscapes/frames/vid8/8_14775.jpg`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from surgsigma_train.data.convert.common import ReleaseBuilder, check_pattern, format_path, read_lines
from surgsigma_train.data.demo import cvs_answer
from surgsigma_train.errors import DataError

DATASET = "Endoscapes"
SOURCE_URL = "https://github.com/CAMMA-public/Endoscapes"
FRAME_PATTERN = "Endoscapes/frames/vid{video}/{video}_{frame}.jpg"
VIDEO_PATTERN = "Endoscapes/frames/vid{video}"  # the data set ships frames only
CRITERIA = ("C1", "C2", "C3")  # two structures, hepatocystic triangle cleared, cystic plate (lower third)
ANNOTATOR_PREFIX = "cvs_annotator_"


def _int(text: str | None) -> int | None:
    """'8' or '8.0' (pandas writes ids as floats) -> 8."""
    try:
        value = float(text or "")
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


def _split_videos(root: Path, split: str, builder: ReleaseBuilder) -> set[int]:
    path = root / f"{split}_vids.txt"
    if not path.is_file():
        raise DataError(f"{path}: no such split file (Endoscapes ships train_vids.txt, val_vids.txt, test_vids.txt)")
    videos = set()
    for number, line in read_lines(path, builder) or []:
        if (video := _int(line.strip())) is None:
            builder.add_bad(path, f"line {number}", f"{line.strip()!r} is not a video id")
        else:
            videos.add(video)
    return videos


def convert(root: Path, builder: ReleaseBuilder, *, frame_pattern: str | None = None,
            video_pattern: str | None = None, videos: set[int] | None = None, split: str | None = None,
            include_interpolated: bool = False) -> None:
    frame_pattern, video_pattern = frame_pattern or FRAME_PATTERN, video_pattern or VIDEO_PATTERN
    check_pattern(frame_pattern, "--frame-pattern", DATASET, video=1, frame=0)
    check_pattern(video_pattern, "--video-pattern", DATASET, video=1)
    if split is not None:
        in_split = _split_videos(root, split, builder)
        videos = in_split if videos is None else videos & in_split
    path = root / "all_metadata.csv"
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if missing := [c for c in ("vid", "frame", *CRITERIA) if c not in columns]:
                raise DataError(f"{path}: missing column(s) {missing} (has {columns})")
            annotators = [c for c in columns if c.startswith(ANNOTATOR_PREFIX)]
            first_line: dict[tuple[int, int], int] = {}
            for row in reader:
                builder.rows += 1
                where = f"line {reader.line_num}"
                video, frame = _int(row.get("vid")), _int(row.get("frame"))
                if video is None or frame is None:
                    builder.add_bad(path, where, f"vid {row.get('vid')!r} / frame {row.get('frame')!r} are not ids")
                    continue
                if videos is not None and video not in videos:
                    builder.excluded["video not selected (--videos / --split)"] += 1
                    continue
                if annotators and not include_interpolated and not any((row.get(c) or "").strip() for c in annotators):
                    builder.excluded["interpolated between rater-annotated frames (no cvs_annotator_* value)"] += 1
                    continue
                try:
                    means = [float(row.get(c) or "") for c in CRITERIA]
                except ValueError:
                    means = []
                if len(means) != 3 or not all(0.0 <= m <= 1.0 for m in means):
                    builder.add_bad(path, where, f"C1..C3 {[row.get(c) for c in CRITERIA]} are not numbers in [0, 1]")
                    continue
                if (video, frame) in first_line:
                    builder.add_bad(path, where, f"vid {video} frame {frame} already on line "
                                    f"{first_line[video, frame]}")
                    continue
                first_line[video, frame] = reader.line_num
                builder.add_video(video, format_path(video_pattern, "--video-pattern", video=video))
                image = builder.add_image(video, f"{frame:06d}", format_path(
                    frame_pattern, "--frame-pattern", video=video, frame=frame))
                builder.add_anno(image, "cvs", "safety_assessment", cvs_answer(*(m >= 0.5 for m in means)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
