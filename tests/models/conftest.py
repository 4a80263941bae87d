"""Shared fixtures for the model-family tests: processors and conversations built once per session."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from surgsigma_train.models import get_family

# Small pixel budgets keep the tests fast while still resizing every input (up and down).
PIXEL_BOUNDS = {
    "qwen2_vl": {
        "image_min_pixels": 16 * 28 * 28,
        "image_max_pixels": 64 * 28 * 28,
        "video_min_pixels": 8 * 28 * 28,
        "video_max_pixels": 32 * 28 * 28,
    },
    "qwen2_5_vl": {
        "image_min_pixels": 16 * 28 * 28,
        "image_max_pixels": 64 * 28 * 28,
        "video_min_pixels": 8 * 28 * 28,
        "video_max_pixels": 32 * 28 * 28,
    },
    # Qwen3-VL video bounds cover all frames of a clip together
    "qwen3_vl": {
        "image_min_pixels": 16 * 32 * 32,
        "image_max_pixels": 64 * 32 * 32,
        "video_min_pixels": 8 * 32 * 32,
        "video_max_pixels": 8 * 32 * 32 * 32,
    },
}

_PROCESSORS: dict[str, object] = {}


def tiny_processor(family: str, vision_backend: str = "ours"):
    """Processor for the tiny model of ``family`` (cached per session: the tokenizer load costs ~0.5 s)."""
    key = f"{family}/{vision_backend}"
    if key not in _PROCESSORS:
        _PROCESSORS[key] = get_family(family).build_processor(
            "tiny", vision_backend=vision_backend, **PIXEL_BOUNDS[family]
        )
    return _PROCESSORS[key]


@pytest.fixture
def pixel_bounds():
    return PIXEL_BOUNDS


@pytest.fixture
def processor_for():
    return tiny_processor


@pytest.fixture
def media():
    """One image and one 8-frame video of odd sizes, with the video's source metadata (30 fps, every 15th frame)."""
    rng = np.random.default_rng(0)
    image_HWC = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    frames_THWC = rng.integers(0, 256, (8, 90, 130, 3), dtype=np.uint8)
    metadata = VideoMetadata(
        total_num_frames=240, fps=30.0, frames_indices=list(range(0, 120, 15)), width=130, height=90, duration=8.0
    )
    return image_HWC, frames_THWC, metadata


@pytest.fixture
def conversation():
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare with the clip: "}, {"type": "video"}],
        },
        {"role": "assistant", "content": "The grasper retracts the gallbladder while the hook dissects."},
    ]
