"""A deterministic, synthetic SurgΣ-DB-format demo data set (laparoscopic cholecystectomy).

Real SurgΣ-DB media (Cholec80 / CholecT50) cannot be redistributed and cannot be downloaded on CI, yet
the whole stack (readers, splits, collators, training, evaluation) needs data in the released layout.
This module draws a cartoon cholecystectomy with numpy and writes it exactly like the release:
``train.json`` / ``heldout.json`` (keys with spaces, ``videos`` / ``images`` / ``annos``) plus the media
under ``raw_data/``.

Design rule: THE PICTURE DETERMINES THE ANSWER. Every answer is computed from what was drawn (phase ->
large colour-distinct anatomy state, instruments -> unique flat colours and tip shapes, boxes -> the
visible pixels in the written PNG, triplets -> the instrument plus the anatomy under its tip, CVS -> one
visible cue per criterion, actions -> instrument plus motion), so a tiny randomly initialised VLM can
learn the tasks on a CPU in minutes and a metric above chance means the pipeline works.

Determinism: every random draw comes from ``np.random.default_rng([seed, video, purpose, ...])``, so
the content of VIDnn depends only on ``(seed, nn)``, never on generation order. PNGs (Pillow, zlib)
and mp4s (libx264, one thread) are byte-identical for the same seed on the same software stack.

Usage: ``python -m surgsigma_train.data.demo OUT_DIR [--seed 0]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# Public constants (other modules and tests build on these; keep them stable)
# ---------------------------------------------------------------------------------------------------

DEMO_SOURCE_DATASET = "DemoLap"
DEMO_SOURCE_URL = "synthetic://surgsigma_train/demo"
DEMO_SPECIALTY = "Hepatobiliary"
DEMO_SURGICAL_TYPE = "Cholecystectomy"

FRAME_WIDTH = 224  # even, and a multiple of 16 so H.264 needs no padding
FRAME_HEIGHT = 128
CLIP_FPS = 8
CLIP_NUM_FRAMES = 16  # 2 s at 8 fps
CLIPS_PER_VIDEO = 6
MIN_FRAMES_PER_VIDEO = 35
MAX_FRAMES_PER_VIDEO = 45

# The project's default task-id mapping (the release's own numbering is not fully known).
TASK_INSTRUMENT_LOCALIZATION = 1
TASK_INSTRUMENT_RECOGNITION = 2
TASK_PHASE_RECOGNITION = 5
TASK_ACTION_RECOGNITION = 8
TASK_TRIPLET_RECOGNITION = 9
TASK_SAFETY_ASSESSMENT = 11
TASK_IDS: dict[str, int] = {
    "instrument_localization": TASK_INSTRUMENT_LOCALIZATION,
    "instrument_recognition": TASK_INSTRUMENT_RECOGNITION,
    "phase_recognition": TASK_PHASE_RECOGNITION,
    "action_recognition": TASK_ACTION_RECOGNITION,
    "triplet_recognition": TASK_TRIPLET_RECOGNITION,
    "safety_assessment": TASK_SAFETY_ASSESSMENT,
}

# Cholec80 phases, in procedure order.
PHASES: tuple[str, ...] = (
    "Preparation",
    "Calot Triangle Dissection",
    "Clipping and Cutting",
    "Gallbladder Dissection",
    "Gallbladder Packaging",
    "Cleaning and Coagulation",
    "Gallbladder Retraction",
)
# CholecT50 instruments, in the fixed order used to sort every answer.
INSTRUMENTS: tuple[str, ...] = ("grasper", "bipolar", "hook", "scissors", "clipper", "irrigator")
# The 10 basic actions of the action-recognition task.
ACTIONS: tuple[str, ...] = (
    "aspiration",
    "clipping",
    "coagulation",
    "dissection",
    "knot-tying",
    "needle grasping",
    "needle puncture",
    "packaging",
    "suture pulling",
    "tissue retraction",
)
# Reserved flat colours (shaft, tip): no tissue pixel ever carries one of these exact values, so the
# instrument's pixels in a written PNG are exactly the pixels of these colours.
INSTRUMENT_COLOURS_RGB: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "grasper": ((30, 60, 230), (110, 150, 255)),
    "bipolar": ((0, 200, 210), (150, 255, 250)),
    "hook": ((230, 30, 210), (255, 150, 245)),
    "scissors": ((255, 130, 0), (255, 205, 110)),
    "clipper": ((130, 20, 255), (195, 150, 255)),
    "irrigator": ((15, 15, 15), (95, 95, 95)),
}

NO_TOOLS_ANSWER = "No tools detected."

QUESTIONS: dict[int, tuple[str, ...]] = {
    TASK_PHASE_RECOGNITION: (
        "What is the current surgical phase shown in this image?",
        "Which phase of the cholecystectomy does this frame show?",
        "Identify the surgical phase in this image.",
        "What surgical phase is being performed here?",
    ),
    TASK_INSTRUMENT_RECOGNITION: (
        "Which surgical instruments are visible in this image?",
        "What tools can be seen in this frame?",
        "List the categories of the instruments present in this image.",
    ),
    TASK_INSTRUMENT_LOCALIZATION: (
        "Locate every surgical instrument in this image and give its bounding box.",
        "Where are the instruments in this frame? Answer with bounding boxes.",
        "Detect the surgical tools in this image and output their boxes.",
    ),
    TASK_TRIPLET_RECOGNITION: (
        "What instrument-verb-target triplets are shown in this image?",
        "Describe the tool-tissue interactions in this frame as action triplets.",
        "Which action triplets <instrument, verb, target> are happening in this image?",
    ),
    TASK_SAFETY_ASSESSMENT: (
        "Assess the critical view of safety in this image.",
        "Are the three criteria of the critical view of safety met in this frame?",
        "Evaluate the critical view of safety criteria shown in this image.",
    ),
    TASK_ACTION_RECOGNITION: (
        "What action is being performed in this video clip?",
        "Which basic surgical action does this clip show?",
        "Identify the surgical action in this video.",
    ),
}


def phase_answer(phase: str) -> str:
    return f"The reflected phase is {phase}."


def instrument_recognition_answer(instruments: Sequence[str], order: Sequence[str] = INSTRUMENTS) -> str:
    """Names sorted by ``order`` (another dataset passes its own taxonomy); first letter upper-cased,
    the rest kept, so ``grasper`` -> ``Grasper`` and Cholec80's ``SpecimenBag`` stays ``SpecimenBag``."""
    if not instruments:
        return NO_TOOLS_ANSWER
    ordered = sorted(instruments, key=order.index)
    return "They belong to the categories " + ", ".join(name[:1].upper() + name[1:] for name in ordered) + "."


def localization_answer(boxes_1000: dict[str, tuple[int, int, int, int]]) -> str:
    """``{name: (x1, y1, x2, y2)}`` on the Qwen2-VL 0-1000 grid -> ``hook (x1,y1),(x2,y2); ...``."""
    if not boxes_1000:
        return NO_TOOLS_ANSWER
    parts = []
    for name in sorted(boxes_1000, key=INSTRUMENTS.index):
        x1, y1, x2, y2 = boxes_1000[name]
        parts.append(f"{name} ({x1},{y1}),({x2},{y2})")
    return "; ".join(parts)


def triplet_answer(triplets: Sequence[tuple[str, str, str]], order: Sequence[str] = INSTRUMENTS) -> str:
    ordered = sorted(triplets, key=lambda triplet: order.index(triplet[0]))
    return "The action triplets are " + ", ".join(f"<{i}, {v}, {t}>" for i, v, t in ordered) + "."


def cvs_answer(two_structures: bool, triangle_cleared: bool, lower_third_dissected: bool) -> str:
    def yes_no(flag: bool) -> str:
        return "yes" if flag else "no"

    return (
        f"Two structures: {yes_no(two_structures)}. "
        f"Hepatocystic triangle cleared: {yes_no(triangle_cleared)}. "
        f"Lower third of gallbladder dissected: {yes_no(lower_third_dissected)}."
    )


def action_answer(action: str) -> str:
    return f"The action is {action}."


