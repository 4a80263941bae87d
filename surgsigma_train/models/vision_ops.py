"""Plain-torch replicas of the torchvision / transformers tensor ops used by the stock Qwen-VL processors.

transformers' Qwen-VL image and video processors run on torchvision (``tvF.resize``, ``tvF.normalize``,
``tvF.grayscale_to_rgb``). torchvision cannot be installed on our CPU machines, so these functions redo the
same computations with the same torch calls, in the same order, so that our processors produce bit-identical
tensors (checked against the stock processors by tests/models/test_parity_torchvision.py where torchvision
exists).

What torchvision's ``resize_image`` does for the inputs we use (torchvision 0.2x, transforms.v2):

* bilinear/bicubic use ``align_corners=False``; ``antialias`` is honoured only for these two modes;
* on CPU a uint8 tensor is interpolated natively for bicubic (and for bilinear only on AVX2/AVX512 CPUs):
  torch's uint8 anti-aliased kernels (PIL-like fixed-point arithmetic) are used, no float round trip;
* otherwise (e.g. uint8 on GPU) it goes to float32, interpolates, clamps to [0, 255] (bicubic overshoots),
  rounds and casts back.

The two uint8 paths differ by up to ~20 grey levels on noise, so which one runs depends on the device, exactly
as with torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.functional import interpolate

# PIL resampling codes (PIL.Image.Resampling / transformers' PILImageResampling) -> torch interpolate modes.
_PIL_TO_TORCH_MODE: dict[int, str] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def interpolation_mode(resample: object) -> str:
    """Torch ``interpolate`` mode for a PIL resampling code (what ``pil_torch_interpolation_mapping`` maps to).

    Only nearest/bilinear/bicubic are supported: LANCZOS/BOX/HAMMING have no torch kernel equivalent to
    torchvision's (which itself falls back to bicubic for some of them).
    """
    if isinstance(resample, str):
        mode = resample.lower()
        if mode in _PIL_TO_TORCH_MODE.values():
            return mode
    else:
        try:
            code = int(resample)  # PILImageResampling is an IntEnum
        except (TypeError, ValueError):
            code = -1
        if code in _PIL_TO_TORCH_MODE:
            return _PIL_TO_TORCH_MODE[code]
    raise ValueError(f"Unsupported resample {resample!r}: use bicubic (3), bilinear (2) or nearest (0)")


def _native_uint8_on_cpu(mode: str) -> bool:
    # torchvision's `_do_native_uint8_resize_on_cpu`: bicubic always, bilinear only where torch has the
    # vectorised uint8 kernel (their benchmarks found the float round trip faster on non-AVX CPUs).
    if mode == "bilinear":
        if torch.compiler.is_compiling():
            return True
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return mode == "bicubic"


def resize_like_torchvision(
    images_xCHW: torch.Tensor, size_hw: Sequence[int], mode: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resize(images, size_hw, mode, antialias=antialias)`` for tensors.

    ``images_xCHW`` has any number of leading dims (e.g. ``videos_BTCHW``); returns the same dtype.
    """
    new_height, new_width = int(size_hw[0]), int(size_hw[1])
    align_corners: bool | None = None
    if mode in ("bilinear", "bicubic"):
        align_corners = False
    else:
        antialias = False  # torchvision ignores antialias for the nearest modes

    shape = images_xCHW.shape
    num_channels, old_height, old_width = shape[-3:]
    if (new_height, new_width) == (old_height, old_width):
        return images_xCHW
    numel = images_xCHW.numel()
    if numel == 0:
        return images_xCHW.reshape(shape[:-3] + (num_channels, new_height, new_width))

    dtype = images_xCHW.dtype
    acceptable_dtypes = [torch.float32, torch.float64]
    if mode == "nearest" or (images_xCHW.device.type == "cpu" and _native_uint8_on_cpu(mode)):
        acceptable_dtypes.append(torch.uint8)

    images_NCHW = images_xCHW.reshape(-1, num_channels, old_height, old_width)
    strides = images_NCHW.stride()
    if (
        images_NCHW.is_contiguous(memory_format=torch.channels_last)
        and images_NCHW.shape[0] == 1
        and numel != strides[0]
    ):
        # Same restriding as torchvision so that interpolate() sees the same memory format (torch issue 68430).
        new_strides = list(strides)
        new_strides[0] = numel
        images_NCHW = images_NCHW.as_strided((1, num_channels, old_height, old_width), new_strides)

    need_cast = dtype not in acceptable_dtypes
    if need_cast:
        images_NCHW = images_NCHW.to(dtype=torch.float32)

    images_NCHW = interpolate(
        images_NCHW, size=[new_height, new_width], mode=mode, align_corners=align_corners, antialias=antialias
    )

    if need_cast:
        if mode == "bicubic" and dtype == torch.uint8:
            images_NCHW = images_NCHW.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            images_NCHW = images_NCHW.round_()
        images_NCHW = images_NCHW.to(dtype=dtype)

    return images_NCHW.reshape(shape[:-3] + (num_channels, new_height, new_width))


