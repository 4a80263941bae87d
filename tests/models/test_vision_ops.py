"""Plain-torch replicas of the torchvision ops (the torchvision-side comparison is test_parity_torchvision.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import interpolate
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from surgsigma_train.models import vision_ops
from surgsigma_train.models.vision_ops import (
    grayscale_to_rgb_like_torchvision,
    interpolation_mode,
    normalize_like_torchvision,
    patchify_images,
    patchify_videos,
    rescale_and_normalize_like_transformers,
    resize_like_torchvision,
    rgba_to_rgb_like_transformers,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def frames_TCHW() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 37, 53), dtype=torch.uint8, generator=generator)


def test_interpolation_mode_accepts_pil_codes_and_names():
    assert interpolation_mode(3) == "bicubic"
    assert interpolation_mode(2) == "bilinear"
    assert interpolation_mode("BICUBIC") == "bicubic"
    with pytest.raises(ValueError):
        interpolation_mode(1)  # LANCZOS: no equivalent torch kernel


def test_resize_uint8_on_cpu_is_torchs_native_uint8_kernel(frames_TCHW):
    resized = resize_like_torchvision(frames_TCHW, (56, 84), mode="bicubic")
    assert resized.dtype == torch.uint8 and resized.shape == (3, 3, 56, 84)
    expected = interpolate(frames_TCHW, size=[56, 84], mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(resized, expected)


def test_resize_float_round_trip_path_clamps_and_rounds(frames_TCHW, monkeypatch):
    # what torchvision does where no native uint8 kernel is used (GPU, or bilinear on non-AVX2 CPUs)
    monkeypatch.setattr(vision_ops, "_native_uint8_on_cpu", lambda mode: False)
    resized = resize_like_torchvision(frames_TCHW, (20, 30), mode="bicubic")
    expected = interpolate(frames_TCHW.float(), size=[20, 30], mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(resized, expected.clamp(0, 255).round().to(torch.uint8))


def test_resize_same_size_and_leading_dims(frames_TCHW):
    assert resize_like_torchvision(frames_TCHW, (37, 53)) is frames_TCHW
    videos_BTCHW = torch.stack([frames_TCHW, frames_TCHW.flip(0)])
    resized = resize_like_torchvision(videos_BTCHW, (28, 28))
    assert resized.shape == (2, 3, 3, 28, 28)
    assert torch.equal(resized[1], resize_like_torchvision(frames_TCHW.flip(0), (28, 28)))


def test_fused_normalize_matches_float64_reference(frames_TCHW):
    normalized = rescale_and_normalize_like_transformers(frames_TCHW, True, 1 / 255, True, CLIP_MEAN, CLIP_STD)
    assert normalized.dtype == torch.float32
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(-1, 1, 1)
    reference = (frames_TCHW.double() / 255 - mean) / std
    assert torch.allclose(normalized.double(), reference, atol=2e-6, rtol=0)
    # the input is left untouched (the float copy is normalised in place)
    assert frames_TCHW.dtype == torch.uint8


def test_fused_normalize_op_order_is_transformers(frames_TCHW):
    # (x - 255*mean) / (255*std) in float32, mean/std scaled as float32 tensors by 1/rescale_factor
    mean = torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(CLIP_STD) * (1.0 / (1 / 255))
    expected = (frames_TCHW.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    fused = rescale_and_normalize_like_transformers(frames_TCHW, True, 1 / 255, True, CLIP_MEAN, CLIP_STD)
    assert torch.equal(fused, expected)
    rescaled_only = rescale_and_normalize_like_transformers(frames_TCHW, True, 1 / 255, False, CLIP_MEAN, CLIP_STD)
    assert torch.equal(rescaled_only, frames_TCHW * (1 / 255))


def test_normalize_rejects_integer_input(frames_TCHW):
    with pytest.raises(TypeError):
        normalize_like_torchvision(frames_TCHW, CLIP_MEAN, CLIP_STD)


def test_channel_conversions():
    grey_1HW = torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4)
    assert torch.equal(grayscale_to_rgb_like_torchvision(grey_1HW), grey_1HW.repeat(3, 1, 1))
    rgba_4HW = torch.zeros(4, 2, 2, dtype=torch.uint8)
    rgba_4HW[:3] = 100
    rgba_4HW[3, 0, 0] = 255  # one opaque pixel, the rest fully transparent -> white
    rgb = rgba_to_rgb_like_transformers(rgba_4HW)
    assert rgb.shape == (3, 2, 2)
    assert rgb[:, 0, 0].tolist() == [100, 100, 100] and rgb[:, 1, 1].tolist() == [255, 255, 255]


def test_patchify_videos_equals_stock_and_pads_with_last_frame():
    generator = torch.Generator().manual_seed(1)
    videos_BTCHW = torch.randn(2, 3, 3, 64, 96, generator=generator)  # odd T -> one padded frame
    ours, grid_t, grid_h, grid_w = patchify_videos(videos_BTCHW, patch_size=16, merge_size=2, temporal_patch_size=2)
    # Qwen3VLVideoProcessor.patchify is plain torch and importable without torchvision
    stock = Qwen3VLVideoProcessor().patchify(videos_BTCHW, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert (grid_t, grid_h, grid_w) == stock[1:] == (2, 4, 6)
    assert torch.equal(ours, stock[0])
    # second temporal slot of the last temporal patch is the repeated last frame
    last_patches = ours[:, -grid_h * grid_w :].reshape(2, grid_h * grid_w, 3, 2, 16, 16)
    assert torch.equal(last_patches[:, :, :, 0], last_patches[:, :, :, 1])


def test_patchify_layout_from_first_principles():
    """Patch i of the flat layout holds pixels of (t, h, w) in merge-group order."""
    patch, merge, tps = 2, 2, 2
    frames_TCHW = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(1, 2, 3, 8, 12)
    flat, grid_t, grid_h, grid_w = patchify_videos(frames_TCHW, patch, merge, tps)
    index = 0
    for t in range(grid_t):
        for block_h in range(grid_h // merge):
            for block_w in range(grid_w // merge):
                for inner_h in range(merge):
                    for inner_w in range(merge):
                        h = (block_h * merge + inner_h) * patch
                        w = (block_w * merge + inner_w) * patch
                        expected = frames_TCHW[0, t * tps : (t + 1) * tps, :, h : h + patch, w : w + patch]
                        # feature order is (C, T, ph, pw)
                        assert torch.equal(flat[0, index], expected.permute(1, 0, 2, 3).reshape(-1))
                        index += 1
    assert index == flat.shape[1]


def test_patchify_images_equals_stock_pil_layout():
    generator = torch.Generator().manual_seed(2)
    image_CHW = torch.randn(3, 56, 84, generator=generator)
    ours, grid_h, grid_w = patchify_images(image_CHW[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    stock, stock_h, stock_w = Qwen2VLImageProcessorPil().patchify(
        image_CHW.numpy(), patch_size=14, merge_size=2, temporal_patch_size=2
    )
    assert (grid_h, grid_w) == (stock_h, stock_w) == (4, 6)
    assert np.array_equal(ours[0].numpy(), stock)
