"""Multimodal sequence packing: several encoded samples in ONE row (batch dim 1, no padding).

The contract with transformers (checked against 5.25.0, the locked version; ``tests/data/test_packing_positions.py``
fails if a future version changes any part of it):

1. Inputs. ``pack_encoded`` concatenates the samples' ``input_ids`` / ``labels`` / ``mm_token_type_ids`` into
   ``[1, T]`` rows (T = sum of the sample lengths) and the vision tensors in sample order (as ``PadCollator``),
   and passes NO ``attention_mask``.
2. Positions. ``packed_position_ids`` returns ``position_ids`` of shape ``[4, 1, T]``: row 0 is the text position
   (``0..len_i-1``, restarting at 0 for every sample), rows 1-3 are the (temporal, height, width) mRoPE ids, computed
   per sample by the model's own ``get_rope_index`` (the same function ``compute_3d_position_ids`` calls for an
   unpacked batch, so grids, ``second_per_grid_ts`` (Qwen2.5-VL) and Qwen3-VL's per-frame split with text
   timestamps come out exactly as for the sample alone) and concatenated.
3. What transformers does with them (``Qwen2VLTextModel`` / ``Qwen2_5_VLTextModel`` / ``Qwen3VLTextModel``
   ``.forward``): ``position_ids.ndim == 3 and position_ids.shape[0] == 4`` splits row 0 off as
   ``text_position_ids``; rows 1-3 go to the rotary embedding. ``create_causal_mask(..., position_ids=
   text_position_ids)`` -> ``_preprocess_mask_arguments`` calls ``find_packed_sequence_indices`` ONLY when
   ``attention_mask is None and cache is None`` (so ``use_cache=False``: a cache turns packing detection off);
   a new sequence starts wherever ``diff(text_position_ids) != 1``. The mask function becomes
   ``causal(text_pos[q] >= text_pos[kv]) AND same_sequence(q, kv)``: a block-diagonal causal mask (sdpa: a
   boolean ``[1, 1, T, T]`` mask, eager: the additive float equivalent, flex: a BlockMask). flash_attention_2
   gets no mask; the decoder layers pass ``text_position_ids`` down and ``_flash_attention_forward`` sees
   ``_is_packed_sequence(position_ids, batch_size=1)`` and runs ``flash_attn_varlen_func`` with ``cu_seqlens`` at
   the positions where the text row is 0.
   With only the 3 mRoPE rows (``[3, 1, T]``) ``text_position_ids`` is None: no packing detection, a plain causal
   mask over the whole row, i.e. every sample attends to the samples before it (a silent leak), and
   flash_attention_2 gets no position ids, i.e. one sequence of length T (the same leak).
4. Loss boundary. The next-token loss (``training.trainer.loss_positions`` and transformers' ``ForCausalLMLoss``)
   makes position ``p`` predict ``labels[p + 1]``. In a packed row the last token of sample i is followed by the
   first token of sample i+1, so the only cross-sample target is "last token of i predicts first token of
   i+1"; it is removed by setting the label of every sample's first token to IGNORE_INDEX. That loses nothing:
   unpacked, a sample's first label is never a target either (``labels[:, 1:]``), and every in-sample target
   ``labels[off + j + 1]`` (j < len - 1) is kept. (The last token of the last sample predicts nothing, as
   unpacked.) So the packed targets are exactly the union of the per-sample targets.

Cost per backend (T = sum s_i over a row of samples of lengths s_i): sdpa and eager with the block-diagonal
mask compute all T^2 scores and mask them; flex_attention skips fully masked blocks (~sum s_i^2 plus block
edges); flash_attention_2 varlen and our ``sdpa_varlen`` (one SDPA call per sample) compute sum s_i^2.
"""

from __future__ import annotations

from typing import Any

import torch

from surgsigma_train.data.encode import IGNORE_INDEX, EncodedSample

