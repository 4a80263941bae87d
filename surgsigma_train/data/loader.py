"""Dataset, resumable batch sampler and padding collation.

The sampler owns the data order: a permutation seeded by (seed, epoch), cut into micro-batches and
sharded by rank. Its position is restored in O(1) by starting the epoch at a batch index; nothing is
replayed. Samples that fail to encode come through as `DroppedSample`s (never replaced by another
sample) so the trainer can count them; collation keeps every sample's id, task and source video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from surgsigma_train.data.encode import IGNORE_INDEX, DroppedSample, EncodedSample, EncodeError, SampleEncoder
from surgsigma_train.data.media import MediaError
from surgsigma_train.data.sample import Sample
from surgsigma_train.errors import InternalError


class SFTDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], encoder: SampleEncoder, prompt_only: bool = False):
        self.samples = samples
        self.encoder = encoder
        self.prompt_only = prompt_only

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Seeds per-epoch randomness of encoding (segment_random frame jitter); set before workers start."""
        self.encoder.epoch = epoch

    def __getitem__(self, index: int) -> EncodedSample | DroppedSample:
        sample = self.samples[index]
        try:
            if self.prompt_only:
                return self.encoder.encode_prompt(sample)
            return self.encoder.encode(sample)
        except (MediaError, EncodeError) as exc:
            # Deterministic rule: the sample is dropped (the batch shrinks), reported and counted.
            return DroppedSample(sample.id, sample.task, str(exc))
        except InternalError as exc:
            # a bug, not bad data: handed to the consumer, which stops the run with this message (raised here, in a
            # loader worker, it would reach the user wrapped in the worker's traceback)
            return DroppedSample(sample.id, sample.task, str(exc), fatal=True)


class ResumableBatchSampler(Sampler[list[int]]):
    """Micro-batches of a seeded per-epoch permutation, sharded across ranks, resumable mid-epoch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 epoch_order: Callable[[int], Sequence[int]] | None = None):
        """`epoch_order(epoch)`, when given (a data mixture), is the epoch's index list instead of a permutation
        of range(num_samples); it must be a pure function of the epoch and hold num_samples indices."""
        if num_samples < batch_size * world_size and drop_last:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size} x {world_size} ranks")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.epoch_order = epoch_order
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        global_batch = self.batch_size * self.world_size
        full = self.num_samples // global_batch
        return full if self.drop_last or self.num_samples % global_batch == 0 else full + 1

    def _order(self) -> Sequence[int]:
        if self.epoch_order is not None:
            order = self.epoch_order(self.epoch)
            if len(order) != self.num_samples:
                raise ValueError(f"epoch {self.epoch} has {len(order)} indices, expected {self.num_samples}")
            return order
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            chunk = order[b * global_batch:(b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine):
                yield [int(i) for i in mine]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # what the model's forward takes
    ids: list[str]
    tasks: list[str]
    source_videos: list[str | None]
    dropped: list[DroppedSample] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)
    # Packed batches (data/packing.py): one row of several samples, no attention mask; seq_lens are the samples'
    # lengths in the row, in order. slot_tokens: the token slots this micro-batch occupies (packing: the bin
    # budget; padding: rows x padded length), the denominator of the packing efficiency.
    seq_lens: list[int] | None = None
    slot_tokens: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if not self.ids:
            return 0
        if "attention_mask" in self.inputs:
            return int(self.inputs["attention_mask"].sum())
        return int(sum(self.seq_lens)) if self.seq_lens is not None else int(self.inputs["input_ids"].numel())

    @property
    def num_visual_tokens(self) -> int:
        """Image and video tokens (mm_token_type_ids != 0; padding is 0)."""
        return int((self.inputs["mm_token_type_ids"] != 0).sum()) if self.ids else 0

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that carry loss after the model's one-position shift."""
        return int((self.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) if self.ids else 0


class PadCollator:
    """Pads a list of encoded samples into one batch (right padding for training, left for generation)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def _pad(self, rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : row.numel()] = row
            else:
                out[i, length - row.numel():] = row
        return out

    def __call__(self, items: list[EncodedSample | DroppedSample]) -> Batch:
        kept = [x for x in items if isinstance(x, EncodedSample)]
        dropped = [x for x in items if isinstance(x, DroppedSample)]
        batch = Batch({}, [x.id for x in kept], [x.task for x in kept], [x.source_video for x in kept],
                      dropped, [x.reference for x in kept])
        if not kept:
            return batch
        length = max(x.input_ids.numel() for x in kept)
        batch.slot_tokens = length * len(kept)
        inputs = {
            "input_ids": self._pad([x.input_ids for x in kept], self.pad_token_id, length),
            "attention_mask": self._pad([torch.ones_like(x.input_ids) for x in kept], 0, length),
            "labels": self._pad([x.labels for x in kept], IGNORE_INDEX, length),
            "mm_token_type_ids": self._pad([x.mm_token_type_ids for x in kept], 0, length),
        }
        for key in sorted({k for x in kept for k in x.vision}):
            parts = [x.vision[key] for x in kept if key in x.vision]
            # one part (micro-batch 1, the usual video case): no copy of tens of MB of patches
            inputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        batch.inputs = inputs
        return batch


def build_loader(dataset: SFTDataset, batch_sampler: Sampler | None, collator: PadCollator, num_workers: int,
                 batch_size: int | None = None) -> torch.utils.data.DataLoader:
    kwargs: dict[str, Any] = {"collate_fn": collator, "num_workers": num_workers}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=2)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
