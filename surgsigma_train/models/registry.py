"""Registry of model families: ``get_family("qwen2_5_vl")``."""

from __future__ import annotations

import importlib

from surgsigma_train.models.family import ModelFamily

# name -> module holding `FAMILY`; imported on first use so that listing families costs nothing.
_FAMILY_MODULES: dict[str, str] = {
    "qwen2_vl": "surgsigma_train.models.qwen2_vl.family",
    "qwen2_5_vl": "surgsigma_train.models.qwen2_5_vl.family",
    "qwen3_vl": "surgsigma_train.models.qwen3_vl.family",
}


def known_families() -> tuple[str, ...]:
    return tuple(_FAMILY_MODULES)


def get_family(name: str) -> ModelFamily:
    """The ``ModelFamily`` called ``name``; a ValueError lists the known ones."""
    try:
        module_name = _FAMILY_MODULES[name]
    except KeyError:
        raise ValueError(f"Unknown model family {name!r}; known families: {', '.join(known_families())}") from None
    family = importlib.import_module(module_name).FAMILY
    if family.name != name:
        raise RuntimeError(f"{module_name}.FAMILY is named {family.name!r}, registered as {name!r}")
    return family
