"""The model-family interface: everything the trainer needs to know about one VLM family.

One ``ModelFamily`` per folder (``models/<family>/family.py``), alike in shape: adding a family means copying a
folder and editing its constants. This module holds the dataclass and the building logic they share.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel

from surgsigma_train.models.image_processor import QwenImageProcessor
from surgsigma_train.models.tokenizer import load_qwen_tokenizer
from surgsigma_train.models.video_processor import QwenVideoProcessor

ParamGroup = Literal["vision", "projector", "language"]
VisionBackend = Literal["auto", "ours", "stock"]

TINY_SOURCE = "tiny"

# Wrappers insert these into parameter names; `param_group` looks through them so that it works on a model
# wrapped by PEFT (base_model.model.), DDP (module.), torch.compile (_orig_mod.), FSDP1 or activation
# checkpointing.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")
_WRAPPER_PREFIXES = ("base_model.model.", "module.")

# Preprocessing options of a published processor config that decide the pixel tensors. Frame sampling
# options (fps, num_frames, do_sample_frames, min/max_frames) are deliberately not taken over: our data layer
# samples frames itself.
_IMAGE_CONFIG_KEYS = (
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_rescale",
    "do_normalize",
    "do_resize",
    "resample",
    "do_convert_rgb",
)
_VIDEO_CONFIG_KEYS = _IMAGE_CONFIG_KEYS + ("cap_pixels_per_frame", "max_video_tokens")


@dataclass(frozen=True)
class VisionDefaults:
    """Family defaults for the vision preprocessing (used for ``"tiny"``; checkpoints bring their own)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


