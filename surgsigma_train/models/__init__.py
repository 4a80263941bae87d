"""Model families (one folder each), the offline Qwen tokenizer and torchvision-free vision preprocessing."""

from surgsigma_train.models.family import ModelFamily, VisionDefaults
from surgsigma_train.models.registry import get_family, known_families
from surgsigma_train.models.tokenizer import load_qwen_tokenizer

__all__ = ["ModelFamily", "VisionDefaults", "get_family", "known_families", "load_qwen_tokenizer"]
