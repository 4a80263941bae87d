"""Same vision call graph on every rank: a zero-weight dummy vision pass for each media kind a micro-batch lacks.

The Qwen VL forward calls the vision tower once for the micro-batch's images and once for its videos, and skips
the call when there are none. Ranks that do not make the same calls do not issue the same collectives:

- ZeRO-3 all-gathers a module's parameters when the module runs (and again for its backward), so a rank that
  skips the tower skips those all-gathers while its peers wait in them: a hang, or mismatched buffers;
- FSDP2 reduce-scatters the gradients of the parameters that received one: a rank without vision gradients
  reduces a different set than its peers;
- DDP without `find_unused_parameters` errors on parameters that got no gradient.

So for every media kind the training set contains (its "slots", e.g. ("image", "video")), every micro-batch on
every rank calls the tower exactly once: with its real pixels, or with a dummy of one minimal grid
(1 x 2m x 2m patches, m = spatial merge size; the patch vector size from the family's vision config) whose
outputs are added to the input embeddings with weight zero. That happens inside the model's own forward, right
after the token embedding and so at the position of the real tower calls (embedding -> tower per slot ->
language model): the order of parameter gathers is the same on every rank, and the outputs reach the loss, so
the backward (DDP hooks, ZeRO-3 re-gathers, FSDP2 reduce-scatter) is the same too.

Zero weight: the embeddings get `+ 0.0 * sum(dummy outputs)`. For finite outputs that adds +-0.0, so the
embeddings, the logits and the loss are bit-identical, and every vision parameter's gradient from the dummy is
exactly 0 (added to whatever real gradient it has). The dummy runs whether the tower is frozen or not: ZeRO-3
gathers frozen parameters for a forward too; with nothing trainable in it the dummy has no backward, as a real
frozen tower has none. What differs from no call at all is the optimizer: a trainable vision parameter gets a
zero gradient instead of None, as under any data-parallel all-reduce, so AdamW's weight decay and momentum go on
for it on steps without media. A training set with no media at all has no slots: nothing runs, nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from surgsigma_train.errors import InternalError
from surgsigma_train.models.family import ModelFamily

# media kind -> the forward argument that carries its pixels (the model calls the tower when it is not None)
PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}


def media_slots(samples: Iterable[Any]) -> tuple[str, ...]:
    """The media kinds ("image", "video", in this order) that occur in `samples` (objects with `.media` refs)."""
    kinds = {ref.kind for sample in samples for ref in sample.media}
    return tuple(kind for kind in PIXEL_KEYS if kind in kinds)


def dummy_vision_inputs(vision_config: Any, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [patches, C * T * P * P], grid_thw [1, 3]) of one minimal grid: 1 x 2m x 2m patches, i.e. 2 x 2
    merged tokens, from the config's in_channels, temporal_patch_size, patch_size and spatial_merge_size."""
    merge = vision_config.spatial_merge_size
    grid_thw = torch.tensor([[1, 2 * merge, 2 * merge]], dtype=torch.long, device=device)
    patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    pixels = torch.zeros(int(grid_thw.prod()), patch_dim, dtype=dtype, device=device)
    return pixels, grid_thw


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the modules are shared with any DDP/FSDP2/DeepSpeed wrapper)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class VisionCallGraph:
    """Makes every forward call the vision tower once per slot; `with vcg.complete(inputs): model(**inputs)`.

    `model` is the unwrapped model (transformers or PEFT); the forward may go through any engine wrapper, since
    the hook sits on a module the wrapper shares."""

    def __init__(self, model: nn.Module, family: ModelFamily, slots: Iterable[str]):
        self.slots = tuple(slots)
        unknown = set(self.slots) - set(PIXEL_KEYS)
        if unknown:
            raise ValueError(f"unknown media slots {sorted(unknown)}; known: {list(PIXEL_KEYS)}")
        hf = _hf_model(model)
        self.tower: nn.Module = attrgetter(family.vision_module)(hf)
        self.embeddings: nn.Module = hf.get_input_embeddings()
        self.outputs = family.vision_outputs
        self.family_name = family.name

    def missing(self, inputs: dict[str, Any]) -> list[str]:
        """The slots this micro-batch leaves empty (the model's forward would skip the tower for them)."""
        return [slot for slot in self.slots if inputs.get(PIXEL_KEYS[slot]) is None]

    def zero_weight_term(self, device: torch.device) -> torch.Tensor:
        """One dummy tower call; 0.0 * the sum of every output that feeds the language model (a scalar)."""
        pixels, grid_thw = dummy_vision_inputs(self.tower.config, device=device, dtype=self.tower.dtype)
        out = self.tower(pixels, grid_thw=grid_thw, return_dict=True)
        total = pixels.new_zeros((), dtype=torch.float32)
        for name in self.outputs:
            value = getattr(out, name, None)
            tensors = [value] if isinstance(value, torch.Tensor) else list(value or ())
            if not tensors:  # e.g. a transformers change that moved the DeepStack features: never skip silently
                raise InternalError(f"{self.family_name}: the vision tower returned no {name!r} for the dummy pass")
            for tensor in tensors:
                total = total + tensor.float().sum()
        return total * 0.0

    @contextmanager
    def complete(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Around one forward: after the token embedding, one dummy tower call per missing slot."""
        missing = self.missing(inputs)
        if not missing:
            yield
            return
        calls = 0

        def add_dummies(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls > 1:  # the embedding called again within the forward: the dummies are in already
                return output
            term = sum(self.zero_weight_term(output.device) for _ in missing)
            return output + term.to(output.dtype)

        handle = self.embeddings.register_forward_hook(add_dummies)
        try:
            yield
        finally:
            handle.remove()
        if calls == 0:
            raise InternalError(f"{self.family_name}: the forward never ran the token embedding, so the dummy "
                                f"vision pass for {missing} did not run (inputs_embeds passed?)")