@dataclass(frozen=True)
class ModelFamily:
    """How to build, preprocess for, freeze and LoRA-adapt one model family.

    Parameter-name prefixes are as in ``model.named_parameters()`` of the ``*ForConditionalGeneration`` class of
    transformers >= 5 (the same names for the tiny configs and the published checkpoints).
    """

    name: str
    model_class: type[PreTrainedModel]
    tiny_config: Callable[[], PretrainedConfig]
    vision_tower_prefixes: tuple[str, ...]  # ViT blocks + patch/position embeddings (not the merger)
    projector_prefixes: tuple[str, ...]  # merger(s) projecting vision features into the LM
    language_model_prefixes: tuple[str, ...]  # LM blocks, embeddings, final norm, lm_head
    # Linear-layer names of the LM (peft suffix match). Some vision towers reuse these names (Qwen2.5-VL's
    # vision MLP has gate/up/down_proj), so pass `lora_target_modules()` to peft, which also pins the LM.
    default_lora_targets: tuple[str, ...]
    processor_class: type  # our subclass of the stock processor (accepts the torch-only image/video processors)
    stock_processor_class_name: str  # transformers' processor class
    video_processor_class: type[QwenVideoProcessor]
    vision_defaults: VisionDefaults
    chat_template_package: str = field(repr=False)  # package holding chat_template.jinja
    # The vision tower (attribute path from the *ForConditionalGeneration model; called once per media kind of a
    # micro-batch as `tower(pixels, grid_thw=...)`) and the fields of its output that feed the language model. The
    # zero-weight dummy vision pass (models/vision_call_graph.py) runs the tower and touches all of these fields, so
    # that every parameter a real image or video reaches is reached by the dummy too.
    vision_module: str = "model.visual"
    vision_outputs: tuple[str, ...] = ("pooler_output",)

    # ---- text ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        """Our Jinja chat template for this family (prefix-consistent; see the .jinja file)."""
        return resources.files(self.chat_template_package).joinpath("chat_template.jinja").read_text(encoding="utf-8")

    def build_tokenizer(self, source: str, *, trust_remote_code: bool = False) -> Any:
        """The family tokenizer with our chat template attached (offline conversion for ``"tiny"``)."""
        if source == TINY_SOURCE:
            tokenizer = load_qwen_tokenizer(self.name)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer.chat_template = self.chat_template
        return tokenizer

    # ---- processor -------------------------------------------------------------------------------------------
    def build_processor(
        self,
        source: str,
        *,
        image_min_pixels: int,
        image_max_pixels: int,
        video_min_pixels: int,
        video_max_pixels: int,
        vision_backend: VisionBackend = "auto",
        trust_remote_code: bool = False,
    ) -> Any:
        """Processor (tokenizer + image + video processors + our chat template) for ``source``.

        ``source``: ``"tiny"`` (offline tokenizer, family-default preprocessing) or a hub id / local directory
        (its tokenizer and its image/video preprocessing settings; a local directory works offline).
        Pixel bounds always come from the arguments (they are part of the run's preprocessing spec). For
        Qwen2/2.5-VL the video bounds are per frame, for Qwen3-VL over all frames of a clip (stock semantics).

        ``vision_backend``: ``"ours"`` = our torchvision-free image/video processors (identical tensors to the
        stock ones, on every machine); ``"stock"`` = transformers' torchvision processors (needs torchvision);
        ``"auto"`` = ``"ours"``, so that one code path, which our token-budget planning also uses, runs
        everywhere regardless of whether torchvision happens to be installed.
        """
        if vision_backend not in ("auto", "ours", "stock"):
            raise ValueError(f"vision_backend must be 'auto', 'ours' or 'stock', got {vision_backend!r}")
        tokenizer = self.build_tokenizer(source, trust_remote_code=trust_remote_code)
        image_options, video_options = self._preprocessing_options(source)
        image_options["size"] = {"shortest_edge": image_min_pixels, "longest_edge": image_max_pixels}
        video_options["size"] = {"shortest_edge": video_min_pixels, "longest_edge": video_max_pixels}

        if vision_backend == "stock":
            return self._build_stock_processor(tokenizer, image_options, video_options)
        image_processor = QwenImageProcessor(**image_options)
        video_processor = self.video_processor_class(**video_options)
        return self.processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=self.chat_template,
        )

    def _preprocessing_options(self, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if source == TINY_SOURCE:
            defaults = self.vision_defaults
            common = {
                "patch_size": defaults.patch_size,
                "temporal_patch_size": defaults.temporal_patch_size,
                "merge_size": defaults.merge_size,
                "image_mean": list(defaults.image_mean),
                "image_std": list(defaults.image_std),
            }
            return dict(common), dict(common)
        image_config, _ = QwenImageProcessor.get_image_processor_dict(source)
        try:
            video_config, _ = self.video_processor_class.get_video_processor_dict(source)
        except OSError:
            # Older checkpoints (e.g. Qwen2-VL) have no video config: the video processor used the image one.
            video_config = image_config
        image_options = {key: image_config[key] for key in _IMAGE_CONFIG_KEYS if image_config.get(key) is not None}
        video_options = {key: video_config[key] for key in _VIDEO_CONFIG_KEYS if video_config.get(key) is not None}
        return image_options, video_options

    def _build_stock_processor(
        self, tokenizer: Any, image_options: dict[str, Any], video_options: dict[str, Any]
    ) -> Any:
        if importlib.util.find_spec("torchvision") is None:
            raise RuntimeError(
                "vision_backend='stock' needs torchvision, which is not installed here; use 'ours' (identical "
                "tensors, no torchvision)"
            )
        import transformers

        image_processor = transformers.Qwen2VLImageProcessor(**image_options)
        stock_video_class = getattr(transformers, self.video_processor_class.stock_class_name)
        valid_video_keys = getattr(stock_video_class.valid_kwargs, "__annotations__", {})
        video_options = {key: value for key, value in video_options.items() if key in valid_video_keys or key == "size"}
        if "cap_pixels_per_frame" in valid_video_keys:
            # pin the behaviour of our processor (transformers plans to flip this default)
            video_options.setdefault("cap_pixels_per_frame", False)
        # Our data layer passes pre-sampled frames; stock Qwen3-VL would otherwise re-sample them at 2 fps.
        video_options["do_sample_frames"] = False
        video_processor = stock_video_class(**video_options)
        processor_class = getattr(transformers, self.stock_processor_class_name)
        return processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=self.chat_template,
        )

    # ---- model -----------------------------------------------------------------------------------------------
    def build_model(
        self,
        source: str,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> PreTrainedModel:
        """``"tiny"``: random weights from ``tiny_config()`` drawn from ``seed``; else ``from_pretrained``.

        The global torch RNG is left as it was (the draw happens in a forked RNG state).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if source == TINY_SOURCE:
                return self.model_class._from_config(
                    self.tiny_config(), dtype=dtype, attn_implementation=attn_implementation
                )
            # safetensors only: a pickled .bin checkpoint can run code when loaded
            return self.model_class.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )

    # ---- freezing / optimizer groups / LoRA ------------------------------------------------------------------
    def param_group(self, name: str) -> ParamGroup:
        """``"vision"``, ``"projector"`` or ``"language"`` for a parameter name; raises for anything else."""
        canonical = _strip_wrappers(name)
        matches = [
            group
            for group, prefixes in (
                ("vision", self.vision_tower_prefixes),
                ("projector", self.projector_prefixes),
                ("language", self.language_model_prefixes),
            )
            if canonical.startswith(prefixes)
        ]
        if len(matches) != 1:
            reason = "no" if not matches else f"several ({matches})"
            raise KeyError(f"{self.name}: parameter {name!r} matches {reason} parameter group")
        return matches[0]  # type: ignore[return-value]

    def lora_target_modules(self, targets: Sequence[str] | None = None) -> str:
        """peft ``target_modules`` regex: the given (default: ``default_lora_targets``) linears of the language
        model only."""
        names = "|".join(re.escape(target) for target in (targets or self.default_lora_targets))
        return rf"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def _strip_wrappers(name: str) -> str:
    name = _WRAPPER_SEGMENTS.sub(r"\1", name).replace("..", ".").lstrip(".")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


# Shared by all three families: the Qwen2-architecture LM in transformers >= 5 (`model.language_model.*`, plus
# an untied `lm_head` in the 7B checkpoints; tied in the tiny configs, so absent from named_parameters there).
QWEN_LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "lm_head.")
QWEN_LM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Tiny LM shared by the families. Sizes chosen so that a forward+backward on ~500 tokens with two images and a
# video stays well under a second on 2 CPU cores, while keeping the real structure (GQA, mRoPE, tied vocab).
TINY_VOCAB_SIZE = 151680  # >= 151669 (last Qwen3-VL added token + 1), multiple of 128
TINY_LM = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
