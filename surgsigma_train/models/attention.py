"""Attention backends and sequence packing: which backend confines attention to each packed sample, at what cost.

A packed row (``data/packing.py``) carries no attention mask, only ``[4, 1, T]`` position ids whose text row
restarts at 0 for every sample. Per backend, with T = sum of the sample lengths s_i:

| backend | how the samples are kept apart | attention cost |
|---|---|---|
| ``sdpa``, ``eager`` | transformers builds a block-diagonal causal ``[1, 1, T, T]`` mask from the text row | T^2 scores (masked ones included) + a T^2 mask; sdpa cannot use its flash kernel with a mask |
| ``flex_attention`` | would get the same mask as a BlockMask, but the Qwen-VL classes of transformers 5.25 refuse flex attention (``_supports_flex_attn`` False): a ConfigError here | (fully masked blocks skipped: ~sum s_i^2) |
| ``flash_attention_2`` | no mask; ``flash_attn_varlen_func`` with ``cu_seqlens`` where the text row is 0 (CUDA + flash_attn) | sum s_i^2 |
| ``sdpa_varlen`` (ours, below) | no mask; one causal SDPA call per sample, segments where the text row restarts | sum s_i^2 (+ one kernel call per sample per layer) |

``model.attn_implementation: auto`` resolves (``resolve_attn_implementation``) to flash_attention_2 where CUDA
and the flash_attn package are there, else to ``sdpa_varlen`` when packing (masked sdpa pays T^2), else
``sdpa``. flash_attention_2 asked for where it cannot run is a ConfigError (exit 2), and so is any backend whose
packed mask, probed at model build (``check_packing_confined``), is not block-diagonal: never a silent leak.
flex_attention on a model class transformers does not allow it for (all three families in 5.25) is a
ConfigError too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask

from surgsigma_train.errors import ConfigError

SDPA_VARLEN = "sdpa_varlen"
# Backends of the locked transformers that confine attention to each sample of a packed row (probed again at model
# build by `check_packing_confined`).
MASK_BACKENDS = ("sdpa", "eager", "flex_attention")  # a block-diagonal mask built by transformers
VARLEN_BACKENDS = ("flash_attention_2", SDPA_VARLEN)  # no mask: segments read from the text position row


def packed_segments(position_ids_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each sequence in one row of text position ids: a new one wherever the position does not
    grow by exactly 1 (the rule of ``transformers.masking_utils.find_packed_sequence_indices``)."""
    length = position_ids_row.shape[-1]
    if length == 0:
        return []
    steps = torch.diff(position_ids_row.reshape(-1)) != 1
    starts = [0] + (torch.nonzero(steps).reshape(-1) + 1).tolist()
    return list(zip(starts, starts[1:] + [length]))


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA run separately on each packed sample of a row (causal inside it): sum s_i^2 instead of T^2.

    ``query``: [B, heads, T, D]; returns [B, T, heads, D] like transformers' sdpa. Everything that is not a
    mask-free causal self-attention over whole rows (a padding mask, a cache with q_len != kv_len, the
    bidirectional vision tower) is handed to transformers' sdpa unchanged.
    """
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if (attention_mask is not None or position_ids is None or not causal or query.shape[2] != key.shape[2]
            or kwargs.get("sliding_window") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    rows = position_ids if position_ids.ndim == 2 else position_ids.reshape(-1, position_ids.shape[-1])
    if rows.shape[0] != query.shape[0]:
        rows = rows.expand(query.shape[0], -1)
    outputs = []
    for b in range(query.shape[0]):
        parts = [
            sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                   None, is_causal=True, **{k: v for k, v in kwargs.items() if k != "is_causal"})[0]
            for s, e in packed_segments(rows[b])
        ]
        outputs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)), None


def sdpa_varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a mask-free square self-attention (the attention function reads the segments from the
    position ids); transformers' sdpa mask otherwise (padding, cache)."""
    if (kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset")):
        return None
    return sdpa_mask(*args, **kwargs)


def register_attention_backends() -> None:
    """Makes ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent; done on import)."""
    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_varlen_mask)


register_attention_backends()


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str, *, packing: bool, model_class: type | None = None) -> str:
    """The transformers ``attn_implementation`` for a recipe's ``model.attn_implementation``.

    ``auto``: flash_attention_2 (CUDA + flash_attn) > sdpa_varlen when packing > sdpa. ConfigError for
    flash_attention_2 where it cannot run (transformers would fail later with an ImportError) and for
    flex_attention on a model class that transformers does not let use it (none of the three Qwen-VL classes in
    transformers 5.25: ``_supports_flex_attn`` is False, and ``from_pretrained`` raises a ValueError).
    """
    if requested == "flex_attention" and model_class is not None and not getattr(model_class, "_supports_flex_attn", False):
        raise ConfigError(f"model.attn_implementation=flex_attention: transformers does not support flex attention for "
                          f"{model_class.__name__}; use auto, sdpa_varlen, sdpa or flash_attention_2")
    if requested == "auto":
        if flash_attention_available():
            return "flash_attention_2"
        return SDPA_VARLEN if packing else "sdpa"
    if requested == "flash_attention_2" and not flash_attention_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs CUDA and the flash_attn package "
            f"(cuda: {torch.cuda.is_available()}, flash_attn: {importlib.util.find_spec('flash_attn') is not None}); "
            "use auto, sdpa_varlen or sdpa")
    return requested


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return getattr(config, "text_config", None) or config


def check_packing_confined(model: torch.nn.Module) -> None:
    """ConfigError unless the model's attention backend keeps the samples of a packed row apart.

    Probes transformers' own mask construction with the model's text config on a row of three samples (lengths
    3, 2, 4): a mask backend must yield exactly the block-diagonal causal mask; a varlen backend must get no mask
    (it then splits by the text position row). Cheap (a 9 x 9 mask), run once at model build when packing.
    """
    from surgsigma_train.data.packing import unwrap_hf_model

    config = _text_config(unwrap_hf_model(model))
    backend = config._attn_implementation
    lengths = (3, 2, 4)
    text_positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    total = text_positions.shape[1]
    if backend in VARLEN_BACKENDS:
        if packed_segments(text_positions[0]) != [(0, 3), (3, 5), (5, 9)]:
            raise ConfigError(f"attn_implementation={backend}: packed segments are not read from position ids")
        return
    if backend not in MASK_BACKENDS:
        raise ConfigError(f"attn_implementation={backend!r} is not known to confine attention to each sample of a "
                          f"packed row; use one of {MASK_BACKENDS + VARLEN_BACKENDS} with data.packing")
    if backend == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("attn_implementation=flex_attention with data.packing is only supported on CUDA here; "
                          "use sdpa_varlen or sdpa on CPU")
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(1, total, 1), attention_mask=None,
                              cache=None, position_ids=text_positions)
    expected = torch.block_diag(*[torch.ones(n, n).tril() for n in lengths]).bool()
    if backend == "flex_attention":
        dense = mask.to_dense()[0, 0, :total, :total].bool() if mask is not None else None
    elif mask is not None and mask.dtype == torch.bool:
        dense = mask[0, 0]
    elif mask is not None:
        dense = mask[0, 0] == 0  # eager: additive mask, 0 where allowed
    else:
        dense = None
    if dense is None or not torch.equal(dense.cpu(), expected):
        raise ConfigError(f"attn_implementation={backend}: transformers "
                          "does not build a per-sample (block-diagonal) mask from packed position ids here; "
                          "packing would let samples attend to each other")
