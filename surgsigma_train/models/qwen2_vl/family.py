"""Qwen2-VL: ViT (patch 14, quick-GELU MLP fc1/fc2) -> 2x2 patch merger -> Qwen2 LM with mRoPE."""

from __future__ import annotations

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from surgsigma_train.models.family import (
    QWEN_LANGUAGE_MODEL_PREFIXES,
    QWEN_LM_LINEAR_LAYERS,
    TINY_LM,
    ModelFamily,
    VisionDefaults,
)
from surgsigma_train.models.qwen2_vl.processor import Qwen2VLProcessorTorch
from surgsigma_train.models.video_processor import Qwen2VLVideoProcessorTorch

VISION_DEFAULTS = VisionDefaults(
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=tuple(OPENAI_CLIP_MEAN),
    image_std=tuple(OPENAI_CLIP_STD),
)


def tiny_config() -> Qwen2VLConfig:
    """Random-weight Qwen2-VL with the real structure and tiny sizes (~10 M parameters, 9.7 M of them the vocab)."""
    return Qwen2VLConfig(
        text_config={
            **TINY_LM,
            # (t, h, w) rotary sections; must sum to head_dim / 2 = 8 (real 7B: [16, 24, 24] of 64)
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": TINY_LM["hidden_size"],  # merger output = LM width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": VISION_DEFAULTS.patch_size,
            "temporal_patch_size": VISION_DEFAULTS.temporal_patch_size,
            "spatial_merge_size": VISION_DEFAULTS.merge_size,
        },
        tie_word_embeddings=True,
    )


FAMILY = ModelFamily(
    name="qwen2_vl",
    model_class=Qwen2VLForConditionalGeneration,
    tiny_config=tiny_config,
    vision_tower_prefixes=("model.visual.patch_embed.", "model.visual.blocks."),
    projector_prefixes=("model.visual.merger.",),
    language_model_prefixes=QWEN_LANGUAGE_MODEL_PREFIXES,
    default_lora_targets=QWEN_LM_LINEAR_LAYERS,
    processor_class=Qwen2VLProcessorTorch,
    stock_processor_class_name="Qwen2VLProcessor",
    video_processor_class=Qwen2VLVideoProcessorTorch,
    vision_defaults=VISION_DEFAULTS,
    chat_template_package=__package__,
)