# Vision tensors concatenated in sample order (the order the model consumes them: image grids in the order of the
# image spans of the row, video grids in the order of the video spans; same keys as PadCollator).
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def pack_encoded(samples: list[EncodedSample], pad_token_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(model inputs of one packed row, per-sample lengths).

    ``input_ids`` / ``labels`` / ``mm_token_type_ids``: ``[1, T]``, T = sum of lengths, no padding and no
    ``attention_mask`` (its absence is what lets transformers build the per-sample mask from the position ids).
    The label of each sample's first token is IGNORE_INDEX, so that no sample's token is ever a target predicted
    from another sample (see the module docstring, item 4). ``pad_token_id`` is unused by the row itself (there
    is no padding); it is taken so that the packer and ``PadCollator`` share a signature and checked to be an int.
    """
    if not samples:
        raise ValueError("pack_encoded needs at least one sample")
    if not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    seq_lens = [int(s.input_ids.numel()) for s in samples]
    if min(seq_lens) < 1:
        raise ValueError("cannot pack an empty sample")
    labels = []
    for sample in samples:
        sample_labels = sample.labels.clone()
        sample_labels[0] = IGNORE_INDEX  # never a target: see item 4 of the module docstring
        labels.append(sample_labels)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.cat([s.input_ids for s in samples]).view(1, -1),
        "labels": torch.cat(labels).view(1, -1),
        "mm_token_type_ids": torch.cat([s.mm_token_type_ids for s in samples]).view(1, -1),
    }
    for key in VISION_KEYS:
        parts = [s.vision[key] for s in samples if key in s.vision]
        if parts:
            inputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    unknown = sorted({k for s in samples for k in s.vision} - set(VISION_KEYS))
    if unknown:
        raise ValueError(f"pack_encoded does not know how to concatenate vision tensors {unknown}")
    return inputs, seq_lens


def unwrap_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / FSDP1 / DeepSpeed / torch.compile wrappers (FSDP2's
    ``fully_shard`` keeps the class, so a sharded model is returned as is)."""
    from transformers import PreTrainedModel

    for _ in range(16):
        if isinstance(model, PreTrainedModel):
            return model
        if hasattr(model, "get_base_model"):  # peft.PeftModel -> LoraModel.model
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeedEngine
            model = model.module
        else:
            break
    raise TypeError(f"no transformers model found inside {type(model).__name__}")


def _rope_index_owner(model: torch.nn.Module) -> Any:
    hf_model = unwrap_hf_model(model)
    for candidate in (hf_model, getattr(hf_model, "model", None)):
        if candidate is not None and callable(getattr(candidate, "get_rope_index", None)):
            return candidate
    raise TypeError(f"{type(hf_model).__name__} has no get_rope_index (not an mRoPE model?)")


def _take_grids(grids: torch.Tensor | None, start: int, num_tokens: int, merge_area: int, what: str) -> int:
    """Index after the grids (from ``start``) whose merged token counts add up to ``num_tokens``."""
    end, taken = start, 0
    while taken < num_tokens:
        if grids is None or end >= grids.shape[0]:
            raise ValueError(f"{what}: the row has more {what} tokens than its grids account for")
        taken += int(grids[end].prod()) // merge_area
        end += 1
    if taken != num_tokens:
        raise ValueError(f"{what}: a sample's {num_tokens} tokens do not match whole grids ({taken})")
    return end


@torch.no_grad()
def packed_position_ids(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seq_lens: list[int]) -> torch.Tensor:
    """``[4, 1, T]`` position ids of a packed row: text row restarting at 0 per sample, then the per-sample mRoPE
    rows from the model's own ``get_rope_index`` (uses only the config; works on a wrapped or sharded model).

    Each sample's grids are found by counting its image / video tokens in ``mm_token_type_ids`` (a grid of
    ``t*h*w`` patches gives ``t*h*w / merge_size**2`` tokens), so no per-sample bookkeeping is needed beyond
    ``seq_lens``.
    """
    owner = _rope_index_owner(model)
    input_ids, token_types = inputs["input_ids"], inputs["mm_token_type_ids"]
    if input_ids.shape[0] != 1 or sum(seq_lens) != input_ids.shape[1]:
        raise ValueError(f"a packed row is [1, sum(seq_lens)={sum(seq_lens)}], got {list(input_ids.shape)}")
    merge_area = int(owner.config.vision_config.spatial_merge_size) ** 2
    image_grids, video_grids = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    seconds = inputs.get("second_per_grid_ts")
    rows, offset, next_image, next_video = [], 0, 0, 0
    for length in seq_lens:
        ids = input_ids[:, offset:offset + length]
        types = token_types[:, offset:offset + length]
        image_end = _take_grids(image_grids, next_image, int((types == 1).sum()), merge_area, "image")
        video_end = _take_grids(video_grids, next_video, int((types == 2).sum()), merge_area, "video")
        kwargs: dict[str, torch.Tensor] = {}
        if image_end > next_image:
            kwargs["image_grid_thw"] = image_grids[next_image:image_end]
        if video_end > next_video:
            kwargs["video_grid_thw"] = video_grids[next_video:video_end]
            if seconds is not None:
                kwargs["second_per_grid_ts"] = seconds[next_video:video_end]
        mrope, _ = owner.get_rope_index(ids, mm_token_type_ids=types, **kwargs)
        text = torch.arange(length, dtype=mrope.dtype, device=mrope.device).view(1, 1, length)
        rows.append(torch.cat([text, mrope], dim=0))
        offset, next_image, next_video = offset + length, image_end, video_end
    if image_grids is not None and next_image != image_grids.shape[0]:
        raise ValueError(f"{image_grids.shape[0] - next_image} image grids left over after the row's image tokens")
    if video_grids is not None and next_video != video_grids.shape[0]:
        raise ValueError(f"{video_grids.shape[0] - next_video} video grids left over after the row's video tokens")
    return torch.cat(rows, dim=2)
