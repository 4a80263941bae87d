"""Torchvision-free video processors: token expansion vs transformers' own rules, pixels, metadata, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.video_utils import VideoMetadata

from surgsigma_train.models.video_processor import Qwen2VLVideoProcessorTorch, Qwen3VLVideoProcessorTorch
from surgsigma_train.models.vision_ops import resize_like_torchvision

QWEN2_SIZE = {"shortest_edge": 16 * 28 * 28, "longest_edge": 64 * 28 * 28}  # per frame
QWEN3_SIZE = {"shortest_edge": 16 * 32 * 32, "longest_edge": 8 * 64 * 32 * 32}  # all frames together
SHAPES_THW = [(8, 90, 130), (3, 90, 130), (2, 224, 224), (16, 480, 854), (5, 17, 23), (4, 720, 96), (9, 1080, 1920)]


def random_frames_THWC(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def qwen2_reference_grid(num_frames: int, height: int, width: int, size: dict) -> tuple[int, int, int]:
    """Qwen2VLVideoProcessor's grid (transformers' smart_resize; frames padded to a multiple of 2)."""
    resized_h, resized_w = qwen2_smart_resize(
        height, width, factor=28, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )
    return math.ceil(num_frames / 2), resized_h // 14, resized_w // 14


def qwen3_reference_grid(num_frames: int, height: int, width: int, size: dict) -> tuple[int, int, int]:
    resized_h, resized_w = qwen3_smart_resize(
        num_frames,
        height,
        width,
        temporal_factor=2,
        factor=32,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )
    return math.ceil(num_frames / 2), resized_h // 16, resized_w // 16


@pytest.mark.parametrize("shape_THW", SHAPES_THW)
def test_qwen2_grid_and_patch_count_follow_transformers(shape_THW):
    processor = Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE)
    outputs = processor([random_frames_THWC(*shape_THW)])
    grid = qwen2_reference_grid(*shape_THW, QWEN2_SIZE)
    assert outputs["video_grid_thw"].tolist() == [list(grid)]
    assert outputs["pixel_values_videos"].shape == (math.prod(grid), 3 * 2 * 14 * 14)
    assert outputs["pixel_values_videos"].dtype == torch.float32
    assert processor.get_num_of_video_patches(*shape_THW) == math.prod(grid)


@pytest.mark.parametrize("shape_THW", [shape for shape in SHAPES_THW if shape[0] >= 2])
def test_qwen3_grid_and_patch_count_follow_transformers(shape_THW):
    processor = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)
    outputs = processor([random_frames_THWC(*shape_THW)])
    grid = qwen3_reference_grid(*shape_THW, QWEN3_SIZE)
    assert outputs["video_grid_thw"].tolist() == [list(grid)]
    assert outputs["pixel_values_videos"].shape == (math.prod(grid), 3 * 2 * 16 * 16)
    assert processor.get_num_of_video_patches(*shape_THW) == math.prod(grid)
    if shape_THW[0] % 2 == 0:
        # transformers' Qwen3VLVideoProcessor instantiates without torchvision; its counter is a second reference
        # (for even frame counts: 5.17's floors odd counts although the frames are padded up)
        stock = Qwen3VLVideoProcessor(size=QWEN3_SIZE, cap_pixels_per_frame=False)
        assert stock.get_num_of_video_patches(*shape_THW, {}) == math.prod(grid)


@pytest.mark.parametrize(
    ("shape_THW", "cap"), list(itertools.product([(2, 224, 224), (16, 480, 854), (6, 17, 23)], [True, False]))
)
def test_qwen3_pixel_cap_counting_matches_transformers(shape_THW, cap):
    ours = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE, cap_pixels_per_frame=cap, max_video_tokens=64)
    stock = Qwen3VLVideoProcessor(size=QWEN3_SIZE, cap_pixels_per_frame=cap, max_video_tokens=64)
    assert ours.get_num_of_video_patches(*shape_THW) == stock.get_num_of_video_patches(*shape_THW, {})
    outputs = ours([random_frames_THWC(*shape_THW)])
    assert outputs["video_grid_thw"].prod().item() == ours.get_num_of_video_patches(*shape_THW)


def test_qwen3_bounds_are_over_all_frames_qwen2_per_frame():
    qwen3 = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)
    short, long = qwen3.resized_size(2, 480, 640), qwen3.resized_size(16, 480, 640)
    assert short[0] * short[1] > long[0] * long[1]  # same budget shared by more frames
    qwen2 = Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE)
    assert qwen2.resized_size(2, 480, 640) == qwen2.resized_size(16, 480, 640)


def test_qwen3_refuses_single_frame_like_transformers():
    with pytest.raises(ValueError, match="temporal_factor"):
        Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)([random_frames_THWC(1, 64, 64)])


def test_pixels_equal_independent_computation():
    """Resize with torch's kernel, normalise in float64, lay out patches by hand: same numbers."""
    processor = Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE)
    frames_THWC = random_frames_THWC(3, 90, 130, seed=3)
    outputs = processor([frames_THWC])
    grid_t, grid_h, grid_w = outputs["video_grid_thw"][0].tolist()
    frames_TCHW = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        frames_TCHW, size=[grid_h * 14, grid_w * 14], mode="bicubic", align_corners=False, antialias=True
    )
    mean = torch.tensor(processor.image_mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float64).view(-1, 1, 1)
    normalized = (resized.double() / 255 - mean) / std
    normalized = torch.cat([normalized, normalized[-1:]])  # 3 frames -> padded to 4 with the last one
    patches = outputs["pixel_values_videos"].double().reshape(grid_t, grid_h // 2, grid_w // 2, 2, 2, 3, 2, 14, 14)
    for t, bh, bw, ih, iw in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 0), (1, grid_h // 2 - 1, grid_w // 2 - 1, 1, 1)]:
        h, w = (bh * 2 + ih) * 14, (bw * 2 + iw) * 14
        expected = normalized[2 * t : 2 * t + 2, :, h : h + 14, w : w + 14].permute(1, 0, 2, 3)
        assert torch.allclose(patches[t, bh, bw, ih, iw], expected, atol=2e-6, rtol=0)


def test_channel_layouts_and_grey_frames_agree():
    processor = Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE)
    grey_THW1 = random_frames_THWC(4, 50, 70)[..., :1]
    from_thwc = processor([np.repeat(grey_THW1, 3, axis=-1)])["pixel_values_videos"]
    from_grey = processor([grey_THW1])["pixel_values_videos"]
    from_tchw = processor([torch.from_numpy(np.repeat(grey_THW1, 3, axis=-1)).permute(0, 3, 1, 2)])[
        "pixel_values_videos"
    ]
    assert torch.equal(from_thwc, from_grey) and torch.equal(from_thwc, from_tchw)