def box_to_1000_grid(
    col_min: int, row_min: int, col_max: int, row_max: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """Inclusive pixel bbox -> 0-1000 grid. Pixel edges are used (the right/bottom edge of the last
    pixel is ``col_max + 1``), so a box touching the image border reaches exactly 0 or 1000."""
    return (
        round(col_min * 1000 / width),
        round(row_min * 1000 / height),
        round((col_max + 1) * 1000 / width),
        round((row_max + 1) * 1000 / height),
    )


# ---------------------------------------------------------------------------------------------------
# Anatomy: region labels, their colours and the CholecT50 target each stands for
# ---------------------------------------------------------------------------------------------------


class _Region(IntEnum):
    TISSUE = 0
    VESSEL = 1
    LIVER = 2
    LIVER_BED = 3
    GALLBLADDER = 4
    OMENTUM = 5
    FAT = 6
    WINDOW = 7
    CYSTIC_DUCT = 8
    CYSTIC_ARTERY = 9
    CLIP = 10
    CYSTIC_PLATE = 11
    BAG = 12
    BAG_RIM = 13
    BLOOD = 14
    WATER = 15
    THREAD = 16
    NEEDLE = 17
    SPARK = 18
    CHAR = 19


_REGION_RGB = np.array(
    [
        (196, 96, 90),  # TISSUE: pinkish-red peritoneum
        (140, 35, 45),  # VESSEL
        (128, 44, 38),  # LIVER: dark red-brown
        (218, 126, 40),  # LIVER_BED: raw orange-brown surface left by the detached gallbladder
        (70, 150, 62),  # GALLBLADDER: green
        (232, 178, 168),  # OMENTUM: pale pink fat covering the triangle
        (232, 200, 72),  # FAT: yellow fat of the hepatocystic triangle
        (70, 18, 30),  # WINDOW: dark gap of a cleared triangle
        (236, 226, 188),  # CYSTIC_DUCT: cream tube
        (214, 40, 52),  # CYSTIC_ARTERY: bright red tube
        (205, 208, 218),  # CLIP: silver
        (246, 226, 214),  # CYSTIC_PLATE: pale band under a dissected lower third
        (244, 244, 238),  # BAG: white retrieval bag
        (150, 160, 180),  # BAG_RIM
        (88, 8, 14),  # BLOOD: dark pool
        (160, 200, 232),  # WATER: irrigation fluid
        (238, 238, 226),  # THREAD
        (212, 212, 222),  # NEEDLE
        (255, 252, 200),  # SPARK
        (58, 38, 30),  # CHAR
    ],
    dtype=np.float32,
)
# Regions drawn flat (no tissue texture): metal, plastic, light.
_FLAT_REGIONS = (_Region.CLIP, _Region.BAG_RIM, _Region.THREAD, _Region.NEEDLE, _Region.SPARK)

_TARGET_OF_REGION: dict[_Region, str] = {
    _Region.TISSUE: "null_target",
    _Region.VESSEL: "blood_vessel",
    _Region.LIVER: "liver",
    _Region.LIVER_BED: "cystic_plate",
    _Region.GALLBLADDER: "gallbladder",
    _Region.OMENTUM: "omentum",
    _Region.FAT: "cystic_pedicle",
    _Region.CYSTIC_DUCT: "cystic_duct",
    _Region.CYSTIC_ARTERY: "cystic_artery",
    _Region.CYSTIC_PLATE: "cystic_plate",
    _Region.BAG: "specimen_bag",
    _Region.BLOOD: "fluid",
    _Region.WATER: "fluid",
}

# Where each instrument's trocar is: its shaft always enters the image from this border area.
# (x, y) as fractions of the image; one coordinate lies just outside the image.
_PORTS: dict[str, tuple[float, float]] = {
    "grasper": (0.85, -0.12),
    "bipolar": (0.35, 1.12),
    "hook": (-0.08, 0.78),
    "scissors": (-0.08, 0.45),
    "clipper": (-0.08, 0.62),
    "irrigator": (0.82, 1.12),
}


@dataclass(frozen=True)
class _ToolUse:
    """One instrument in the phase plan: where its tip goes and what it then does there."""

    instrument: str
    target_regions: tuple[_Region, ...]
    verb: str
    probability: float


# Typical instruments per phase (Cholec80 / CholecT50 usage). The verb depends on instrument, target
# and phase, all of which are visible; the target is read back from the anatomy under the tip.
_PHASE_TOOL_PLANS: dict[str, tuple[_ToolUse, ...]] = {
    "Preparation": (
        _ToolUse("grasper", (_Region.GALLBLADDER,), "retract", 0.95),
        _ToolUse("hook", (_Region.OMENTUM,), "dissect", 0.6),
    ),
    "Calot Triangle Dissection": (
        _ToolUse("grasper", (_Region.GALLBLADDER,), "retract", 0.9),
        _ToolUse("hook", (_Region.CYSTIC_DUCT, _Region.CYSTIC_ARTERY, _Region.FAT), "dissect", 0.85),
        _ToolUse("bipolar", (_Region.VESSEL,), "coagulate", 0.2),
    ),
    "Clipping and Cutting": (
        _ToolUse("grasper", (_Region.GALLBLADDER,), "retract", 0.85),
        # Clipper before the cut, scissors after it: the cut itself is visible (see _render_anatomy).
        _ToolUse("clipper", (_Region.CYSTIC_DUCT, _Region.CYSTIC_ARTERY), "clip", 0.9),
        _ToolUse("scissors", (_Region.CYSTIC_DUCT, _Region.CYSTIC_ARTERY), "cut", 0.9),
    ),
    "Gallbladder Dissection": (
        _ToolUse("grasper", (_Region.GALLBLADDER,), "retract", 0.9),
        _ToolUse("hook", (_Region.GALLBLADDER, _Region.LIVER_BED), "dissect", 0.8),
        _ToolUse("bipolar", (_Region.LIVER_BED,), "coagulate", 0.2),
    ),
    "Gallbladder Packaging": (
        _ToolUse("grasper", (_Region.GALLBLADDER,), "pack", 0.9),
        _ToolUse("hook", (_Region.TISSUE,), "null_verb", 0.3),
    ),
    "Cleaning and Coagulation": (
        _ToolUse("irrigator", (_Region.BLOOD,), "aspirate", 0.75),
        _ToolUse("bipolar", (_Region.LIVER_BED, _Region.LIVER), "coagulate", 0.6),
        _ToolUse("grasper", (_Region.LIVER,), "retract", 0.3),
    ),
    "Gallbladder Retraction": (
        _ToolUse("grasper", (_Region.BAG,), "grasp", 0.95),
        _ToolUse("irrigator", (_Region.LIVER,), "irrigate", 0.25),
    ),
}

# Background scene of an action clip: a phase in which the action plausibly happens.
_ACTION_PHASES: dict[str, tuple[str, ...]] = {
    "aspiration": ("Cleaning and Coagulation",),
    "clipping": ("Clipping and Cutting",),
    "coagulation": ("Gallbladder Dissection", "Cleaning and Coagulation"),
    "dissection": ("Calot Triangle Dissection", "Gallbladder Dissection"),
    "knot-tying": ("Gallbladder Dissection", "Cleaning and Coagulation"),
    "needle grasping": ("Gallbladder Dissection", "Cleaning and Coagulation"),
    "needle puncture": ("Gallbladder Dissection", "Cleaning and Coagulation"),
    "packaging": ("Gallbladder Packaging",),
    "suture pulling": ("Gallbladder Dissection", "Cleaning and Coagulation"),
    "tissue retraction": ("Preparation", "Calot Triangle Dissection", "Gallbladder Dissection"),
}

# Relative phase lengths (Cholec80-like: the two dissections dominate).
_PHASE_WEIGHTS = np.array([0.08, 0.24, 0.12, 0.22, 0.10, 0.13, 0.11])
_MIN_FRAMES_PER_PHASE = 3
_NO_TOOL_PROBABILITY = 0.07

# Purpose codes keep the random streams of different uses of one video independent.
_RNG_LAYOUT, _RNG_FRAME, _RNG_CLIP, _RNG_TEXT = 1, 2, 3, 4


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # SeedSequence pads its entropy with zeros, so [s, v, 3] and [s, v, 3, 0] would give the SAME stream;
    # ending every key list with its (non-zero) length keeps all streams distinct.
    return np.random.default_rng([seed, *keys, len(keys) + 1])


# ---------------------------------------------------------------------------------------------------
# Vectorised shape masks (all on a pixel-centre grid; no per-pixel Python loops)
# ---------------------------------------------------------------------------------------------------

_Y_GRID, _X_GRID = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH].astype(np.float32)
_Point = tuple[float, float]


