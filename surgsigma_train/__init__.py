"""surgsigma_train: fine-tune vision-language models on SurgΣ-DB surgical conversations."""

__version__ = "0.1.0"
