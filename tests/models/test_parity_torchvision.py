"""Our torchvision-free processors vs transformers' stock (torchvision) processors: identical outputs.

Runs only where torchvision is installed (GPU clusters); skipped on our CPU machines. Everything is compared
bit for bit (``rtol=atol=0``): our ops call the same torch kernels in the same order as torchvision/transformers,
so any difference at all means a real divergence (e.g. a torchvision release that changed its resize path).
Inputs are RGB uint8 (as our decoders produce); both sides run on CPU unless a test says otherwise.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytestmark = pytest.mark.integration

from transformers.video_utils import VideoMetadata

from surgsigma_train.models import get_family, known_families

BOUNDS = {
    "qwen2_vl": {
        "image_min_pixels": 16 * 28 * 28,
        "image_max_pixels": 128 * 28 * 28,
        "video_min_pixels": 8 * 28 * 28,
        "video_max_pixels": 48 * 28 * 28,
    },
    "qwen2_5_vl": {
        "image_min_pixels": 4 * 28 * 28,
        "image_max_pixels": 256 * 28 * 28,
        "video_min_pixels": 16 * 28 * 28,
        "video_max_pixels": 32 * 28 * 28,
    },
    "qwen3_vl": {
        "image_min_pixels": 16 * 32 * 32,
        "image_max_pixels": 128 * 32 * 32,
        "video_min_pixels": 8 * 32 * 32,
        "video_max_pixels": 16 * 48 * 32 * 32,
    },
}
IMAGE_SHAPES_HW = [(90, 130), (200, 150), (17, 23), (480, 854), (1080, 1920), (28, 1000), (333, 333), (56, 84)]
VIDEO_SHAPES_THW = [(8, 90, 130), (3, 90, 130), (2, 224, 224), (16, 240, 426), (5, 17, 23), (8, 90, 130), (7, 360, 64)]
TENSOR_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "offset_mapping",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


def random_image_HWC(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_frames_THWC(num_frames: int, height: int, width: int) -> np.ndarray:
    t, rows, cols = np.mgrid[0:num_frames, 0:height, 0:width]
    frames = np.stack([(rows * 7 + t * 13) % 256, (cols * 5) % 256, (rows + cols + t) % 256], axis=-1)
    return frames.astype(np.uint8)


def media_set(seed: int = 0):
    images = [random_image_HWC(h, w, seed + i) for i, (h, w) in enumerate(IMAGE_SHAPES_HW)]
    images.append(PIL.Image.fromarray(random_image_HWC(77, 101, seed + 99)))  # PIL input path
    videos = [
        np.random.default_rng(seed + 10 + i).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        for i, (t, h, w) in enumerate(VIDEO_SHAPES_THW)
    ]
    videos.append(smooth_frames_THWC(6, 180, 320))
    metadata = [
        VideoMetadata(total_num_frames=30 * len(video), fps=30.0, frames_indices=list(range(0, 30 * len(video), 30)))
        for video in videos
    ]
    metadata[1] = VideoMetadata(total_num_frames=100, fps=25.0, frames_indices=[0, 40, 80])  # odd count
    return images, videos, metadata


def conversation(num_images: int, num_videos: int) -> list[dict]:
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": "and "}] + [{"type": "video"}] * num_videos
    return [
        {"role": "user", "content": parts + [{"type": "text", "text": "What happens? 42 steps."}]},
        {"role": "assistant", "content": "Dissection of the hepatocystic triangle."},
    ]


def both_processors(family: str):
    model_family = get_family(family)
    ours = model_family.build_processor("tiny", vision_backend="ours", **BOUNDS[family])
    stock = model_family.build_processor("tiny", vision_backend="stock", **BOUNDS[family])
    assert type(stock).__module__.startswith("transformers.")
    assert type(stock.video_processor).__name__ == model_family.video_processor_class.stock_class_name
    assert type(stock.image_processor).__name__ == "Qwen2VLImageProcessor"
    return ours, stock


def assert_identical(ours: dict, stock: dict) -> None:
    for key in TENSOR_KEYS:
        assert (key in ours) == (key in stock), key
        if key not in ours:
            continue
        ours_value, stock_value = ours[key], stock[key]
        if not isinstance(ours_value, torch.Tensor):
            ours_value, stock_value = torch.as_tensor(ours_value), torch.as_tensor(stock_value)
        assert ours_value.dtype == stock_value.dtype, key
        torch.testing.assert_close(ours_value, stock_value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    if "text_replacement_offsets" in stock:
        assert ours["text_replacement_offsets"] == stock["text_replacement_offsets"]


def call(processor, texts, images, videos, metadata, **kwargs):
    return processor(
        text=texts,
        images=images,
        videos=videos,
        video_metadata=copy.deepcopy(metadata),  # the stock Qwen3 path edits metadata in place
        return_tensors="pt",
        return_text_replacement_offsets=True,
        return_offsets_mapping=True,
        padding=True,
        **kwargs,
    )


@pytest.mark.parametrize("family", known_families())
def test_full_processor_parity(family):
    ours, stock = both_processors(family)
    images, videos, metadata = media_set()
    text = ours.apply_chat_template(conversation(len(images), len(videos)), tokenize=False)
    assert text == stock.apply_chat_template(conversation(len(images), len(videos)), tokenize=False)
    assert_identical(call(ours, [text], images, videos, metadata), call(stock, [text], images, videos, metadata))


@pytest.mark.parametrize("family", known_families())
def test_batched_texts_parity(family):
    ours, stock = both_processors(family)
    images, videos, metadata = media_set(seed=5)
    first = ours.apply_chat_template(conversation(2, 1), tokenize=False)
    second = ours.apply_chat_template(conversation(3, 2), tokenize=False)
    args = ([first, second], images[:5], videos[:3], metadata[:3])
    assert_identical(call(ours, *args), call(stock, *args))


@pytest.mark.parametrize("family", known_families())
def test_video_processor_parity(family):
    ours, stock = both_processors(family)
    _, videos, metadata = media_set(seed=3)
    kwargs = {"video_metadata": copy.deepcopy(metadata), "return_metadata": True, "return_tensors": "pt"}
    ours_out = ours.video_processor(videos, **copy.deepcopy(kwargs))
    stock_out = stock.video_processor(videos, **copy.deepcopy(kwargs))
    torch.testing.assert_close(ours_out["pixel_values_videos"], stock_out["pixel_values_videos"], rtol=0, atol=0)
    assert torch.equal(ours_out["video_grid_thw"], stock_out["video_grid_thw"])
    assert [m.frames_indices for m in ours_out["video_metadata"]] == [
        list(m.frames_indices) for m in stock_out["video_metadata"]
    ]


@pytest.mark.parametrize("family", known_families())
def test_video_pixel_cap_parity(family):
    """qwen-vl-utils' per-frame cap, where this transformers version's stock class has it.

    Set at construction: the stock classes read ``max_video_tokens`` from the instance only and ignore a
    per-call value (ours honours both).
    """
    import transformers

    model_family = get_family(family)
    stock_class = getattr(transformers, model_family.video_processor_class.stock_class_name)
    if "cap_pixels_per_frame" not in stock_class.valid_kwargs.__annotations__:
        pytest.skip("this transformers version has no cap_pixels_per_frame for this family")
    _, videos, _ = media_set(seed=4)
    size = {"shortest_edge": BOUNDS[family]["video_min_pixels"], "longest_edge": BOUNDS[family]["video_max_pixels"]}
    for cap in (True, False):
        options = {"size": size, "cap_pixels_per_frame": cap, "max_video_tokens": 32, "do_sample_frames": False}
        ours_out = model_family.video_processor_class(**options)(videos, return_tensors="pt")
        stock_out = stock_class(**options)(videos, return_tensors="pt")
        torch.testing.assert_close(ours_out["pixel_values_videos"], stock_out["pixel_values_videos"], rtol=0, atol=0)
        assert torch.equal(ours_out["video_grid_thw"], stock_out["video_grid_thw"])


@pytest.mark.parametrize("family", known_families())
def test_image_processor_parity_input_kinds(family):
    ours, stock = both_processors(family)
    image_HWC = random_image_HWC(123, 77, seed=8)
    inputs = [
        image_HWC,
        PIL.Image.fromarray(image_HWC),
        torch.from_numpy(image_HWC).permute(2, 0, 1).contiguous(),
        PIL.Image.fromarray(image_HWC[..., 0], mode="L"),
        np.full((300, 40, 3), 255, dtype=np.uint8),
    ]
    for image in inputs:
        ours_out = ours.image_processor([image], return_tensors="pt")
        stock_out = stock.image_processor([image], return_tensors="pt")
        torch.testing.assert_close(ours_out["pixel_values"], stock_out["pixel_values"], rtol=0, atol=0)
        assert torch.equal(ours_out["image_grid_thw"], stock_out["image_grid_thw"])


@pytest.mark.parametrize("family", known_families())
def test_patch_counting_parity(family):
    ours, stock = both_processors(family)
    for height, width in IMAGE_SHAPES_HW:
        assert ours.image_processor.get_number_of_image_patches(height, width, {}) == (
            stock.image_processor.get_number_of_image_patches(height, width, {})
        )
    for num_frames, height, width in VIDEO_SHAPES_THW:
        # even frame counts: transformers 5.17's Qwen2-VL counter floors odd counts (fixed in later releases)
        num_frames += num_frames % 2
        assert ours.video_processor.get_num_of_video_patches(num_frames, height, width, {}) == (
            stock.video_processor.get_num_of_video_patches(num_frames, height, width, {})
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", known_families())
def test_parity_on_cuda(family):
    """On a GPU, torchvision resizes uint8 through float32 with clamp + round; ours must follow it there too."""
    ours, stock = both_processors(family)
    images, videos, _ = media_set(seed=6)
    ours_images = ours.image_processor(images, device="cuda", return_tensors="pt")
    stock_images = stock.image_processor(images, device="cuda", return_tensors="pt")
    assert ours_images["pixel_values"].device.type == "cuda"
    torch.testing.assert_close(ours_images["pixel_values"], stock_images["pixel_values"], rtol=0, atol=0)
    ours_videos = ours.video_processor(videos, device="cuda", return_tensors="pt")
    stock_videos = stock.video_processor(videos, device="cuda", return_tensors="pt")
    torch.testing.assert_close(ours_videos["pixel_values_videos"], stock_videos["pixel_values_videos"], rtol=0, atol=0)
    assert torch.equal(ours_videos["video_grid_thw"].cpu(), stock_videos["video_grid_thw"].cpu())


@pytest.mark.parametrize("family", known_families())
def test_exported_processor_loads_with_stock_autoprocessor(family, tmp_path):
    from transformers import AutoProcessor

    ours, _ = both_processors(family)
    ours.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == get_family(family).stock_processor_class_name
    images, videos, metadata = media_set(seed=7)
    text = ours.apply_chat_template(conversation(2, 2), tokenize=False)
    # the reloaded stock video processor would re-sample Qwen3-VL frames by default: pass the frames as sampled
    assert_identical(
        call(ours, [text], images[:2], videos[:2], metadata[:2]),
        call(reloaded, [text], images[:2], videos[:2], metadata[:2], do_sample_frames=False),
    )
