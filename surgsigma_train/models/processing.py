"""What the per-family processor subclasses share: accepting our torchvision-free video processors.

``ProcessorMixin.__init__`` checks each sub-processor against a base class it looks up by name in the
``transformers`` namespace ("VideoProcessorMixin" in 5.23, "BaseVideoProcessor" in 5.17). Without
torchvision that name is missing (5.23) or a dummy class (5.17), so even a valid video processor is refused.
The subclasses accept our ``QwenVideoProcessor`` explicitly and leave every other check and all processing
(token expansion, ``mm_token_type_ids``, replacement offsets, timestamps) to the stock class.
"""

from __future__ import annotations

from typing import Any

from surgsigma_train.models.video_processor import QwenVideoProcessor


class TorchVisionFreeProcessorMixin:
    """Mix in before the stock processor class: ``class P(TorchVisionFreeProcessorMixin, Qwen2VLProcessor)``."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, QwenVideoProcessor):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()  # type: ignore[misc]
        # Name the stock class (the next one in the MRO), so an exported checkpoint loads with AutoProcessor.
        config["processor_class"] = self.stock_processor_class().__name__
        return config

    @classmethod
    def stock_processor_class(cls) -> type:
        for klass in cls.__mro__[1:]:
            if klass is not TorchVisionFreeProcessorMixin and klass.__module__.startswith("transformers."):
                return klass
        raise TypeError(f"{cls.__name__} does not derive from a transformers processor")
