"""Cholec80 (Twinanda et al. 2016, CAMMA) -> phase and instrument recognition conversations.

Published label files (checked against public loaders of the data set, e.g. the parsers that read
`phase_annotations/videoNN-phase.txt` with the 7 CamelCase phase names and `tool_annotations/videoNN-tool.txt`
with the 7 tool columns):
- `phase_annotations/videoNN-phase.txt`: header `Frame<TAB>Phase`, then one line per frame of the
  25 fps video (`0<TAB>Preparation`, ...).
- `tool_annotations/videoNN-tool.txt`: header `Frame<TAB>Grasper<TAB>Bipolar<TAB>Hook<TAB>Scissors<TAB>
  Clipper<TAB>Irrigator<TAB>SpecimenBag`, then one 0/1 line every 25 frames (1 fps).
Frames are sampled at `fps` (default 1: every 25th frame); frame files are named by `frame_pattern`
with the fields {video}, {frame} (index in the 25 fps video) and {index} (0-based sample number: the
second at 1 fps, like CholecT50's frame files).
"""

from __future__ import annotations

import re
from pathlib import Path

from surgsigma_train.data.convert.common import ReleaseBuilder, check_pattern, format_path, read_lines
from surgsigma_train.data.demo import PHASES, instrument_recognition_answer, phase_answer
from surgsigma_train.errors import ConfigError, DataError

DATASET = "Cholec80"
SOURCE_URL = "http://camma.u-strasbg.fr/datasets"
NATIVE_FPS = 25
FRAME_PATTERN = "Cholec80/frames/video{video:02d}/{index:06d}.png"
VIDEO_PATTERN = "Cholec80/videos/video{video:02d}.mp4"
# Published names -> the phrasing the project's answers use (demo.PHASES, same procedure order).
PHASE_NAMES: dict[str, str] = dict(zip(
    ("Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
     "GallbladderPackaging", "CleaningCoagulation", "GallbladderRetraction"), PHASES))
_FILE_RE = re.compile(r"video(\d+)-(phase|tool)\.txt")


def _label_files(root: Path, builder: ReleaseBuilder, videos: set[int] | None) -> dict[int, dict[str, Path]]:
    found: dict[int, dict[str, Path]] = {}
    for folder, kind in (("phase_annotations", "phase"), ("tool_annotations", "tool")):
        for path in sorted((root / folder).glob("*.txt")):
            match = _FILE_RE.fullmatch(path.name)
            if not match or match.group(2) != kind:
                builder.add_bad(path, "#file", f"not named video<NN>-{kind}.txt")
            elif videos is None or int(match.group(1)) in videos:
                found.setdefault(int(match.group(1)), {})[kind] = path
    if not found and not builder.bad:
        raise DataError(f"{root}: no phase_annotations/videoNN-phase.txt or tool_annotations/videoNN-tool.txt"
                        + (" for the selected videos" if videos else ""))
    return found


def _rows(path: Path, header: list[str] | None, builder: ReleaseBuilder) -> tuple[list[str], list] | None:
    """(header, [(line, frame, values)]); `header=None` accepts any header that starts with `Frame`."""
    lines = read_lines(path, builder)
    if lines is None:
        return None
    first = lines[0][1].split()
    if (header is not None and first != header) or (header is None and (len(first) < 2 or first[0] != "Frame")):
        builder.add_bad(path, "line 1", f"header {first} is not {header or ['Frame', '<tool>', '...']}")
        return None
    rows, seen = [], set()
    for number, line in lines[1:]:
        builder.rows += 1
        fields = line.split()
        if len(fields) != len(first):
            builder.add_bad(path, f"line {number}", f"{len(fields)} columns, the header has {len(first)}")
        elif not fields[0].isdigit():
            builder.add_bad(path, f"line {number}", f"frame {fields[0]!r} is not a non-negative integer")
        elif int(fields[0]) in seen:
            builder.add_bad(path, f"line {number}", f"frame {fields[0]} listed twice")
        else:
            seen.add(int(fields[0]))
            rows.append((number, int(fields[0]), fields[1:]))
    return first, rows


def convert(root: Path, builder: ReleaseBuilder, *, frame_pattern: str | None = None,
            video_pattern: str | None = None, videos: set[int] | None = None, fps: float = 1.0) -> None:
    frame_pattern, video_pattern = frame_pattern or FRAME_PATTERN, video_pattern or VIDEO_PATTERN
    step = NATIVE_FPS / fps if fps > 0 else 0
    if step < 1 or step != int(step):
        raise ConfigError(f"--fps {fps}: Cholec80 is annotated at {NATIVE_FPS} fps; the sampling rate must give a "
                          f"whole number of source frames per sample (e.g. 1, 5, 25, 0.5)")
    step = int(step)
    check_pattern(frame_pattern, "--frame-pattern", DATASET, video=1, frame=0, index=0)
    check_pattern(video_pattern, "--video-pattern", DATASET, video=1)

    for video, files in sorted(_label_files(root, builder, videos).items()):
        builder.add_video(video, format_path(video_pattern, "--video-pattern", video=video))

        def image(frame: int) -> str:
            path = format_path(frame_pattern, "--frame-pattern", video=video, frame=frame, index=frame // step)
            return builder.add_image(video, f"{frame:06d}", path)

        if "phase" in files and (table := _rows(files["phase"], ["Frame", "Phase"], builder)):
            for number, frame, (phase,) in table[1]:
                if phase not in PHASE_NAMES:
                    builder.add_bad(files["phase"], f"line {number}", f"unknown phase {phase!r} "
                                    f"(known: {', '.join(PHASE_NAMES)})")
                elif frame % step:
                    builder.excluded[f"phase rows between the frames sampled at {fps:g} fps"] += 1
                else:
                    builder.add_anno(image(frame), "phase", "phase_recognition", phase_answer(PHASE_NAMES[phase]))
        if "tool" in files and (table := _rows(files["tool"], None, builder)):
            tools = table[0][1:]
            for number, frame, flags in table[1]:
                if any(flag not in ("0", "1") for flag in flags):
                    builder.add_bad(files["tool"], f"line {number}", f"tool flags {flags} are not all 0 or 1")
                elif frame % step:
                    builder.excluded[f"tool rows between the frames sampled at {fps:g} fps"] += 1
                else:
                    present = [tool for tool, flag in zip(tools, flags) if flag == "1"]
                    builder.add_anno(image(frame), "instruments", "instrument_recognition",
                                     instrument_recognition_answer(present, order=tools))
