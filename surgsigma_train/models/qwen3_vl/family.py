"""Qwen3-VL: ViT (patch 16, learned + rotary positions) -> 2x2 patch merger -> Qwen3 LM with interleaved mRoPE.

DeepStack: features of selected ViT blocks go through extra mergers and are added to the hidden states of the
first LM layers. Videos carry frame timestamps as text (``<t seconds>``), computed from ``VideoMetadata``.
"""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from surgsigma_train.models.family import (
    QWEN_LANGUAGE_MODEL_PREFIXES,
    QWEN_LM_LINEAR_LAYERS,
    TINY_LM,
    ModelFamily,
    VisionDefaults,
)
from surgsigma_train.models.qwen3_vl.processor import Qwen3VLProcessorTorch
from surgsigma_train.models.video_processor import Qwen3VLVideoProcessorTorch

VISION_DEFAULTS = VisionDefaults(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=tuple(IMAGENET_STANDARD_MEAN),  # 0.5: Qwen3-VL normalises to [-1, 1]
    image_std=tuple(IMAGENET_STANDARD_STD),
)


def tiny_config() -> Qwen3VLConfig:
    """Random-weight Qwen3-VL with the real structure and tiny sizes."""
    return Qwen3VLConfig(
        text_config={
            **TINY_LM,
            "head_dim": TINY_LM["hidden_size"] // TINY_LM["num_attention_heads"],  # 16
            # interleaved (t, h, w) sections; must sum to head_dim / 2 = 8 (real 8B: [24, 20, 20] of 64)
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
                "rope_theta": 5_000_000.0,
            },
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
            "num_position_embeddings": 64,  # an 8x8 learned grid, bilinearly interpolated (real: 48x48)
            # DeepStack taps after both ViT blocks feed LM layers 0 and 1 (real 8B: blocks 8, 16, 24)
            "deepstack_visual_indexes": [0, 1],
        },
        tie_word_embeddings=True,
    )


FAMILY = ModelFamily(
    name="qwen3_vl",
    model_class=Qwen3VLForConditionalGeneration,
    tiny_config=tiny_config,
    vision_tower_prefixes=("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
    projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_model_prefixes=QWEN_LANGUAGE_MODEL_PREFIXES,
    default_lora_targets=QWEN_LM_LINEAR_LAYERS,
    processor_class=Qwen3VLProcessorTorch,
    stock_processor_class_name="Qwen3VLProcessor",
    video_processor_class=Qwen3VLVideoProcessorTorch,
    vision_defaults=VISION_DEFAULTS,
    chat_template_package=__package__,
    # merged tokens for the placeholders + one DeepStack feature list per tapped ViT block (its own merger each),
    # added to the hidden states of the first LM layers
    vision_outputs=("pooler_output", "deepstack_features"),
)
