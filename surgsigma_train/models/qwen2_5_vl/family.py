"""Qwen2.5-VL: windowed-attention ViT (patch 14, SwiGLU MLP) -> 2x2 patch merger -> Qwen2 LM with mRoPE.

Video positions advance with real time (``second_per_grid_ts`` x ``tokens_per_second``), which the processor
derives from the ``VideoMetadata`` of each clip.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from surgsigma_train.models.family import (
    QWEN_LANGUAGE_MODEL_PREFIXES,
    QWEN_LM_LINEAR_LAYERS,
    TINY_LM,
    ModelFamily,
    VisionDefaults,
)
from surgsigma_train.models.qwen2_5_vl.processor import Qwen2_5_VLProcessorTorch
from surgsigma_train.models.video_processor import Qwen2VLVideoProcessorTorch

VISION_DEFAULTS = VisionDefaults(
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=tuple(OPENAI_CLIP_MEAN),
    image_std=tuple(OPENAI_CLIP_STD),
)


def tiny_config() -> Qwen2_5_VLConfig:
    """Random-weight Qwen2.5-VL with the real structure and tiny sizes."""
    return Qwen2_5_VLConfig(
        text_config={
            **TINY_LM,
            # (t, h, w) rotary sections; must sum to head_dim / 2 = 8 (real 7B: [16, 24, 24] of 64)
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_LM["hidden_size"],  # merger output = LM width
            "patch_size": VISION_DEFAULTS.patch_size,
            "temporal_patch_size": VISION_DEFAULTS.temporal_patch_size,
            "spatial_merge_size": VISION_DEFAULTS.merge_size,
            # block 0 attends within 112-pixel windows, block 1 globally (real 7B: every 8th block is global)
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,  # as in the published 7B config
        },
        tie_word_embeddings=True,
    )


FAMILY = ModelFamily(
    name="qwen2_5_vl",
    model_class=Qwen2_5_VLForConditionalGeneration,
    tiny_config=tiny_config,
    vision_tower_prefixes=("model.visual.patch_embed.", "model.visual.blocks."),
    projector_prefixes=("model.visual.merger.",),
    language_model_prefixes=QWEN_LANGUAGE_MODEL_PREFIXES,
    # NB: the vision MLP also has gate/up/down_proj; use FAMILY.lora_target_modules() to keep LoRA in the LM
    default_lora_targets=QWEN_LM_LINEAR_LAYERS,
    processor_class=Qwen2_5_VLProcessorTorch,
    stock_processor_class_name="Qwen2_5_VLProcessor",
    video_processor_class=Qwen2VLVideoProcessorTorch,
    vision_defaults=VISION_DEFAULTS,
    chat_template_package=__package__,
)