def test_batch_of_mixed_sizes_equals_one_by_one():
    processor = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)
    videos = [random_frames_THWC(4, 90, 130, 0), random_frames_THWC(6, 64, 64, 1), random_frames_THWC(4, 90, 130, 2)]
    batched = processor(videos)
    singles = [processor([video]) for video in videos]
    assert torch.equal(batched["pixel_values_videos"], torch.cat([s["pixel_values_videos"] for s in singles]))
    assert batched["video_grid_thw"].tolist() == [s["video_grid_thw"][0].tolist() for s in singles]


def test_metadata_is_returned_as_copies():
    processor = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)
    metadata = VideoMetadata(total_num_frames=300, fps=25.0, frames_indices=[0, 50, 100], width=130, height=90)
    outputs = processor([random_frames_THWC(3, 90, 130)], video_metadata=[metadata], return_metadata=True)
    returned = outputs["video_metadata"][0]
    assert returned == metadata and returned is not metadata
    returned.frames_indices.append(100)  # what Qwen3VLProcessor's timestamp code does to odd-length lists
    assert metadata.frames_indices == [0, 50, 100]
    assert "video_metadata" not in processor([random_frames_THWC(3, 90, 130)])


def test_resize_can_be_switched_off_and_size_overridden_per_call():
    processor = Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE)
    frames = random_frames_THWC(2, 56, 84)
    assert processor([frames], do_resize=False)["video_grid_thw"].tolist() == [[1, 4, 6]]
    bigger = processor([frames], size={"shortest_edge": 64 * 28 * 28, "longest_edge": 128 * 28 * 28})
    assert bigger["video_grid_thw"].tolist() != [[1, 4, 6]]
    assert processor([frames], min_pixels=64 * 28 * 28)["video_grid_thw"].tolist() == bigger["video_grid_thw"].tolist()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda p: p([random_frames_THWC(4, 32, 32)], do_sample_frames=True), ValueError),
        (lambda p: p([random_frames_THWC(4, 32, 32)], do_center_crop=True), ValueError),
        (lambda p: p([random_frames_THWC(4, 32, 32)], min_pixles=10), TypeError),  # typo is not ignored
        (lambda p: p(["clip.mp4"]), TypeError),
        (lambda p: p([np.zeros((4, 32, 32, 4), dtype=np.uint8)]), ValueError),
        (lambda p: p([random_frames_THWC(4, 32, 32)], video_metadata=[{"total_num_frames": 4}] * 2), ValueError),
        (lambda p: p([random_frames_THWC(4, 32, 32)], resample=1), ValueError),
    ],
)
def test_unsupported_requests_raise(call, error):
    with pytest.raises(error):
        call(Qwen2VLVideoProcessorTorch(size=QWEN2_SIZE))


def test_constructor_refuses_frame_sampling():
    with pytest.raises(ValueError, match="do_sample_frames"):
        Qwen3VLVideoProcessorTorch(do_sample_frames=True)


def test_saved_config_names_the_stock_class(tmp_path):
    processor = Qwen3VLVideoProcessorTorch(size=QWEN3_SIZE)
    config = processor.to_dict()
    assert config["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert config["size"] == QWEN3_SIZE and config["patch_size"] == 16
    processor.save_pretrained(tmp_path)
    reloaded = Qwen3VLVideoProcessorTorch.from_pretrained(tmp_path)
    assert reloaded.size == SizeDict(**QWEN3_SIZE) and reloaded.image_mean == processor.image_mean


def test_uint8_resize_is_the_cpu_kernel():
    frames_TCHW = torch.from_numpy(random_frames_THWC(2, 90, 130)).permute(0, 3, 1, 2).contiguous()
    expected = torch.nn.functional.interpolate(frames_TCHW, size=[84, 140], mode="bicubic", antialias=True)
    assert torch.equal(resize_like_torchvision(frames_TCHW, (84, 140)), expected)
