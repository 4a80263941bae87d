"""Bounding boxes in answers: one canonical type, every SurgΣ-DB convention parsed, each family's rendered.

Canonical: ``Box(x1, y1, x2, y2, label)`` with floats normalised to [0, 1] of the ORIGINAL image (x right,
y down, pixel edges: a box touching the right border has x2 = 1).

Conventions found in SurgΣ-DB answers (all parsed by ``parse_boxes``):
- Qwen2-VL integer pairs on a 0-1000 grid, labels before them: ``hook (369,0),(877,567); grasper (...)``;
- the same wrapped in Qwen special tokens:
  ``<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,567)<|box_end|>``;
- normalised float lists, optionally labelled: ``gallbladder [0.282, 0.452, 0.447, 0.752]``;
- "no objects" answers ("No tools detected."): zero boxes, recognised as such.
Our own renderings (``{"bbox_2d": [...], "label": ...}``) parse back too, so predictions can be read.

What each family was trained to emit (``render_answer``):
- qwen2_vl: the special-token form above on the 0-1000 grid (Qwen2-VL's grounding format).
- qwen2_5_vl: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in ABSOLUTE pixels of the resized image the
  model sees (Qwen2.5-VL report; roboflow/supervision ``from_qwen_2_5_vl`` needs that ``input_wh`` to decode).
- qwen3_vl: the same JSON on a 0-1000 relative grid. Found with the search tool: roboflow/supervision PR #2015
  (``from_qwen_3_vl``: ``{"bbox_2d": [139, 768, 315, 954], "label": "cat"}`` decoded with
  ``resolution_wh=(1000, 1000)``), and QwenLM/Qwen3-VL ``qwen-vl-finetune/README.md`` (grounding target
  ``{"bbox_2d": [...]}``); third-party Qwen3-VL fine-tuning notes agree on relative 0-1000 coordinates.

Precision: a round trip canonical -> family -> canonical is off by at most half a grid cell: 0.5/1000 of a side
on the 0-1000 grid, half a resized pixel for Qwen2.5-VL. That is within one original pixel for sides up to
2000 px and resizes that shrink by at most 2x (surgical frames: 854x480 .. 1920x1080).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

GRID = 1000  # Qwen2-VL / Qwen3-VL relative grid

_INT = r"-?\d+"
_NUM = r"-?(?:\d+\.?\d*|\.\d+)"
_TOKEN_RE = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
# One special-token segment: optional label, then the box; bodies are checked separately so that a corrupted
# body is reported instead of being skipped.
_SEGMENT_RE = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>(?:(?!<\|).)*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>(?P<body>(?:(?!<\|).)*?)<\|box_end\|>", re.DOTALL)
_REF_ONLY_RE = re.compile(r"<\|object_ref_start\|>(?:(?!<\|).)*?<\|object_ref_end\|>", re.DOTALL)
_PAIR_BODY_RE = re.compile(rf"^\s*\(\s*({_INT})\s*,\s*({_INT})\s*\)\s*,\s*\(\s*({_INT})\s*,\s*({_INT})\s*\)\s*$")
_PAIRS_RE = re.compile(rf"\(\s*({_INT})\s*,\s*({_INT})\s*\)\s*,\s*\(\s*({_INT})\s*,\s*({_INT})\s*\)")
_LIST_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_JSON_RE = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")
# A plain box's label: up to four words right before it (after the last separator), optional colon.
_LABEL_RE = re.compile(r"(?<![\w\-])(?P<label>[A-Za-z][\w\-]*(?: [A-Za-z][\w\-]*){0,3})[ \t]*:?[ \t]*$")
_NOT_LABEL_WORDS = {"is", "are", "at", "in", "the", "a", "an", "of", "located", "found", "box", "boxes"}
_NO_OBJECTS_RE = re.compile(
    r"(?i)\b(?:no|none|zero)\b[\w\s\-]*\b(?:detected|found|visible|present|seen|identified|localized|located)\b"
    r"|\bno\s+(?:\w+\s+){0,2}(?:tools?|instruments?|objects?|organs?|tissues?|structures?|boxes)\b"
    r"|^\s*none\.?\s*$")
# Left in the text after parsing, these look like coordinates that failed to parse (spliced words, cut off).
_BROKEN_RE = re.compile(r"[(\[]\s*-?\.?\d[^)\]\n]{0,40}")


class BoxError(ValueError):
    """An answer whose boxes are recognisably there but corrupted; the message is the reason."""


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None


@dataclass(frozen=True)
class ParsedBoxes:
    """An answer split into its boxes and the text around them: ``parts[0] box0 parts[1] box1 ... parts[-1]``.

    A plain box's label (``hook (..),(..)``) is taken out of the text into ``Box.label``, so a renderer can put it
    where its family wants it; everything else stays in ``parts`` verbatim.
    """

    boxes: tuple[Box, ...]
    parts: tuple[str, ...]
    no_objects: bool  # zero boxes, and the text says so ("No tools detected.")
    conventions: frozenset[str]  # "qwen_tokens", "grid_pairs", "unit_list", "bbox_2d" found in the text

    def render(self, render_box: Callable[[Box], str]) -> str:
        out = [self.parts[0]]
        for box, text in zip(self.boxes, self.parts[1:]):
            out += [render_box(box), text]
        return "".join(out)


# ------------------------------------------------------------------------------------------------ checks
def _checked(values: tuple[float, ...], scale: tuple[float, float], what: str, where: str) -> tuple[float, ...]:
    """Range and order checks, then normalisation to [0, 1]."""
    sx, sy = scale
    x1, y1, x2, y2 = values
    if not (0 <= x1 <= sx and 0 <= x2 <= sx and 0 <= y1 <= sy and 0 <= y2 <= sy):
        raise BoxError(f"{where}: coordinates {list(values)} outside {what}")
    if x2 < x1 or y2 < y1:
        raise BoxError(f"{where}: {'x2 < x1' if x2 < x1 else 'y2 < y1'} in {list(values)}")
    return x1 / sx, y1 / sy, x2 / sx, y2 / sy


def _token_body_problem(body: str) -> str:
    pieces = re.findall(r"[^\s(),]+", body)
    bad = [p for p in pieces if not re.fullmatch(_INT, p)]
    if bad:
        return f"{bad[0]!r} is not an integer coordinate (words spliced into the numbers?)"
    if len(pieces) != 4:
        return f"{len(pieces)} coordinates, expected 4 as (x1,y1),(x2,y2)"
    return "not in the form (x1,y1),(x2,y2)"


def _token_boxes(text: str) -> list[tuple[int, int, Box]]:
    """(start, end, box) of every special-token segment; BoxError for a corrupted or unbalanced one."""
    found = []
    for n, m in enumerate(_SEGMENT_RE.finditer(text), 1):
        where = f"box {n} {m.group(0)!r}"
        numbers = _PAIR_BODY_RE.match(m.group("body"))
        if numbers is None:
            raise BoxError(f"{where}: {_token_body_problem(m.group('body'))}")
        x1, y1, x2, y2 = _checked(tuple(int(v) for v in numbers.groups()), (GRID, GRID), "the 0-1000 grid", where)
        label = m.group("label")
        found.append((m.start(), m.end(), Box(x1, y1, x2, y2, label.strip() if label is not None else None)))
    rest = _REF_ONLY_RE.sub("", _SEGMENT_RE.sub("", text))  # a label without box is legal Qwen2-VL referring
    stray = _TOKEN_RE.search(rest)
    if stray:
        context = rest[stray.start(): stray.start() + 60]
        raise BoxError(f"unbalanced special token {stray.group(0)} (unterminated or corrupted box) near {context!r}")
    return found


# ------------------------------------------------------------------------------------------------ parsing
def _label_before(text: str) -> tuple[str, str | None]:
    """Split the text before a plain box into (kept text, label)."""
    stripped = text.rstrip(" \t:")
    cut = max(stripped.rfind(sep) for sep in (";", ",", ".", ":", "\n", ")", "]", "}")) + 1
    m = _LABEL_RE.search(text, cut)
    if m is None or {w.lower() for w in m.group("label").split()} & _NOT_LABEL_WORDS:
        return text, None
    return text[: m.start()], m.group("label")


def parse_boxes(text: str, *, pixel_hw: tuple[int, int] | None = None) -> ParsedBoxes:
    """Every box in ``text``, canonical; BoxError (reason) when a box is there but corrupted.

    ``{"bbox_2d": ...}`` objects are read on the 0-1000 grid, or as absolute pixels of an image of ``pixel_hw``
    = (height, width) when given (what Qwen2.5-VL emits for its resized input).
    """
    spans: list[tuple[int, int, Box, bool]] = []  # start, end, box, whether a label may precede it in the text
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in taken)

    def add(a: int, b: int, box: Box, plain: bool) -> None:
        spans.append((a, b, box, plain))
        taken.append((a, b))

    conventions = set()
    for a, b, box in _token_boxes(text):
        add(a, b, box, False)
        conventions.add("qwen_tokens")
    json_scale, json_what = ((pixel_hw[1], pixel_hw[0]), f"the {pixel_hw[1]}x{pixel_hw[0]} image") if pixel_hw \
        else ((GRID, GRID), "the 0-1000 grid")
    for m in _JSON_RE.finditer(text):
        if not free(m.start(), m.end()):
            continue
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            raise BoxError(f"malformed bbox_2d object {m.group(0)!r}") from None
        values = obj.get("bbox_2d")
        if not (isinstance(values, list) and len(values) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise BoxError(f"{m.group(0)!r}: bbox_2d must be 4 numbers")
        label = obj.get("label")
        add(m.start(), m.end(), Box(*_checked(tuple(values), json_scale, json_what, m.group(0)),
                                    label=str(label) if label is not None else None), False)
        conventions.add("bbox_2d")
    for regex, scale, what, name in ((_PAIRS_RE, (GRID, GRID), "the 0-1000 grid", "grid_pairs"),
                                     (_LIST_RE, (1, 1), "[0, 1] (normalised floats expected)", "unit_list")):
        for m in regex.finditer(text):
            if free(m.start(), m.end()):
                add(m.start(), m.end(), Box(*_checked(tuple(float(v) for v in m.groups()), scale, what,
                                                      repr(m.group(0)))), True)
                conventions.add(name)

    spans.sort(key=lambda s: s[0])
    boxes, parts, pos = [], [], 0
    for a, b, box, plain in spans:
        before = text[pos:a]
        if plain:
            before, label = _label_before(before)
            box = Box(box.x1, box.y1, box.x2, box.y2, label)
        parts.append(before)
        boxes.append(box)
        pos = b
    parts.append(text[pos:])
    no_objects = not boxes and bool(_NO_OBJECTS_RE.search(text))
    return ParsedBoxes(tuple(boxes), tuple(parts), no_objects, frozenset(conventions))


def box_problem(text: str, *, expect_boxes: bool = False) -> str | None:
    """Why an answer's boxes cannot be trained on, or None.

    Always: corrupted ``<|object_ref_start|>``/``<|box_start|>`` segments (spliced words, wrong coordinate count,
    out of range, x2 < x1, unbalanced tokens). With ``expect_boxes`` (localization tasks) also: plain boxes out
    of range, coordinate-like fragments left unparsed, and answers with neither a box nor a "no objects" statement.
    """
    if not expect_boxes and "<|" not in text:
        return None  # no special-token box can be there (the common case: most answers are not localization)
    try:
        if not expect_boxes:
            _token_boxes(text)
            return None
        parsed = parse_boxes(text)
    except BoxError as exc:
        return str(exc)
    for part in parsed.parts:
        broken = _BROKEN_RE.search(part)
        if broken:
            return f"unparseable box-like text {broken.group(0)!r} (corrupted or cut-off coordinates)"
    if not parsed.boxes and not parsed.no_objects:
        return "localization answer with no box and no 'no objects' statement"
    return None


# ------------------------------------------------------------------------------------------------ rendering
BOX_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _round(value: float, scale: int) -> int:
    # half up (not Python's banker's rounding), clamped: the rendered value is the nearest grid cell edge
    return min(scale, max(0, math.floor(value * scale + 0.5)))


def _json_box(box: Box, sx: int, sy: int) -> str:
    obj: dict = {"bbox_2d": [_round(box.x1, sx), _round(box.y1, sy), _round(box.x2, sx), _round(box.y2, sy)]}
    if box.label is not None:
        obj["label"] = box.label
    return json.dumps(obj, ensure_ascii=False)


def box_renderer(family_name: str, resized_hw: tuple[int, int] | None = None) -> Callable[[Box], str]:
    """How ``family_name`` writes one box; Qwen2.5-VL needs the (height, width) of the resized image it sees."""
    if family_name == "qwen2_vl":
        def render(box: Box) -> str:
            x1, y1, x2, y2 = (_round(v, GRID) for v in (box.x1, box.y1, box.x2, box.y2))
            ref = f"<|object_ref_start|>{box.label}<|object_ref_end|>" if box.label is not None else ""
            return f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
        return render
    if family_name == "qwen3_vl":
        return lambda box: _json_box(box, GRID, GRID)
    if family_name == "qwen2_5_vl":
        if resized_hw is None:
            raise ValueError("qwen2_5_vl boxes are absolute pixels of the resized image: resized_hw is required")
        height, width = resized_hw
        return lambda box: _json_box(box, width, height)
    raise ValueError(f"no box convention for model family {family_name!r} (known: {', '.join(BOX_FAMILIES)})")


def render_answer(text: str, family_name: str, resized_hw: tuple[int, int] | None = None) -> str:
    """``text`` with every box rewritten in ``family_name``'s convention, other text kept. BoxError if corrupted."""
    parsed = parse_boxes(text)
    if not parsed.boxes:
        return text  # "no objects" answers and box-free text stay as they are
    return parsed.render(box_renderer(family_name, resized_hw))


def parse_answer(text: str, family_name: str, resized_hw: tuple[int, int] | None = None) -> ParsedBoxes:
    """Inverse of ``render_answer``: a family-convention answer (e.g. a prediction) back to canonical boxes."""
    if family_name == "qwen2_5_vl":
        if resized_hw is None:
            raise ValueError("qwen2_5_vl boxes are absolute pixels of the resized image: resized_hw is required")
        return parse_boxes(text, pixel_hw=resized_hw)
    box_renderer(family_name)  # validates the name
    return parse_boxes(text)