def normalize_like_torchvision(
    images_xCHW: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.normalize``: ``(x - mean) / std`` per channel, in the input dtype."""
    if not images_xCHW.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {images_xCHW.dtype}.")
    if images_xCHW.ndim < 3:
        raise ValueError(f"Expected a tensor of shape (..., C, H, W), got {tuple(images_xCHW.shape)}")
    if isinstance(std, (tuple, list)) and not all(std):
        raise ValueError("std evaluated to zero, leading to division by zero.")
    mean_t = torch.as_tensor(mean, dtype=images_xCHW.dtype, device=images_xCHW.device)
    std_t = torch.as_tensor(std, dtype=images_xCHW.dtype, device=images_xCHW.device)
    if mean_t.ndim == 1:
        mean_t = mean_t.view(-1, 1, 1)
    if std_t.ndim == 1:
        std_t = std_t.view(-1, 1, 1)
    images_xCHW = images_xCHW.sub_(mean_t) if inplace else images_xCHW.sub(mean_t)
    return images_xCHW.div_(std_t)


def rescale_and_normalize_like_transformers(
    images_xCHW: torch.Tensor,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> torch.Tensor:
    """transformers' ``TorchvisionBackend.rescale_and_normalize`` (fused rescale + normalise).

    With both steps on, the rescale factor is folded into mean/std (``mean / rescale_factor``), so the uint8
    values are normalised as ``(x - 255*mean) / (255*std)`` in float32: one rounding step less than rescaling
    first, and a different float result, hence the replica of the exact op order.
    """
    mean: Sequence[float] | torch.Tensor = image_mean
    std: Sequence[float] | torch.Tensor = image_std
    if do_rescale and do_normalize:
        mean = torch.tensor(image_mean, device=images_xCHW.device) * (1.0 / rescale_factor)
        std = torch.tensor(image_std, device=images_xCHW.device) * (1.0 / rescale_factor)
        do_rescale = False
    if do_normalize:
        inplace = images_xCHW.dtype != torch.float32  # the .to() below already made a copy
        return normalize_like_torchvision(images_xCHW.to(torch.float32), mean, std, inplace=inplace)
    if do_rescale:
        return images_xCHW * rescale_factor
    return images_xCHW


def grayscale_to_rgb_like_torchvision(images_xCHW: torch.Tensor) -> torch.Tensor:
    """``tvF.grayscale_to_rgb``: repeat a single channel three times; 3+ channels pass through."""
    if images_xCHW.shape[-3] >= 3:
        return images_xCHW
    repeats = [1] * images_xCHW.ndim
    repeats[-3] = 3
    return images_xCHW.repeat(repeats)


def rgba_to_rgb_like_transformers(image_4HW: torch.Tensor) -> torch.Tensor:
    """transformers' ``TorchvisionBackend.convert_to_rgb`` for a 4-channel tensor: blend onto white in float.

    ``tvF.to_dtype(..., scale=True)`` is ``x * (1/255)`` for uint8 -> float and ``x * (255 + 1 - 1e-3)``
    truncated for float -> uint8; both are reproduced here.
    """
    if image_4HW.shape[-3] != 4:
        return image_4HW
    if image_4HW.is_floating_point() and (image_4HW.min() < 0.0 or image_4HW.max() > 1.0):
        raise ValueError("An RGBA float image must have values in [0, 1]")
    orig_dtype = image_4HW.dtype
    image_HW4 = image_4HW.movedim(-3, -1)
    if not image_HW4.is_floating_point():
        image_HW4 = image_HW4.to(torch.float32).mul_(1.0 / torch.iinfo(orig_dtype).max)
    else:
        image_HW4 = image_HW4.to(torch.float32)
    image_HW3 = image_HW4[..., :3] * image_HW4[..., 3:] + (1 - image_HW4[..., 3:])
    if orig_dtype.is_floating_point:
        blended = image_HW3.to(orig_dtype)
    else:
        blended = image_HW3.mul(float(torch.iinfo(orig_dtype).max) + 1.0 - 1e-3).to(orig_dtype)
    return blended.movedim(-1, -3)


def patchify_videos(
    videos_BTCHW: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, int, int, int]:
    """Qwen-VL video patch layout: ``(B, grid_t*grid_h*grid_w, C*tps*ps*ps)``.

    Frames are padded to a multiple of ``temporal_patch_size`` by repeating the last frame; patches are
    ordered (t, h/merge, w/merge, merge_h, merge_w) so that each 2x2 merge group is contiguous, as the
    vision tower's patch merger expects.
    """
    batch_size, num_frames, channels, height, width = videos_BTCHW.shape
    if pad := -num_frames % temporal_patch_size:
        repeats_BTCHW = videos_BTCHW[:, -1:].expand(-1, pad, -1, -1, -1)
        videos_BTCHW = torch.cat((videos_BTCHW, repeats_BTCHW), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = videos_BTCHW.view(
        batch_size,
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat_patches = patches.reshape(
        batch_size, grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )
    return flat_patches, grid_t, grid_h, grid_w


def patchify_images(
    images_BCHW: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, int, int]:
    """Qwen-VL image patch layout: each image is one temporal patch (the frame repeated ``tps`` times)."""
    batch_size, channels, height, width = images_BCHW.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images_BCHW.reshape(
        batch_size, channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    # -> (B, h/merge, w/merge, merge_h, merge_w, C, ph, pw), then the temporal repeat goes before (ph, pw)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    flat_patches = (
        patches.unsqueeze(6)
        .expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
        .reshape(batch_size, grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    )
    return flat_patches, grid_h, grid_w