def _segment_mask(p0: _Point, p1: _Point, half_width: float) -> np.ndarray:
    """Pixels within ``half_width`` of the segment p0-p1 (a capsule)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length_sq = max(dx * dx + dy * dy, 1e-6)
    t = np.clip(((_X_GRID - p0[0]) * dx + (_Y_GRID - p0[1]) * dy) / length_sq, 0.0, 1.0)
    dist_sq = (_X_GRID - p0[0] - t * dx) ** 2 + (_Y_GRID - p0[1] - t * dy) ** 2
    return dist_sq <= half_width * half_width


def _polyline_mask(points: Sequence[_Point], half_width: float) -> np.ndarray:
    mask = np.zeros((FRAME_HEIGHT, FRAME_WIDTH), dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:]):
        mask |= _segment_mask(p0, p1, half_width)
    return mask


def _disc_mask(centre: _Point, radius: float) -> np.ndarray:
    return (_X_GRID - centre[0]) ** 2 + (_Y_GRID - centre[1]) ** 2 <= radius * radius


def _blob_mask(
    centre: _Point, radii: tuple[float, float], angle_deg: float, wobble: Sequence[float] = ()
) -> np.ndarray:
    """A rotated ellipse whose radius is modulated by a few harmonics (organic outlines).

    ``wobble`` = (amplitude, phase, amplitude, phase, ...) for harmonics 2, 3, ...
    """
    angle = math.radians(angle_deg)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rel_x, rel_y = _X_GRID - centre[0], _Y_GRID - centre[1]
    u = (rel_x * cos_a + rel_y * sin_a) / radii[0]
    v = (-rel_x * sin_a + rel_y * cos_a) / radii[1]
    radius_sq = u * u + v * v
    if not wobble:
        return radius_sq <= 1.0
    theta = np.arctan2(v, u)
    limit = np.ones_like(theta)
    for harmonic, (amplitude, phase) in enumerate(zip(wobble[0::2], wobble[1::2]), start=2):
        limit += amplitude * np.sin(harmonic * theta + phase)
    return radius_sq <= limit * limit


def _convex_polygon_mask(vertices: Sequence[_Point]) -> np.ndarray:
    """Inside a convex polygon given in either winding order."""
    signs = []
    for (x0, y0), (x1, y1) in zip(vertices, [*vertices[1:], vertices[0]]):
        signs.append((x1 - x0) * (_Y_GRID - y0) - (y1 - y0) * (_X_GRID - x0))
    stacked = np.stack(signs)
    return np.all(stacked >= 0, axis=0) | np.all(stacked <= 0, axis=0)


def _smooth_noise_HW(rng: np.random.Generator, cells_y: int, cells_x: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise: smooth, tissue-like variation in [-~2, ~2]."""
    coarse = rng.standard_normal((cells_y + 1, cells_x + 1)).astype(np.float32)
    ys = np.linspace(0.0, cells_y, FRAME_HEIGHT, dtype=np.float32)
    xs = np.linspace(0.0, cells_x, FRAME_WIDTH, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells_y - 1)
    x0 = np.minimum(xs.astype(np.int64), cells_x - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _rotate(vector: _Point, angle_deg: float) -> _Point:
    angle = math.radians(angle_deg)
    return (
        vector[0] * math.cos(angle) - vector[1] * math.sin(angle),
        vector[0] * math.sin(angle) + vector[1] * math.cos(angle),
    )


def _add(p: _Point, q: _Point, scale: float = 1.0) -> _Point:
    return (p[0] + scale * q[0], p[1] + scale * q[1])


# ---------------------------------------------------------------------------------------------------
# Scene: per-video layout, per-frame camera, per-frame anatomy state
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Per-video (per-patient) anatomy; coordinates in pixels of the un-jittered camera."""

    liver_edge_y: float
    liver_wave: tuple[float, float, float]  # amplitude, spatial frequency, phase
    gb_centre: _Point
    gb_radii: tuple[float, float]
    gb_angle: float
    gb_wobble: tuple[float, ...]
    neck: _Point  # where the cystic duct and artery leave the gallbladder
    duct_end: _Point
    artery_end: _Point
    triangle: tuple[_Point, _Point, _Point]
    vessels: tuple[tuple[float, float, float, float], ...]  # y, amplitude, frequency, phase
    tissue_tint: tuple[float, float, float]
    cvs_thresholds: tuple[float, float, float]  # Calot progress at which each criterion is met
    pool_centre: _Point
    bag_centre: _Point


def _make_layout(rng: np.random.Generator) -> _Layout:
    gb_centre = (138.0 + rng.uniform(-8, 8), 56.0 + rng.uniform(-4, 4))
    gb_angle = -15.0 + rng.uniform(-8, 8)
    gb_radii = (44.0 + rng.uniform(-4, 4), 19.0 + rng.uniform(-2, 2))
    neck_dir = _rotate((-1.0, 0.0), gb_angle)
    neck = _add(gb_centre, neck_dir, gb_radii[0] * 0.92)
    duct_end = (rng.uniform(18, 34), rng.uniform(112, 124))
    artery_end = (rng.uniform(16, 30), rng.uniform(52, 64))
    triangle = (
        _add(neck, (6.0, 0.0)),
        (rng.uniform(40, 52), rng.uniform(34, 42)),
        (rng.uniform(50, 62), rng.uniform(106, 116)),
    )
    vessels = tuple(
        (rng.uniform(70, 120), rng.uniform(3, 8), rng.uniform(0.03, 0.07), rng.uniform(0, 2 * math.pi))
        for _ in range(3)
    )
    thresholds = tuple(float(t) for t in rng.uniform(0.15, 0.9, size=3))
    return _Layout(
        liver_edge_y=28.0 + rng.uniform(-4, 4),
        liver_wave=(rng.uniform(3, 7), rng.uniform(0.015, 0.035), rng.uniform(0, 2 * math.pi)),
        gb_centre=gb_centre,
        gb_radii=gb_radii,
        gb_angle=gb_angle,
        gb_wobble=tuple(float(w) for w in rng.uniform(-0.06, 0.06, size=4)),
        neck=neck,
        duct_end=duct_end,
        artery_end=artery_end,
        triangle=triangle,
        vessels=vessels,
        tissue_tint=tuple(float(t) for t in rng.uniform(0.97, 1.03, size=3)),
        cvs_thresholds=(thresholds[0], thresholds[1], thresholds[2]),
        pool_centre=(rng.uniform(80, 110), rng.uniform(86, 98)),
        bag_centre=(rng.uniform(100, 130), rng.uniform(90, 100)),
    )


@dataclass(frozen=True)
class _Camera:
    """Per-frame (or per-clip) jitter: shift, brightness and texture noise."""

    shift: _Point
    brightness: float
    texture_HW: np.ndarray = field(repr=False)
    colour_noise_HWC: np.ndarray = field(repr=False)


def _make_camera(rng: np.random.Generator) -> _Camera:
    texture_HW = 0.10 * _smooth_noise_HW(rng, 4, 7) + 0.05 * _smooth_noise_HW(rng, 12, 21)
    colour_noise_HWC = np.stack([_smooth_noise_HW(rng, 6, 10) for _ in range(3)], axis=-1) * 5.0
    return _Camera(
        shift=(float(rng.uniform(-6, 6)), float(rng.uniform(-4, 4))),
        brightness=float(rng.uniform(0.94, 1.06)),
        texture_HW=texture_HW,
        colour_noise_HWC=colour_noise_HWC,
    )


@dataclass(frozen=True)
class _AnatomyState:
    phase: str
    progress: float  # 0..1 within the phase
    cvs: tuple[bool, bool, bool] = (False, False, False)
    gb_shift: _Point = (0.0, 0.0)  # extra gallbladder displacement (clips move it)
    pool_scale: float = 1.0


def _cvs_state(layout: _Layout, phase: str, progress: float) -> tuple[bool, bool, bool]:
    if phase == "Calot Triangle Dissection":
        met = tuple(progress >= threshold for threshold in layout.cvs_thresholds)
        return (met[0], met[1], met[2])
    # The critical view is achieved before anything is clipped.
    if phase == "Clipping and Cutting":
        return (True, True, True)
    return (False, False, False)


def _paint(region_map: np.ndarray, mask: np.ndarray, region: _Region) -> None:
    region_map[mask] = region


def _render_anatomy(layout: _Layout, state: _AnatomyState, camera: _Camera) -> np.ndarray:
    """The anatomy region map (H, W) of one frame. Colours are applied later by ``_colourise``.

    Each phase has one large, colour-distinct anatomy state (the cue a small ViT can learn):
    intact green gallbladder under pale omentum / yellow triangle with duct, artery and window /
    silver clips (then a visible cut) / gallbladder lifted off an orange liver bed / white bag low in
    the frame / dark blood pool with irrigation fluid / bag leaving through the top border.
    """
    shift = camera.shift
    phase, progress = state.phase, state.progress
    phase_index = PHASES.index(phase)

    def at(p: _Point) -> _Point:
        return (p[0] + shift[0], p[1] + shift[1])

    region_map = np.full((FRAME_HEIGHT, FRAME_WIDTH), _Region.TISSUE, dtype=np.uint8)
    for y, amplitude, frequency, phase_offset in layout.vessels:
        curve_y = y + shift[1] + amplitude * np.sin(frequency * (_X_GRID - shift[0]) + phase_offset)
        _paint(region_map, np.abs(_Y_GRID - curve_y) <= 1.2, _Region.VESSEL)

    amplitude, frequency, phase_offset = layout.liver_wave
    liver_edge = layout.liver_edge_y + shift[1] + amplitude * np.sin(frequency * (_X_GRID - shift[0]) + phase_offset)
    _paint(region_map, _Y_GRID < liver_edge, _Region.LIVER)

    gb_centre = at(layout.gb_centre)
    neck = at(layout.neck)
    duct_end, artery_end = at(layout.duct_end), at(layout.artery_end)
    triangle = tuple(at(p) for p in layout.triangle)
    two_structures, triangle_cleared, lower_third = state.cvs

    def draw_gallbladder(centre: _Point, scale: float, angle: float) -> None:
        radii = (layout.gb_radii[0] * scale, layout.gb_radii[1] * scale)
        _paint(region_map, _blob_mask(centre, radii, angle, layout.gb_wobble), _Region.GALLBLADDER)

    def draw_clips(count: int, cut: bool) -> None:
        # Big chunky clips across duct and artery: the large-area cue of "Clipping and Cutting".
        tubes = ((neck, duct_end), (neck, artery_end))
        for clip_index in range(count):
            start, end = tubes[clip_index % 2]
            along = 0.22 + 0.16 * (clip_index // 2)
            centre = _add(start, (end[0] - start[0], end[1] - start[1]), along)
            direction = (end[0] - start[0], end[1] - start[1])
            norm = math.hypot(*direction)
            normal = (-direction[1] / norm, direction[0] / norm)
            half_length = 11.0
            _paint(
                region_map,
                _segment_mask(_add(centre, normal, -half_length), _add(centre, normal, half_length), 4.0),
                _Region.CLIP,
            )
        if cut:
            for start, end in tubes:
                centre = _add(start, (end[0] - start[0], end[1] - start[1]), 0.30)
                _paint(region_map, _disc_mask(centre, 4.5), _Region.WINDOW)

    def draw_stumps() -> None:
        for end, region in ((duct_end, _Region.CYSTIC_DUCT), (artery_end, _Region.CYSTIC_ARTERY)):
            stump_end = _add(end, (neck[0] - end[0], neck[1] - end[1]), 0.45)
            _paint(region_map, _segment_mask(end, stump_end, 4.0 if region == _Region.CYSTIC_DUCT else 2.8), region)
            clip_at = _add(end, (neck[0] - end[0], neck[1] - end[1]), 0.40)
            _paint(region_map, _disc_mask(clip_at, 3.5), _Region.CLIP)

    def draw_liver_bed(scale: float) -> None:
        bed = _blob_mask(gb_centre, (layout.gb_radii[0] * scale, layout.gb_radii[1] * scale * 1.15), layout.gb_angle)
        _paint(region_map, bed, _Region.LIVER_BED)

    if phase_index <= 2:  # gallbladder still attached (a retracting grasper may still pull it a little)
        attached_gb_centre = _add(gb_centre, state.gb_shift)
        if phase == "Preparation":
            draw_gallbladder(attached_gb_centre, 1.0, layout.gb_angle)
            omentum = _blob_mask(_add(triangle[0], (-28.0, 18.0)), (48.0, 30.0), -20.0, (0.08, 1.0, 0.05, 2.0))
            _paint(region_map, omentum, _Region.OMENTUM)
        else:
            if lower_third:
                # The pale cystic plate shows as a band under the lower edge of the gallbladder.
                plate_radii = (layout.gb_radii[0] * 1.02, layout.gb_radii[1] * 1.12)
                plate = _blob_mask(_add(attached_gb_centre, (0.0, 5.0)), plate_radii, layout.gb_angle)
                _paint(region_map, plate, _Region.CYSTIC_PLATE)
            draw_gallbladder(attached_gb_centre, 1.0, layout.gb_angle)
            centroid = (sum(p[0] for p in triangle) / 3, sum(p[1] for p in triangle) / 3)

            def scaled_triangle(scale: float) -> np.ndarray:
                vertices = [_add(centroid, (p[0] - centroid[0], p[1] - centroid[1]), scale) for p in triangle]
                return _convex_polygon_mask(vertices)

            # The same large footprint is yellow fat while Calot's triangle is dissected (a small dark
            # window once it is cleared) and entirely dark once clipping starts: the phase cue.
            footprint = scaled_triangle(1.15) | _blob_mask(_add(triangle[0], (-24.0, 8.0)), (30.0, 25.0), -10.0)
            if phase == "Calot Triangle Dissection":
                _paint(region_map, footprint, _Region.FAT)
                if triangle_cleared:
                    _paint(region_map, scaled_triangle(0.55), _Region.WINDOW)
            else:
                _paint(region_map, footprint, _Region.WINDOW)
            _paint(region_map, _segment_mask(neck, duct_end, 4.5), _Region.CYSTIC_DUCT)
            if two_structures:
                _paint(region_map, _segment_mask(neck, artery_end, 3.0), _Region.CYSTIC_ARTERY)
            if phase == "Clipping and Cutting":
                cut = progress >= 0.6
                draw_clips(min(4, 2 + int(progress * 4)), cut)
    else:  # gallbladder off its bed from here on
        if phase == "Gallbladder Dissection":
            draw_liver_bed(1.2)
            draw_stumps()
            # Lifted up and to the right against the liver: most of the orange bed is exposed.
            lift = 0.7 + 0.3 * progress
            moved = _add(_add(gb_centre, (24.0 * lift, -30.0 * lift)), state.gb_shift)
            draw_gallbladder(moved, 0.85, layout.gb_angle - 10.0 * lift)
        else:
            draw_liver_bed(1.05)
            draw_stumps()
        if phase == "Gallbladder Packaging":
            bag_centre = at(layout.bag_centre)
            _paint(region_map, _blob_mask(bag_centre, (54.0, 30.0), 0.0, (0.05, 0.5)), _Region.BAG)
            opening_y = bag_centre[1] - 24.0
            rim = (np.abs(_Y_GRID - opening_y) <= 2.0) & _blob_mask(bag_centre, (56.0, 40.0), 0.0)
            _paint(region_map, rim, _Region.BAG_RIM)
            # The gallbladder goes in through the opening: only its part above the rim is visible.
            sink = 8.0 * progress
            gb_in_bag = _add((bag_centre[0] + 6.0, opening_y - 6.0 + sink), state.gb_shift)
            gb_mask = _blob_mask(gb_in_bag, (24.0, 12.0), 10.0, layout.gb_wobble) & (_Y_GRID < opening_y - 2.0)
            _paint(region_map, gb_mask, _Region.GALLBLADDER)
        elif phase == "Cleaning and Coagulation":
            pool_centre = at(layout.pool_centre)
            scale = state.pool_scale
            pool = _blob_mask(pool_centre, (52.0 * scale, 24.0 * scale), 8.0, (0.1, 0.3, 0.06, 1.7))
            _paint(region_map, pool, _Region.BLOOD)
            water_blobs = (((-30.0, -22.0), (14.0, 6.0)), ((40.0, 4.0), (16.0, 7.0)), ((8.0, 26.0), (18.0, 5.0)))
            for offset, radii in water_blobs:
                _paint(region_map, _blob_mask(_add(pool_centre, offset), radii, 15.0, (0.1, 0.9)), _Region.WATER)
        elif phase == "Gallbladder Retraction":
            # The bag (with the specimen) leaves through the port at the top border.
            bag_centre = at((layout.bag_centre[0], 8.0 - 10.0 * progress))
            _paint(region_map, _blob_mask(bag_centre, (40.0, 26.0), 0.0, (0.05, 0.5)), _Region.BAG)
            _paint(region_map, _segment_mask(bag_centre, (bag_centre[0] + 20.0, -5.0), 1.2), _Region.THREAD)
    return region_map


# Endoscope light falls off towards the corners.
_VIGNETTE_HW = (
    1.0 - 0.14 * (((_X_GRID / FRAME_WIDTH - 0.5) * 2) ** 2 + ((_Y_GRID / FRAME_HEIGHT - 0.5) * 2) ** 2)
).astype(np.float32)


def _colourise(region_map: np.ndarray, camera: _Camera, tint: tuple[float, float, float]) -> np.ndarray:
    """Region map -> float RGB image with wet-tissue texture, brightness jitter and endoscope vignette."""
    colour_HWC = _REGION_RGB[region_map] * np.asarray(tint, dtype=np.float32)
    shading_HW = (1.0 + camera.texture_HW) * camera.brightness * _VIGNETTE_HW
    textured_HWC = colour_HWC * shading_HW[..., None] + camera.colour_noise_HWC
    flat = np.isin(region_map, _FLAT_REGIONS)
    textured_HWC[flat] = _REGION_RGB[region_map[flat]] * (0.9 + 0.1 * camera.brightness)
    return textured_HWC


def _rgb_code(pixels_HWC: np.ndarray) -> np.ndarray:
    """Pack uint8 RGB into one int32 per pixel so colour membership is a single ``np.isin``."""
    pixels = pixels_HWC.astype(np.int32)
    return (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]


_RESERVED_CODES = _rgb_code(np.array([c for pair in INSTRUMENT_COLOURS_RGB.values() for c in pair], dtype=np.uint8))


def _to_uint8_without_reserved_colours(image_HWC: np.ndarray) -> np.ndarray:
    """Quantise, then nudge any tissue pixel that hit an instrument colour by one green level so that
    the instrument colours stay reserved (tests and users find instruments by exact colour)."""
    frame_HWC = np.clip(np.rint(image_HWC), 0, 255).astype(np.uint8)
    hit = np.isin(_rgb_code(frame_HWC), _RESERVED_CODES)
    if hit.any():
        green = frame_HWC[hit, 1]
        frame_HWC[hit, 1] = np.where(green < 255, green + 1, 254)
    return frame_HWC


# ---------------------------------------------------------------------------------------------------
# Instruments
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InstrumentPose:
    name: str
    entry: _Point  # outside the image, on the trocar side
    tip: _Point  # where the shaft ends and the working tip begins
    opening: float = 0.5  # jaws: 0 closed .. 1 open


def _instrument_masks(pose: _InstrumentPose) -> tuple[np.ndarray, np.ndarray]:
    """(shaft_mask, tip_mask): a shaft from the border plus a tip shape distinct per instrument."""
    dx, dy = pose.tip[0] - pose.entry[0], pose.tip[1] - pose.entry[1]
    norm = max(math.hypot(dx, dy), 1e-6)
    u = (dx / norm, dy / norm)
    n = (-u[1], u[0])
    tip, opening = pose.tip, pose.opening
    name = pose.name
    if name == "grasper":  # two short jaws opening as a V
        shaft = _segment_mask(pose.entry, tip, 3.5)
        spread = 8.0 + 26.0 * opening
        tip_mask = _segment_mask(tip, _add(tip, _rotate(u, spread), 11.0), 2.2)
        tip_mask |= _segment_mask(tip, _add(tip, _rotate(u, -spread), 11.0), 2.2)
    elif name == "bipolar":  # two thin parallel prongs with a gap
        shaft = _segment_mask(pose.entry, tip, 3.0)
        gap = 1.5 + 3.0 * opening
        tip_mask = np.zeros_like(shaft)
        for side in (-1.0, 1.0):
            base = _add(tip, n, side * gap)
            tip_mask |= _segment_mask(base, _add(base, u, 10.0), 1.2)
        tip_mask |= _segment_mask(_add(tip, n, -gap), _add(tip, n, gap), 1.2)
    elif name == "hook":  # thin shaft ending in an L-shaped hook
        shaft = _segment_mask(pose.entry, tip, 2.5)
        bend = _add(tip, u, 8.0)
        tip_mask = _segment_mask(tip, bend, 1.4) | _segment_mask(bend, _add(bend, n, 6.0), 1.4)
    elif name == "scissors":  # long thin blades crossing at a pivot
        shaft = _segment_mask(pose.entry, tip, 3.0)
        spread = 4.0 + 14.0 * opening
        pivot = _add(tip, u, 2.0)
        tip_mask = _disc_mask(pivot, 3.0)
        tip_mask |= _segment_mask(_add(pivot, _rotate(u, -spread), -3.0), _add(pivot, _rotate(u, spread), 13.0), 1.3)
        tip_mask |= _segment_mask(_add(pivot, _rotate(u, spread), -3.0), _add(pivot, _rotate(u, -spread), 13.0), 1.3)
    elif name == "clipper":  # thick shaft, wide square jaws
        shaft = _segment_mask(pose.entry, tip, 4.2)
        gap = 2.0 + 4.0 * opening
        tip_mask = np.zeros_like(shaft)
        for side in (-1.0, 1.0):
            base = _add(tip, n, side * gap)
            tip_mask |= _segment_mask(base, _add(base, u, 10.0), 2.2)
    elif name == "irrigator":  # thick plain tube with a blunt round nozzle
        shaft = _segment_mask(pose.entry, tip, 4.0)
        tip_mask = _disc_mask(_add(tip, u, 3.0), 5.0)
    else:
        raise ValueError(f"unknown instrument {name!r}")
    return shaft & ~tip_mask, tip_mask


def _draw_instruments(frame_HWC: np.ndarray, poses: Sequence[_InstrumentPose]) -> dict[str, np.ndarray]:
    """Draw in order (later ones occlude earlier ones); return each instrument's VISIBLE mask."""
    owner = np.full((FRAME_HEIGHT, FRAME_WIDTH), -1, dtype=np.int8)
    for index, pose in enumerate(poses):
        shaft_mask, tip_mask = _instrument_masks(pose)
        shaft_rgb, tip_rgb = INSTRUMENT_COLOURS_RGB[pose.name]
        frame_HWC[shaft_mask] = shaft_rgb
        frame_HWC[tip_mask] = tip_rgb
        owner[shaft_mask | tip_mask] = index
    return {pose.name: owner == index for index, pose in enumerate(poses)}


def _port_entry(name: str, rng: np.random.Generator) -> _Point:
    fx, fy = _PORTS[name]
    # Jitter along the border the port lies on.
    if fy < 0 or fy > 1:
        return ((fx + rng.uniform(-0.08, 0.08)) * FRAME_WIDTH, fy * FRAME_HEIGHT)
    return (fx * FRAME_WIDTH, (fy + rng.uniform(-0.1, 0.1)) * FRAME_HEIGHT)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    eroded = mask.copy()
    for _ in range(steps):
        inner = eroded.copy()
        inner[1:, :] &= eroded[:-1, :]
        inner[:-1, :] &= eroded[1:, :]
        inner[:, 1:] &= eroded[:, :-1]
        inner[:, :-1] &= eroded[:, 1:]
        eroded = inner
    return eroded


_INTERIOR = np.zeros((FRAME_HEIGHT, FRAME_WIDTH), dtype=bool)
_INTERIOR[10:-10, 12:-12] = True


def _sample_point_in(region_map: np.ndarray, regions: Sequence[_Region], rng: np.random.Generator) -> _Point | None:
    """A pixel centre well inside one of ``regions`` (so the anatomy under the tip is unambiguous)."""
    candidates = _erode(np.isin(region_map, regions), 2) & _INTERIOR
    flat_indices = np.flatnonzero(candidates)
    if flat_indices.size == 0:
        return None
    row, col = divmod(int(flat_indices[rng.integers(flat_indices.size)]), FRAME_WIDTH)
    return (float(col), float(row))


def _visible_enough(poses: Sequence[_InstrumentPose]) -> bool:
    """Every instrument keeps most of its pixels in view after occlusion (so its box is meaningful)."""
    scratch_HWC = np.zeros((FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8)
    visible = _draw_instruments(scratch_HWC, poses)
    for pose in poses:
        shaft_mask, tip_mask = _instrument_masks(pose)
        full = int((shaft_mask | tip_mask).sum())
        visible_tip = int((visible[pose.name] & tip_mask).sum())
        if full < 40 or int(visible[pose.name].sum()) < 0.7 * full or visible_tip < 0.7 * int(tip_mask.sum()):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# One 1-fps frame: anatomy + instruments + every annotation derived from them
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameTruth:
    phase: str
    cvs: tuple[bool, bool, bool]
    triplets: tuple[tuple[str, str, str], ...]
    boxes_1000: dict[str, tuple[int, int, int, int]]


def _plan_tools(
    phase: str, progress: float, region_map: np.ndarray, rng: np.random.Generator
) -> list[tuple[_InstrumentPose, str, str]]:
    """Choose 0-3 instruments for a frame; returns (pose, verb, target) each."""
    if rng.uniform() < _NO_TOOL_PROBABILITY:
        return []
    plan = list(_PHASE_TOOL_PLANS[phase])
    if phase == "Clipping and Cutting":
        # Clipper while clipping, scissors once the cut is visible (progress >= 0.6, see anatomy).
        plan = [use for use in plan if use.instrument != ("scissors" if progress < 0.6 else "clipper")]
    for _attempt in range(25):
        chosen = [use for use in plan if rng.uniform() < use.probability] or [plan[0]]
        tools: list[tuple[_InstrumentPose, str, str]] = []
        for use in chosen[:3]:
            # Try the targets in random order: some (e.g. the artery before "two structures") may be hidden.
            tip = None
            for target_index in rng.permutation(len(use.target_regions)):
                tip = _sample_point_in(region_map, (use.target_regions[int(target_index)],), rng)
                if tip is not None:
                    break
            if tip is None:
                continue
            region_at_tip = _Region(int(region_map[int(tip[1]), int(tip[0])]))
            pose = _InstrumentPose(use.instrument, _port_entry(use.instrument, rng), tip, float(rng.uniform(0.2, 1.0)))
            verb = use.verb if region_at_tip != _Region.TISSUE else "null_verb"
            tools.append((pose, verb, _TARGET_OF_REGION[region_at_tip]))
        if tools and _visible_enough([pose for pose, _, _ in tools]):
            return tools
    return []


def _render_frame(
    layout: _Layout, phase: str, progress: float, rng: np.random.Generator
) -> tuple[np.ndarray, _FrameTruth]:
    camera = _make_camera(rng)
    cvs = _cvs_state(layout, phase, progress)
    region_map = _render_anatomy(layout, _AnatomyState(phase, progress, cvs), camera)
    frame_HWC = _to_uint8_without_reserved_colours(_colourise(region_map, camera, layout.tissue_tint))
    tools = _plan_tools(phase, progress, region_map, rng)
    visible = _draw_instruments(frame_HWC, [pose for pose, _, _ in tools])
    boxes_1000: dict[str, tuple[int, int, int, int]] = {}
    for name, mask in visible.items():
        rows, cols = np.nonzero(mask)
        boxes_1000[name] = box_to_1000_grid(
            int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), FRAME_WIDTH, FRAME_HEIGHT
        )
    triplets = tuple((pose.name, verb, target) for pose, verb, target in tools)
    return frame_HWC, _FrameTruth(phase, cvs, triplets, boxes_1000)


def _phase_per_frame(rng: np.random.Generator) -> list[tuple[str, float]]:
    """(phase, progress within phase) for each second of one procedure; boundaries vary per video."""
    num_frames = int(rng.integers(MIN_FRAMES_PER_VIDEO, MAX_FRAMES_PER_VIDEO + 1))
    weights = _PHASE_WEIGHTS * rng.lognormal(0.0, 0.25, size=len(PHASES))
    spare = num_frames - _MIN_FRAMES_PER_PHASE * len(PHASES)
    lengths = _MIN_FRAMES_PER_PHASE + np.floor(spare * weights / weights.sum()).astype(int)
    lengths[int(np.argmax(weights))] += num_frames - int(lengths.sum())
    schedule: list[tuple[str, float]] = []
    for phase, length in zip(PHASES, lengths):
        schedule.extend((phase, i / max(int(length) - 1, 1)) for i in range(int(length)))
    return schedule


# ---------------------------------------------------------------------------------------------------
# Reasoning text (Level 1 perception, Level 2 interaction, Level 3 workflow)
# ---------------------------------------------------------------------------------------------------

_ANATOMY_SEEN: dict[str, str] = {
    "Preparation": "the green gallbladder is intact and pale omentum covers the hepatocystic triangle",
    "Calot Triangle Dissection": "the green gallbladder is attached and yellow fat surrounds the cystic duct",
    "Clipping and Cutting": "silver clips sit on the cystic duct and cystic artery in the cleared triangle",
    "Gallbladder Dissection": "the gallbladder is lifted off an exposed orange liver bed above the clipped stumps",
    "Gallbladder Packaging": "a white retrieval bag lies in the field with the gallbladder entering its opening",
    "Cleaning and Coagulation": "the gallbladder is gone; a dark blood pool and irrigation fluid lie below the bed",
    "Gallbladder Retraction": "the closed retrieval bag is leaving the field through the top border",
}
_WORKFLOW: dict[str, str] = {
    "Preparation": "the field is being exposed before any dissection",
    "Calot Triangle Dissection": "the hepatocystic triangle is being dissected to expose the cystic structures",
    "Clipping and Cutting": "the cystic duct and artery are being clipped and divided",
    "Gallbladder Dissection": "the gallbladder is being separated from the liver bed",
    "Gallbladder Packaging": "the freed gallbladder is being placed into the retrieval bag",
    "Cleaning and Coagulation": "the operative field is being cleaned and bleeding points coagulated",
    "Gallbladder Retraction": "the specimen bag is being extracted",
}
_VERB_PHRASE = {
    "grasp": "grasps",
    "retract": "retracts",
    "dissect": "dissects",
    "coagulate": "coagulates",
    "clip": "clips",
    "cut": "cuts",
    "aspirate": "aspirates",
    "irrigate": "irrigates",
    "pack": "packs",
}


def _thinking(truth: _FrameTruth) -> str:
    names = [triplet[0] for triplet in truth.triplets]
    tools_seen = ("a " + " and a ".join(names)) if names else "no instrument"
    interactions = []
    for instrument, verb, target in truth.triplets:
        if verb == "null_verb":
            interactions.append(f"the {instrument} is idle and touches no tissue")
        else:
            interactions.append(f"the {instrument} {_VERB_PHRASE[verb]} the {target.replace('_', ' ')}")
    level_2 = "; ".join(interactions) if interactions else "no tool-tissue interaction is taking place"
    return (
        f"Level 1: I see {tools_seen}; {_ANATOMY_SEEN[truth.phase]}. "
        f"Level 2: {level_2[0].upper() + level_2[1:]}. "
        f"Level 3: {_WORKFLOW[truth.phase][0].upper() + _WORKFLOW[truth.phase][1:]}, "
        f"so the phase is {truth.phase}."
    )


# ---------------------------------------------------------------------------------------------------
# Action clips: instrument + motion per action
# ---------------------------------------------------------------------------------------------------

_ACTION_INSTRUMENT: dict[str, str] = {
    "aspiration": "irrigator",
    "clipping": "clipper",
    "coagulation": "bipolar",
    "dissection": "hook",
    "knot-tying": "grasper",
    "needle grasping": "grasper",
    "needle puncture": "grasper",
    "packaging": "grasper",
    "suture pulling": "grasper",
    "tissue retraction": "grasper",
}
_ACTION_ANCHOR: dict[str, tuple[_Region, ...]] = {
    "aspiration": (_Region.BLOOD,),
    "clipping": (_Region.CYSTIC_DUCT,),
    "coagulation": (_Region.LIVER_BED,),
    "dissection": (_Region.FAT, _Region.GALLBLADDER),
    "knot-tying": (_Region.LIVER_BED,),
    "needle grasping": (_Region.LIVER_BED,),
    "needle puncture": (_Region.LIVER_BED,),
    "packaging": (_Region.GALLBLADDER,),
    "suture pulling": (_Region.LIVER_BED,),
    "tissue retraction": (_Region.GALLBLADDER,),
}


def _arc_points(centre: _Point, radius: float, start_deg: float, sweep_deg: float, steps: int = 6) -> list[_Point]:
    return [
        (centre[0] + radius * math.cos(math.radians(a)), centre[1] + radius * math.sin(math.radians(a)))
        for a in np.linspace(start_deg, start_deg + sweep_deg, steps)
    ]


def _render_clip(layout: _Layout, action: str, rng: np.random.Generator) -> np.ndarray:
    """16 frames (T, H, W, C) of one action. Static camera; the motion of the instrument and of the
    anatomy it acts on carries the action, and several grasper actions look alike in a still frame."""
    phases = _ACTION_PHASES[action]
    phase = phases[int(rng.integers(len(phases)))]
    progress = float(rng.uniform(0.0, 0.5)) if phase == "Clipping and Cutting" else float(rng.uniform(0.1, 0.9))
    camera = _make_camera(rng)
    base_state = _AnatomyState(phase, progress, _cvs_state(layout, phase, progress))
    base_regions = _render_anatomy(layout, base_state, camera)
    anchor = _sample_point_in(base_regions, _ACTION_ANCHOR[action], rng)
    if anchor is None:  # the anchor region is always drawn for these phases; keep a safe fallback
        anchor = (FRAME_WIDTH / 2, FRAME_HEIGHT / 2)
    instrument = _ACTION_INSTRUMENT[action]
    entry = _port_entry(instrument, rng)
    if action in ("knot-tying", "needle grasping", "needle puncture", "suture pulling"):
        entry = (FRAME_WIDTH * 1.1, FRAME_HEIGHT * rng.uniform(0.2, 0.5))  # needle driver from the right
    shaft_dir = (anchor[0] - entry[0], anchor[1] - entry[1])
    norm = math.hypot(*shaft_dir)
    u = (shaft_dir[0] / norm, shaft_dir[1] / norm)
    n = (-u[1], u[0])
    speed = float(rng.uniform(0.85, 1.15))
    cycle_phase = float(rng.uniform(0, 2 * math.pi))
    tint = layout.tissue_tint

    frames: list[np.ndarray] = []
    static_frame_HWC = _colourise(base_regions, camera, tint)
    for t in range(CLIP_NUM_FRAMES):
        s = t / (CLIP_NUM_FRAMES - 1)
        state = base_state
        tip, opening = anchor, 0.1
        props: list[tuple[np.ndarray, _Region]] = []  # drawn over the anatomy, under the instrument
        if action == "tissue retraction":  # slow steady lift, tissue follows the closed jaws
            pull = (10.0 * s * speed, -16.0 * s * speed)
            tip = _add(anchor, pull)
            state = replace(base_state, gb_shift=_add((0.0, 0.0), pull, 0.8))
        elif action == "dissection":  # fast side-to-side sweeps of the hook
            tip = _add(_add(anchor, n, 7.0 * math.sin(2 * math.pi * 3.5 * s + cycle_phase)), u, -3.0 + 6.0 * s)
        elif action == "coagulation":  # prongs close, then the tip flashes (current) and chars tissue
            tip = anchor
            opening = max(0.0, 1.0 - t / 5)
            if t >= 6:
                props.append((_disc_mask(_add(anchor, u, 6.0), 1.0 + 0.5 * (t - 6)), _Region.CHAR))
                if t % 2 == 0:
                    props.append((_disc_mask(_add(anchor, u, 6.0), 7.0), _Region.SPARK))
        elif action == "clipping":  # approach, close the jaws, a clip appears, withdraw
            if t < 8:
                tip, opening = _add(anchor, u, -16.0 * (1 - t / 7)), 1.0
            elif t < 12:
                tip, opening = anchor, 1.0 - (t - 7) / 4
            else:
                tip, opening = _add(anchor, u, -5.0 * (t - 11)), 0.4
            if t >= 11:
                clip_centre = _add(anchor, u, 5.0)
                props.append((_segment_mask(_add(clip_centre, n, -7.0), _add(clip_centre, n, 7.0), 2.5), _Region.CLIP))
        elif action == "aspiration":  # suction tip still in the pool, the pool shrinks
            tip = _add(anchor, n, 0.8 * math.sin(2 * math.pi * 2 * s))
            state = replace(base_state, pool_scale=1.0 - 0.45 * s * speed)
        elif action == "packaging":  # the gallbladder is pushed down into the bag
            push = (0.0, 18.0 * s * speed)
            tip = _add(anchor, push)
            state = replace(base_state, gb_shift=push)
        elif action == "knot-tying":  # circular loops of the tip around a thread
            angle = 2 * math.pi * 1.25 * s + cycle_phase
            loop_centre = _add(anchor, (18.0, -6.0))
            tip = (loop_centre[0] + 9.0 * math.cos(angle), loop_centre[1] + 9.0 * math.sin(angle))
            props.append((_polyline_mask([anchor, loop_centre, tip], 1.0), _Region.THREAD))
            props.append((_polyline_mask(_arc_points(anchor, 5.0, math.degrees(angle), 300.0), 0.9), _Region.THREAD))
        elif action == "needle grasping":  # approach an idle needle with open jaws, close, lift it
            needle_centre = anchor
            if t < 10:
                tip, opening = _add(anchor, u, -20.0 * (1 - t / 9) - 6.0), 1.0
            elif t < 13:
                tip, opening = _add(anchor, u, -6.0), 1.0 - (t - 9) / 3
            else:
                lift = (0.0, -3.0 * (t - 12))
                tip, opening, needle_centre = _add(_add(anchor, u, -6.0), lift), 0.0, _add(anchor, lift)
            props.append((_polyline_mask(_arc_points(needle_centre, 7.0, 200.0, 180.0), 1.3), _Region.NEEDLE))
        elif action == "needle puncture":  # the held needle rotates about its centre into the tissue
            needle_centre = _add(anchor, (-8.0, 4.0))
            held_angle = -30.0 + 150.0 * s * speed
            tip = _arc_points(needle_centre, 9.0, held_angle, 0.0, 2)[0]
            # The sharp end is already inside the tissue: only the arc behind the jaws shows.
            visible_sweep = 200.0 - 150.0 * s * speed
            needle_arc = _arc_points(needle_centre, 9.0, held_angle - visible_sweep, visible_sweep)
            props.append((_polyline_mask(needle_arc, 1.3), _Region.NEEDLE))
            props.append((_polyline_mask([tip, _add(tip, (14.0, -10.0))], 0.9), _Region.THREAD))
        elif action == "suture pulling":  # a long straight pull that stretches the thread
            tip = _add(anchor, (30.0 * s * speed + 8.0, -18.0 * s * speed - 4.0))
            props.append((_segment_mask(anchor, tip, 1.0), _Region.THREAD))
        else:
            raise ValueError(f"unknown action {action!r}")

        if state is base_state:
            image_HWC = static_frame_HWC.copy()
            region_map = base_regions
        else:
            region_map = _render_anatomy(layout, state, camera)
            image_HWC = _colourise(region_map, camera, tint)
        if props:
            region_map = region_map.copy()
            for mask, region in props:
                region_map[mask] = region
            image_HWC = _colourise(region_map, camera, tint)
        frame_HWC = _to_uint8_without_reserved_colours(image_HWC)
        _draw_instruments(frame_HWC, [_InstrumentPose(instrument, entry, tip, opening)])
        frames.append(frame_HWC)
    return np.stack(frames)


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------


def _write_png(frame_HWC: np.ndarray, path: Path) -> None:
    # Pillow's PNG writer adds no timestamps; zlib output is deterministic for the same input.
    # Level 1: these small synthetic frames compress almost as well, several times faster.
    Image.fromarray(frame_HWC).save(path, format="PNG", compress_level=1)


def rgb_to_yuv420p_planes(frame_HWC: np.ndarray) -> np.ndarray:
    """RGB -> planar YUV 4:2:0 (BT.601, limited range: what decoders assume for untagged SD video),
    laid out as PyAV's ``yuv420p`` ndarray: shape (H * 3 // 2, W), Y rows then U then V.

    Done here, in exact integer arithmetic, rather than by FFmpeg's swscale inside ``stream.encode``:
    that path gave different bitstreams for identical RGB frames from one call to the next (measured:
    one process, same frames, three different mp4s), which breaks "same seed, same decoded frames"."""
    rgb = frame_HWC.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128
    height, width = y.shape

    def subsample(plane: np.ndarray) -> np.ndarray:  # rounded 2x2 box average
        return (plane.reshape(height // 2, 2, width // 2, 2).sum(axis=(1, 3)) + 2) >> 2

    planes = np.concatenate([y.ravel(), subsample(u).ravel(), subsample(v).ravel()])
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(height * 3 // 2, width)


def _write_mp4(frames_THWC: np.ndarray, path: Path) -> None:
    """H.264 (libx264, yuv420p, crf 18) at CLIP_FPS, byte-identical for identical frames: one encoder
    thread, and the colour conversion done by us (see ``rgb_to_yuv420p_planes``)."""
    import av  # optional dependency ("video" extra); imported here so the rest of the package works without it

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = FRAME_WIDTH, FRAME_HEIGHT, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        stream.codec_context.thread_count = 1
        for index, frame_HWC in enumerate(frames_THWC):
            video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p_planes(frame_HWC), format="yuv420p")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _check_clip_decodes(path: Path) -> None:
    """Fail loudly at generation time if the written clip is not what readers will expect."""
    import av

    with av.open(str(path)) as container:
        decoded = [frame for frame in container.decode(video=0)]
    if len(decoded) != CLIP_NUM_FRAMES or (decoded[0].width, decoded[0].height) != (FRAME_WIDTH, FRAME_HEIGHT):
        raise RuntimeError(f"{path}: PyAV decoded {len(decoded)} frames of {decoded[0].width}x{decoded[0].height}")
    if importlib.util.find_spec("decord") is not None:
        import decord

        reader = decord.VideoReader(str(path))
        if len(reader) != CLIP_NUM_FRAMES:
            raise RuntimeError(f"{path}: decord sees {len(reader)} frames, expected {CLIP_NUM_FRAMES}")
        del reader


def _video_name(number: int) -> str:
    return f"VID{number:02d}"


def _question(task: int, rng: np.random.Generator) -> str:
    options = QUESTIONS[task]
    return options[int(rng.integers(len(options)))]


def _anno(
    record_id: str, media_id: str, task: int, question: str, answer: str, thinking: str | None = None
) -> dict[str, Any]:
    """One ``annos`` entry in the release layout; ``thinking`` only where there is reasoning."""
    record: dict[str, Any] = {
        "id": record_id,
        "images": [media_id],
        "task type": [task],
        "question": question,
        "answer": answer,
    }
    if thinking is not None:
        record["thinking"] = thinking
    return record


def _generate_video(out_raw: Path, seed: int, number: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Write one synthetic procedure's frames and clips; return its (videos, images, annos) entries."""
    video = _video_name(number)
    layout = _make_layout(_rng(seed, number, _RNG_LAYOUT))
    schedule = _phase_per_frame(_rng(seed, number, _RNG_LAYOUT, 1))
    text_rng = _rng(seed, number, _RNG_TEXT)
    with_thinking = set(text_rng.permutation(len(schedule))[: round(len(schedule) / 3)].tolist())

    frames_dir = out_raw / DEMO_SOURCE_DATASET / "frames" / video
    clips_dir = out_raw / DEMO_SOURCE_DATASET / "clips" / video
    frames_dir.mkdir(parents=True, exist_ok=True)
    clips_dir.mkdir(parents=True, exist_ok=True)

    images: list[dict] = []
    annos: list[dict] = []
    for second, (phase, progress) in enumerate(schedule):
        frame_number = second + 1
        frame_HWC, truth = _render_frame(layout, phase, progress, _rng(seed, number, _RNG_FRAME, second))
        _write_png(frame_HWC, frames_dir / f"{frame_number:06d}.png")
        image_id = f"{DEMO_SOURCE_DATASET}_{video}_{frame_number:06d}"
        images.append({"id": image_id, "image path": f"{DEMO_SOURCE_DATASET}/frames/{video}/{frame_number:06d}.png"})

        instruments = [triplet[0] for triplet in truth.triplets]
        thinking = _thinking(truth) if second in with_thinking else None
        frame_tasks: list[tuple[str, int, str, str | None]] = [
            ("phase", TASK_PHASE_RECOGNITION, phase_answer(phase), thinking),
            ("instruments", TASK_INSTRUMENT_RECOGNITION, instrument_recognition_answer(instruments), None),
            ("localization", TASK_INSTRUMENT_LOCALIZATION, localization_answer(truth.boxes_1000), None),
        ]
        if truth.triplets:  # no triplet record without an instrument (CholecT50 has no empty-triplet answer)
            frame_tasks.append(("triplets", TASK_TRIPLET_RECOGNITION, triplet_answer(truth.triplets), None))
        if phase in ("Calot Triangle Dissection", "Clipping and Cutting"):
            frame_tasks.append(("cvs", TASK_SAFETY_ASSESSMENT, cvs_answer(*truth.cvs), None))
        for suffix, task, answer, reasoning in frame_tasks:
            annos.append(_anno(f"{image_id}_{suffix}", image_id, task, _question(task, text_rng), answer, reasoning))

    videos: list[dict] = []
    clip_rng = _rng(seed, number, _RNG_CLIP)
    action_order = _rng(seed, _RNG_CLIP).permutation(len(ACTIONS))
    for clip_index in range(CLIPS_PER_VIDEO):
        # A global round-robin over a seeded permutation keeps actions balanced across the data set.
        global_index = (number - 1) * CLIPS_PER_VIDEO + clip_index
        action = ACTIONS[int(action_order[global_index % len(ACTIONS)])]
        frames_THWC = _render_clip(layout, action, _rng(seed, number, _RNG_CLIP, clip_index))
        clip_path = clips_dir / f"clip_{clip_index:03d}.mp4"
        _write_mp4(frames_THWC, clip_path)
        video_id = f"{DEMO_SOURCE_DATASET}_{video}_clip{clip_index:03d}"
        videos.append(
            {
                "id": video_id,
                "source dataset": DEMO_SOURCE_DATASET,
                "source url": DEMO_SOURCE_URL,
                "clinical specialty": DEMO_SPECIALTY,
                "surgical type": DEMO_SURGICAL_TYPE,
                "video path": f"{DEMO_SOURCE_DATASET}/clips/{video}/clip_{clip_index:03d}.mp4",
            }
        )
        question = _question(TASK_ACTION_RECOGNITION, clip_rng)
        annos.append(_anno(f"{video_id}_action", video_id, TASK_ACTION_RECOGNITION, question, action_answer(action)))
    return videos, images, annos


def _write_release_json(path: Path, videos: list[dict], images: list[dict], annos: list[dict]) -> None:
    release = {
        "videos": sorted(videos, key=lambda entry: entry["id"]),
        "images": sorted(images, key=lambda entry: entry["id"]),
        "annos": sorted(annos, key=lambda entry: entry["id"]),
    }
    path.write_text(json.dumps(release, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _split_summary(
    json_path: Path, video_numbers: Sequence[int], videos: list[dict], images: list[dict], annos: list[dict]
) -> dict:
    task_counts: dict[int, int] = {task: 0 for task in sorted(TASK_IDS.values())}
    for record in annos:
        for task in record["task type"]:
            task_counts[task] += 1
    return {
        "json": str(json_path),
        "videos": [_video_name(number) for number in video_numbers],
        "num_clips": len(videos),
        "num_images": len(images),
        "num_annos": len(annos),
        "num_thinking": sum(1 for record in annos if "thinking" in record),
        "task_counts": task_counts,
    }


def write_demo_dataset(out_dir: Path, seed: int = 0, *, n_train_videos: int = 8, n_heldout_videos: int = 2) -> dict:
    """Write the synthetic demo data set under ``out_dir`` and return a summary.

    Layout: ``train.json`` and ``heldout.json`` (release layout; held-out = disjoint patient videos
    numbered after the train ones), media under ``raw_data/DemoLap/{frames,clips}/VIDnn/`` (paths in
    the JSON are relative to ``raw_data``) and a ``README.txt``. An existing ``raw_data/DemoLap`` is
    replaced so that no stale media survive from a larger earlier run.

    Returns ``{"out_dir", "seed", "raw_data", "readme", "splits": {"train"|"heldout": {"json",
    "videos", "num_clips", "num_images", "num_annos", "num_thinking", "task_counts": {task_id: n}}}}``.
    """
    if seed < 0:
        raise ValueError("seed must be >= 0 (it seeds numpy's SeedSequence)")
    if n_train_videos < 1 or n_heldout_videos < 1:
        raise ValueError("need at least one train and one held-out video")
    if n_train_videos + n_heldout_videos > 99:
        raise ValueError("video numbers are two digits: at most 99 videos in all")
    out_dir = Path(out_dir)
    raw_data = out_dir / "raw_data"
    demo_media = raw_data / DEMO_SOURCE_DATASET
    if demo_media.exists():
        shutil.rmtree(demo_media)
    out_dir.mkdir(parents=True, exist_ok=True)

    split_numbers = {
        "train": list(range(1, n_train_videos + 1)),
        "heldout": list(range(n_train_videos + 1, n_train_videos + n_heldout_videos + 1)),
    }
    splits: dict[str, dict] = {}
    first_clip: Path | None = None
    for split, numbers in split_numbers.items():
        videos: list[dict] = []
        images: list[dict] = []
        annos: list[dict] = []
        for number in numbers:
            video_entries, image_entries, anno_entries = _generate_video(raw_data, seed, number)
            videos += video_entries
            images += image_entries
            annos += anno_entries
            if first_clip is None:
                first_clip = raw_data / video_entries[0]["video path"]
        json_path = out_dir / f"{split}.json"
        _write_release_json(json_path, videos, images, annos)
        splits[split] = _split_summary(json_path, numbers, videos, images, annos)
    assert first_clip is not None
    _check_clip_decodes(first_clip)

    readme = out_dir / "README.txt"
    readme.write_text(
        "This is a SYNTHETIC demo data set in the SurgΣ-DB release layout; it contains no patient data. "
        "A laparoscopic cholecystectomy is drawn as a cartoon with numpy by surgsigma_train.data.demo "
        f"(seed {seed}): {n_train_videos} train and {n_heldout_videos} held-out procedures, each 1-fps PNG "
        f"frames ({FRAME_WIDTH}x{FRAME_HEIGHT}) through the seven Cholec80 phases plus {CLIPS_PER_VIDEO} "
        f"H.264 clips ({CLIP_NUM_FRAMES} frames at {CLIP_FPS} fps, libx264, yuv420p) of basic actions. "
        "Every answer (phase, instruments, boxes on the 0-1000 grid, action triplets, critical view of "
        "safety, action) is computed from what was drawn, so a model can learn it from the pixels. "
        "Regenerate with: python -m surgsigma_train.data.demo OUT_DIR --seed SEED.\n",
        encoding="utf-8",
    )
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "raw_data": str(raw_data),
        "readme": str(readme),
        "splits": splits,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic SurgΣ-DB-format demo data set.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-videos", type=int, default=8)
    parser.add_argument("--heldout-videos", type=int, default=2)
    args = parser.parse_args(argv)
    summary = write_demo_dataset(
        args.out_dir, args.seed, n_train_videos=args.train_videos, n_heldout_videos=args.heldout_videos
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
