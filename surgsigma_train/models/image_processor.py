"""Qwen-VL image processor that runs without torchvision and matches the stock (torchvision) one exactly.

transformers ships two Qwen2-VL image processors: ``Qwen2VLImageProcessor`` (torchvision tensors; the default
wherever torchvision is installed, i.e. on our GPU clusters and at inference) and ``Qwen2VLImageProcessorPil``
(PIL/NumPy). They do not agree: PIL's bicubic resize and float64 NumPy normalisation give pixel values up to
~0.3 apart (normalised units) from the torchvision path on the same image. To train on CPU with exactly the
tensors the model sees elsewhere, this class keeps the Pil processor's interface (kwargs, defaults, patch
counting, config format) but replaces its pixel pipeline with plain-torch replicas of the torchvision path
(`vision_ops`). Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use this processor (Qwen3-VL with patch 16 and
mean = std = 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, SizeDict, get_image_type, infer_channel_dimension_format
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from surgsigma_train.models.vision_ops import (
    grayscale_to_rgb_like_torchvision,
    interpolation_mode,
    patchify_images,
    rescale_and_normalize_like_transformers,
    resize_like_torchvision,
    rgba_to_rgb_like_transformers,
)

# transformers' name for the processor this one reproduces: written into saved configs so that an exported
# checkpoint loads with stock transformers (AutoImageProcessor) anywhere.
STOCK_IMAGE_PROCESSOR_TYPE = "Qwen2VLImageProcessor"


def _pil_to_rgb_array_HWC(image: PIL.Image.Image) -> np.ndarray:
    """RGB array of a PIL image; transparency is composited onto white (as transformers >= 5.2x does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


class QwenImageProcessor(Qwen2VLImageProcessorPil):
    """Torch-only Qwen-VL image processor: same tensors as transformers' ``Qwen2VLImageProcessor``.

    Output per call: ``pixel_values`` (num_patches, C*temporal_patch_size*patch_size**2) float32 and
    ``image_grid_thw`` (num_images, 3) int64 with t = 1.
    """

    @property
    def backend(self) -> str:
        return "torch"

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One raw image (PIL, NumPy or torch; HWC or CHW) -> channels-first tensor, as the torchvision backend."""
        image_type = get_image_type(image).value
        if image_type == "pillow":
            array_HWC = _pil_to_rgb_array_HWC(image) if do_convert_rgb else np.array(image)
            image_t = torch.from_numpy(array_HWC)
            input_data_format = ChannelDimension.LAST
        elif image_type == "numpy":
            image_t = torch.from_numpy(image)
        else:
            image_t = image

        if image_t.ndim == 2:
            image_t = image_t.unsqueeze(0)
            input_data_format = ChannelDimension.FIRST
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image_t, num_channels=(1, 3, 4))
        if input_data_format == ChannelDimension.LAST:
            image_t = image_t.permute(2, 0, 1)

        if do_convert_rgb and image_type != "pillow":
            image_t = rgba_to_rgb_like_transformers(grayscale_to_rgb_like_torchvision(image_t))

        image_t = image_t.contiguous()
        if device is not None:
            image_t = image_t.to(device)
        return image_t

    def resized_size(self, height: int, width: int, size: SizeDict | None = None) -> tuple[int, int]:
        """(height, width) an image of this size is resized to (``smart_resize`` with this processor's settings)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = size if size is not None else self.size
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=size.shortest_edge,
            max_pixels=size.longest_edge,
        )

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_resize: bool,
        size: SizeDict,
        resample: Any,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        patch_size: int,
        temporal_patch_size: int,
        merge_size: int,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if not size.shortest_edge or not size.longest_edge:
            raise ValueError(f"`size` must have 'shortest_edge' and 'longest_edge', got {size}")
        mode = interpolation_mode(resample)

        # One image at a time, as the stock processor does for CPU tensors (it disables shape grouping there);
        # every image plane is resized independently anyway, so grouping never changes the values.
        patches_per_image: list[torch.Tensor] = []
        grids: list[list[int]] = []
        for image_CHW in images:
            images_BCHW = image_CHW.unsqueeze(0)
            if do_resize:
                height, width = images_BCHW.shape[-2:]
                target_hw = smart_resize(
                    height,
                    width,
                    factor=patch_size * merge_size,
                    min_pixels=size.shortest_edge,
                    max_pixels=size.longest_edge,
                )
                images_BCHW = resize_like_torchvision(images_BCHW, target_hw, mode=mode, antialias=True)
            images_BCHW = rescale_and_normalize_like_transformers(
                images_BCHW, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            patches, grid_h, grid_w = patchify_images(
                images_BCHW, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size
            )
            patches_per_image.append(patches[0])
            grids.append([1, grid_h, grid_w])

        pixel_values = torch.cat(patches_per_image, dim=0)
        image_grid_thw = torch.tensor(grids, dtype=torch.long)
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}, tensor_type=return_tensors
        )

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        config["image_processor_type"] = STOCK_IMAGE_PROCESSOR_TYPE
        return config
