"""Torch-path Qwen-VL image processor: grids, pixel values, input kinds, config."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from surgsigma_train.models.image_processor import QwenImageProcessor

SIZE = {"shortest_edge": 32 * 32, "longest_edge": 256 * 28 * 28}
SHAPES_HW = [(90, 130), (200, 150), (17, 23), (1080, 1920), (28, 1000), (333, 333)]


def random_image_HWC(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_image_HWC(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack(
        [rows * 255 // max(height - 1, 1), cols * 255 // max(width - 1, 1), (rows + cols) % 256], -1
    ).astype(np.uint8)


@pytest.mark.parametrize("shape_HW", SHAPES_HW)
def test_grid_follows_transformers_smart_resize(shape_HW):
    processor = QwenImageProcessor(size=SIZE)
    outputs = processor([random_image_HWC(*shape_HW)])
    resized_h, resized_w = smart_resize(
        *shape_HW, factor=28, min_pixels=SIZE["shortest_edge"], max_pixels=SIZE["longest_edge"]
    )
    assert outputs["image_grid_thw"].tolist() == [[1, resized_h // 14, resized_w // 14]]
    assert outputs["image_grid_thw"].dtype == torch.long
    assert outputs["pixel_values"].shape == (resized_h * resized_w // 14**2, 3 * 2 * 14 * 14)
    assert processor.get_number_of_image_patches(*shape_HW, {}) == outputs["pixel_values"].shape[0]
    assert processor.resized_size(*shape_HW) == (resized_h, resized_w)


def test_qwen3_settings_patch16():
    processor = QwenImageProcessor(size=SIZE, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    outputs = processor([np.full((64, 96, 3), 255, dtype=np.uint8)])
    assert outputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert outputs["pixel_values"].shape == (24, 3 * 2 * 16 * 16)
    assert torch.all(outputs["pixel_values"] == 1.0)  # white -> (1 - 0.5) / 0.5


def test_values_close_to_the_pil_processor_on_smooth_images():
    """Sanity check against transformers' PIL processor (not bit-equal: PIL resizes with its own kernel)."""
    image = smooth_image_HWC(200, 150)
    ours = QwenImageProcessor(size=SIZE)([image])
    pil = Qwen2VLImageProcessorPil(size=SIZE)([image], return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == pil["image_grid_thw"].tolist()
    difference = (ours["pixel_values"] - pil["pixel_values"]).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.1


def test_multiple_images_equal_one_by_one():
    processor = QwenImageProcessor(size=SIZE)
    images = [random_image_HWC(90, 130, 0), random_image_HWC(200, 150, 1), random_image_HWC(90, 130, 2)]
    batched = processor(images)
    singles = [processor([image]) for image in images]
    assert torch.equal(batched["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    offsets = np.cumsum([0] + [math.prod(s["image_grid_thw"][0].tolist()) for s in singles])
    assert offsets[-1] == batched["pixel_values"].shape[0]


def test_input_kinds_agree():
    processor = QwenImageProcessor(size=SIZE)
    image_HWC = random_image_HWC(90, 130)
    reference = processor([image_HWC])["pixel_values"]
    assert torch.equal(processor([PIL.Image.fromarray(image_HWC)])["pixel_values"], reference)
    assert torch.equal(processor([torch.from_numpy(image_HWC).permute(2, 0, 1)])["pixel_values"], reference)
    assert torch.equal(processor([np.ascontiguousarray(image_HWC.transpose(2, 0, 1))])["pixel_values"], reference)


def test_grey_and_transparent_inputs_become_rgb():
    processor = QwenImageProcessor(size=SIZE)
    grey_HW = random_image_HWC(60, 80)[..., 0]
    from_grey = processor([PIL.Image.fromarray(grey_HW, mode="L")])["pixel_values"]
    assert torch.equal(from_grey, processor([np.repeat(grey_HW[..., None], 3, -1)])["pixel_values"])
    transparent = PIL.Image.new("RGBA", (56, 56), (10, 20, 30, 0))
    white = processor([np.full((56, 56, 3), 255, dtype=np.uint8)])["pixel_values"]
    assert torch.equal(processor([transparent])["pixel_values"], white)  # composited onto white


def test_saved_config_names_the_stock_class(tmp_path):
    processor = QwenImageProcessor(size=SIZE)
    config = processor.to_dict()
    assert config["image_processor_type"] == "Qwen2VLImageProcessor"
    processor.save_pretrained(tmp_path)
    reloaded = QwenImageProcessor.from_pretrained(tmp_path)
    image = random_image_HWC(90, 130)
    assert torch.equal(reloaded([image])["pixel_values"], processor([image])["pixel_values"])
    assert reloaded.backend == "torch"
