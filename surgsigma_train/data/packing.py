"""Multimodal sequence packing: several encoded samples in ONE row (batch dim 1, no padding).

The contract with transformers (checked against 5.25.0, the locked version; ``tests/data/test_packing_positions.py``
fails if a future version changes any part of it):

1. Inputs. ``pack_encoded`` concatenates the samples' ``input_ids`` / ``labels`` / ``mm_token_type_ids`` into
   ``[1, T]`` rows (T = sum of the sample lengths) and the vision tensors in sample order (as ``PadCollator``),
   and passes NO ``attention_mask``.
2. Positions. ``packed_position_ids`` returns ``position_ids`` of shape ``[4, 1, T]``: row 0 is the text position
   (``0..len_i-1``, restarting at 0 for every sample), rows 1-3 are the (temporal, height, width) mRoPE ids, computed
   per sample by the model's own ``get_rope_index`` (the same function ``compute_3d_position_ids`` calls for an
   unpacked batch, so grids, ``second_per_grid_ts`` (Qwen2.5-VL) and Qwen3-VL's per-frame split with text
   timestamps come out exactly as for the sample alone) and concatenated.
3. What transformers does with them (``Qwen2VLTextModel`` / ``Qwen2_5_VLTextModel`` / ``Qwen3VLTextModel``
   ``.forward``): ``position_ids.ndim == 3 and position_ids.shape[0] == 4`` splits row 0 off as
   ``text_position_ids``; rows 1-3 go to the rotary embedding. ``create_causal_mask(..., position_ids=
   text_position_ids)`` -> ``_preprocess_mask_arguments`` calls ``find_packed_sequence_indices`` ONLY when
   ``attention_mask is None and cache is None`` (so ``use_cache=False``: a cache turns packing detection off);
   a new sequence starts wherever ``diff(text_position_ids) != 1``. The mask function becomes
   ``causal(text_pos[q] >= text_pos[kv]) AND same_sequence(q, kv)``: a block-diagonal causal mask (sdpa: a
   boolean ``[1, 1, T, T]`` mask, eager: the additive float equivalent, flex: a BlockMask). flash_attention_2
   gets no mask; the decoder layers pass ``text_position_ids`` down and ``_flash_attention_forward`` sees
   ``_is_packed_sequence(position_ids, batch_size=1)`` and runs ``flash_attn_varlen_func`` with ``cu_seqlens`` at
   the positions where the text row is 0.
   With only the 3 mRoPE rows (``[3, 1, T]``) ``text_position_ids`` is None: no packing detection, a plain causal
   mask over the whole row, i.e. every sample attends to the samples before it (a silent leak), and
   flash_attention_2 gets no position ids, i.e. one sequence of length T (the same leak).
4. Loss boundary. The next-token loss (``training.trainer.loss_positions`` and transformers' ``ForCausalLMLoss``)
   makes position ``p`` predict ``labels[p + 1]``. In a packed row the last token of sample i is followed by the
   first token of sample i+1, so the only cross-sample target is "last token of i predicts first token of
   i+1"; it is removed by setting the label of every sample's first token to IGNORE_INDEX. That loses nothing:
   unpacked, a sample's first label is never a target either (``labels[:, 1:]``), and every in-sample target
   ``labels[off + j + 1]`` (j < len - 1) is kept. (The last token of the last sample predicts nothing, as
   unpacked.) So the packed targets are exactly the union of the per-sample targets.

Cost per backend (T = sum s_i over a row of samples of lengths s_i): sdpa and eager with the block-diagonal
mask compute all T^2 scores and mask them (measured, CPU, 2 threads, one attention forward at 28/4 heads x 128 on
a row of 8 x 512 tokens: 12.5 s masked sdpa vs 1.8 s sdpa_varlen, identical outputs); flash_attention_2 varlen and
our ``sdpa_varlen`` (one SDPA call per sample, ``models/attention.py``) compute sum s_i^2. flex_attention would skip
fully masked blocks, but transformers 5.25 refuses it for the three Qwen-VL classes (a ConfigError here).
"""

from __future__ import annotations

from typing import Any

import torch

from surgsigma_train.data.encode import IGNORE_INDEX, EncodedSample

# Vision tensors concatenated in sample order (the order the model consumes them: image grids in the order of the
# image spans of the row, video grids in the order of the video spans; same keys as PadCollator).
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def pack_encoded(samples: list[EncodedSample], pad_token_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(model inputs of one packed row, per-sample lengths).

    ``input_ids`` / ``labels`` / ``mm_token_type_ids``: ``[1, T]``, T = sum of lengths, no padding and no
    ``attention_mask`` (its absence is what lets transformers build the per-sample mask from the position ids).
    The label of each sample's first token is IGNORE_INDEX, so that no sample's token is ever a target predicted
    from another sample (see the module docstring, item 4). ``pad_token_id`` is unused by the row itself (there
    is no padding); it is taken so that the packer and ``PadCollator`` share a signature and checked to be an int.
    """
    if not samples:
        raise ValueError("pack_encoded needs at least one sample")
    if not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    seq_lens = [int(s.input_ids.numel()) for s in samples]
    if min(seq_lens) < 1:
        raise ValueError("cannot pack an empty sample")
    labels = []
    for sample in samples:
        sample_labels = sample.labels.clone()
        sample_labels[0] = IGNORE_INDEX  # never a target: see item 4 of the module docstring
        labels.append(sample_labels)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.cat([s.input_ids for s in samples]).view(1, -1),
        "labels": torch.cat(labels).view(1, -1),
        "mm_token_type_ids": torch.cat([s.mm_token_type_ids for s in samples]).view(1, -1),
    }
    for key in VISION_KEYS:
        parts = [s.vision[key] for s in samples if key in s.vision]
        if parts:
            inputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    unknown = sorted({k for s in samples for k in s.vision} - set(VISION_KEYS))
    if unknown:
        raise ValueError(f"pack_encoded does not know how to concatenate vision tensors {unknown}")
    return inputs, seq_lens


def unwrap_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / FSDP1 / DeepSpeed / torch.compile wrappers (FSDP2's
    ``fully_shard`` keeps the class, so a sharded model is returned as is)."""
    from transformers import PreTrainedModel

    for _ in range(16):
        if isinstance(model, PreTrainedModel):
            return model
        if hasattr(model, "get_base_model"):  # peft.PeftModel -> LoraModel.model
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeedEngine
            model = model.module
        else:
            break
    raise TypeError(f"no transformers model found inside {type(model).__name__}")


def _rope_index_owner(model: torch.nn.Module) -> Any:
    hf_model = unwrap_hf_model(model)
    for candidate in (hf_model, getattr(hf_model, "model", None)):
        if candidate is not None and callable(getattr(candidate, "get_rope_index", None)):
            return candidate
    raise TypeError(f"{type(hf_model).__name__} has no get_rope_index (not an mRoPE model?)")


def _take_grids(grids: torch.Tensor | None, start: int, num_tokens: int, merge_area: int, what: str) -> int:
    """Index after the grids (from ``start``) whose merged token counts add up to ``num_tokens``."""
    end, taken = start, 0
    while taken < num_tokens:
        if grids is None or end >= grids.shape[0]:
            raise ValueError(f"{what}: the row has more {what} tokens than its grids account for")
        taken += int(grids[end].prod()) // merge_area
        end += 1
    if taken != num_tokens:
        raise ValueError(f"{what}: a sample's {num_tokens} tokens do not match whole grids ({taken})")
    return end


@torch.no_grad()
def packed_position_ids(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seq_lens: list[int]) -> torch.Tensor:
    """``[4, 1, T]`` position ids of a packed row: text row restarting at 0 per sample, then the per-sample mRoPE
    rows from the model's own ``get_rope_index`` (uses only the config; works on a wrapped or sharded model).

    Each sample's grids are found by counting its image / video tokens in ``mm_token_type_ids`` (a grid of
    ``t*h*w`` patches gives ``t*h*w / merge_size**2`` tokens), so no per-sample bookkeeping is needed beyond
    ``seq_lens``.
    """
    owner = _rope_index_owner(model)
    input_ids, token_types = inputs["input_ids"], inputs["mm_token_type_ids"]
    if input_ids.shape[0] != 1 or sum(seq_lens) != input_ids.shape[1]:
        raise ValueError(f"a packed row is [1, sum(seq_lens)={sum(seq_lens)}], got {list(input_ids.shape)}")
    merge_area = int(owner.config.vision_config.spatial_merge_size) ** 2
    image_grids, video_grids = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    seconds = inputs.get("second_per_grid_ts")
    rows, offset, next_image, next_video = [], 0, 0, 0
    for length in seq_lens:
        ids = input_ids[:, offset:offset + length]
        types = token_types[:, offset:offset + length]
        image_end = _take_grids(image_grids, next_image, int((types == 1).sum()), merge_area, "image")
        video_end = _take_grids(video_grids, next_video, int((types == 2).sum()), merge_area, "video")
        kwargs: dict[str, torch.Tensor] = {}
        if image_end > next_image:
            kwargs["image_grid_thw"] = image_grids[next_image:image_end]
        if video_end > next_video:
            kwargs["video_grid_thw"] = video_grids[next_video:video_end]
            if seconds is not None:
                kwargs["second_per_grid_ts"] = seconds[next_video:video_end]
        mrope, _ = owner.get_rope_index(ids, mm_token_type_ids=types, **kwargs)
        text = torch.arange(length, dtype=mrope.dtype, device=mrope.device).view(1, 1, length)
        rows.append(torch.cat([text, mrope], dim=0))
        offset, next_image, next_video = offset + length, image_end, video_end
    if image_grids is not None and next_image != image_grids.shape[0]:
        raise ValueError(f"{image_grids.shape[0] - next_image} image grids left over after the row's image tokens")
    if video_grids is not None and next_video != video_grids.shape[0]:
        raise ValueError(f"{video_grids.shape[0] - next_video} video grids left over after the row's video tokens")
    return torch.cat(rows, dim=2)


# ---- bin planning and sampling
# Which samples share a bin, decided from PLANNED lengths (tokenizer + media metadata, nothing decoded), per epoch,
# as a pure function of (seed, epoch): the packed sampler restarts any epoch at any micro-batch in O(1) (no
# replay), exactly like ResumableBatchSampler.
#
# Bin rule: best-fit decreasing (BFD) over the whole epoch: the epoch's samples sorted by planned length, longest
# first (ties: earlier in the epoch's order first), each into the open bin with the LEAST room that still holds
# it, else a new bin. BFD uses at most as many bins as first-fit decreasing's 11/9 OPT + 6/9 bound and is
# O(n log B) here (a sorted list of distinct room sizes, B <= pack_tokens). Bins are then shuffled (seed, epoch).
#
# Balancing: every global micro-batch hands one bin to each rank. Within windows of `balance_window` global
# micro-batches, the window's bins are sorted by visual tokens and dealt in consecutive groups of world_size, so
# the ranks of one micro-batch (and therefore of the whole optimizer step) get bins with similar vision-tower work;
# the window's micro-batches and each group's rank assignment are then shuffled (seed, epoch).

import hashlib  # noqa: E402 (this section's imports, below the row packer)
import json  # noqa: E402 (this section's imports, below the row packer)
import math  # noqa: E402 (this section's imports, below the row packer)
import os  # noqa: E402 (this section's imports, below the row packer)
from bisect import bisect_left, insort  # noqa: E402 (this section's imports, below the row packer)
from dataclasses import dataclass  # noqa: E402 (this section's imports, below the row packer)
from pathlib import Path  # noqa: E402 (this section's imports, below the row packer)
from typing import Callable, Iterator, NamedTuple, Sequence  # noqa: E402 (this section's imports, below the row packer)

import numpy as np  # noqa: E402 (this section's imports, below the row packer)
from torch.utils.data import Dataset, Sampler  # noqa: E402 (this section's imports, below the row packer)

from surgsigma_train.data.encode import DroppedSample, EncodeError  # noqa: E402 (this section's imports, below the row packer)
from surgsigma_train.data.media import MediaError  # noqa: E402 (this section's imports, below the row packer)
from surgsigma_train.data.video.planning import PlanningError  # noqa: E402 (this section's imports, below the row packer)
from surgsigma_train.errors import InternalError  # noqa: E402 (this section's imports, below the row packer)


@dataclass
class LengthTable:
    """Planned tokens per training sample (index into the run's train samples). A sample that cannot be planned
    (unreadable media, over data.max_seq_len) has length -1 and a reason."""

    lengths: np.ndarray  # int64 [N]
    visual: np.ndarray  # int64 [N], image/video tokens
    reasons: dict[int, str]
    seconds: float = 0.0  # what computing it cost (0 when read from the cache)
    cached: bool = False


class _PlanChunks(Dataset):
    """Chunks of samples to plan, so a DataLoader can spread planning over its workers."""

    def __init__(self, encoder: Any, samples: Sequence[Any], indices: np.ndarray, epoch: int, chunk: int):
        self.encoder, self.samples, self.indices, self.epoch, self.chunk = encoder, samples, indices, epoch, chunk

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.chunk)

    def __getitem__(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        from surgsigma_train.data.stats import planned_tokens

        idx = self.indices[c * self.chunk:(c + 1) * self.chunk]
        lengths, visual, reasons = np.full(len(idx), -1, np.int64), np.zeros(len(idx), np.int64), {}
        saved_epoch, self.encoder.epoch = self.encoder.epoch, self.epoch
        max_len = self.encoder.data_cfg.max_seq_len
        try:
            for k, i in enumerate(idx.tolist()):
                try:
                    total, vis = planned_tokens(self.encoder, self.samples[i])
                except (MediaError, EncodeError, PlanningError, OSError) as exc:
                    reasons[i] = f"cannot plan the sample: {exc}"
                    continue
                if total > max_len:  # what encoding would refuse, refused before anything is decoded
                    reasons[i] = (f"{total} planned tokens > data.max_seq_len {max_len} (not truncated: that would "
                                  "cut a media span or the answer)")
                    continue
                lengths[k], visual[k] = total, vis
        finally:
            self.encoder.epoch = saved_epoch
        return idx, lengths, visual, reasons


def _first(x: Any) -> Any:
    return x


def plan_lengths(encoder: Any, samples: Sequence[Any], epoch: int = 0, num_workers: int = 0,
                 indices: np.ndarray | None = None, chunk: int = 512) -> LengthTable:
    """Planned (total, visual) tokens of `samples[indices]` (default: all), in `num_workers` DataLoader workers."""
    import time

    import torch

    start = time.perf_counter()
    n = len(samples)
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    lengths, visual, reasons = np.full(n, -1, np.int64), np.zeros(n, np.int64), {}
    kwargs: dict[str, Any] = {"num_workers": num_workers}
    if num_workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    loader = torch.utils.data.DataLoader(_PlanChunks(encoder, samples, indices, epoch, chunk), batch_size=None,
                                         collate_fn=_first, **kwargs)
    for idx, got, vis, why in loader:
        lengths[idx], visual[idx] = got, vis
        reasons.update(why)
    return LengthTable(lengths, visual, reasons, seconds=time.perf_counter() - start)


def _save_table(path: Path, table: LengthTable, indices: np.ndarray | None = None) -> None:
    sel = slice(None) if indices is None else indices
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        np.savez(fh, lengths=table.lengths[sel], visual=table.visual[sel],
                 indices=np.arange(len(table.lengths)) if indices is None else indices,
                 reasons=np.array(json.dumps({str(k): v for k, v in table.reasons.items()})),
                 seconds=np.array(table.seconds))
    os.replace(tmp, path)  # readers never see half a file


def _load_into(path: Path, lengths: np.ndarray, visual: np.ndarray, reasons: dict[int, str]) -> float:
    with np.load(path, allow_pickle=False) as z:
        idx = z["indices"]
        lengths[idx], visual[idx] = z["lengths"], z["visual"]
        reasons.update({int(k): v for k, v in json.loads(str(z["reasons"])).items()})
        return float(z["seconds"])


def length_cache_key(cfg: Any, data_fingerprint: str, epoch_key: int) -> str:
    """What planned lengths depend on: the data (fingerprint), the family and its processor, every data/video
    setting that shapes the rendered text or the visual plan, the transformers version, and the epoch when frame
    selection is random per epoch. Over-inclusive on purpose: a stale cache would break packing, a miss costs one
    planning pass."""
    import transformers

    data = cfg.data.model_dump(mode="json", exclude={"num_workers", "packing", "pack_tokens", "pack_balance_window",
                                                      "max_bad_fraction", "max_dropped_fraction", "dropped_window"})
    blob = json.dumps({"fingerprint": data_fingerprint, "family": cfg.model.family, "source": cfg.model.source,
                       "data": data, "video": cfg.video.model_dump(mode="json"), "epoch": epoch_key,
                       "transformers": transformers.__version__, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def epoch_dependent_plan(cfg: Any) -> bool:
    """segment_random picks other frames every epoch; their times can change the timestamp text (Qwen3-VL), so the
    lengths are planned per epoch then. Otherwise one plan serves every epoch."""
    modes = [cfg.video.sampling.mode] + [s.video.mode for s in cfg.data.train if s.video is not None]
    return "segment_random" in modes


class LengthPlanner:
    """Planned lengths of the run's training samples, computed once per run (per epoch with segment_random) and
    cached in `cache_dir` keyed by the data fingerprint and the settings that shape lengths (`length_cache_key`).

    With several ranks each plans 1/world of the samples (in `num_workers` DataLoader workers) and they share the
    pieces through the run folder (which multi-node runs must have on a shared file system anyway)."""

    def __init__(self, cfg: Any, encoder: Any, samples: Sequence[Any], data_fingerprint: str, cache_dir: Path,
                 dist: Any = None, log: Callable[[str], None] = print):
        self.cfg, self.encoder, self.samples, self.fingerprint = cfg, encoder, samples, data_fingerprint
        self.cache_dir, self.dist, self.log = Path(cache_dir), dist, log
        self.per_epoch = epoch_dependent_plan(cfg)
        self._tables: dict[int, LengthTable] = {}

    def __call__(self, epoch: int) -> LengthTable:
        key_epoch = epoch if self.per_epoch else 0
        if key_epoch not in self._tables:
            self._tables = {k: v for k, v in self._tables.items() if k >= key_epoch - 1}  # bounded memory
            self._tables[key_epoch] = self._load_or_plan(key_epoch)
        return self._tables[key_epoch]

    def _load_or_plan(self, epoch: int) -> LengthTable:
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        key = length_cache_key(self.cfg, self.fingerprint, epoch)
        path = self.cache_dir / f"lengths-{key}.npz"
        n = len(self.samples)
        missing = float(not path.is_file())
        if self.dist is not None:  # every rank takes the same branch (a rank alone at a barrier would hang)
            (missing,) = self.dist.all_reduce([missing])
        lengths, visual, reasons = np.full(n, -1, np.int64), np.zeros(n, np.int64), {}
        if not missing:
            seconds = _load_into(path, lengths, visual, reasons)
            table = LengthTable(lengths, visual, reasons, seconds=seconds, cached=True)
            self.log(f"packing: planned lengths of {n} samples read from {path} (planning them took {seconds:.1f} s)")
            return table
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        mine = np.arange(rank, n, world, dtype=np.int64)
        part = plan_lengths(self.encoder, self.samples, epoch, self.cfg.data.num_workers, indices=mine)
        if world == 1:
            _save_table(path, part)
            table = part
        else:
            shard = self.cache_dir / f"lengths-{key}.rank{rank}of{world}.npz"
            _save_table(shard, part, mine)
            self.dist.barrier()
            seconds = 0.0
            for r in range(world):
                seconds = max(seconds, _load_into(self.cache_dir / f"lengths-{key}.rank{r}of{world}.npz",
                                                  lengths, visual, reasons))
            table = LengthTable(lengths, visual, reasons, seconds=seconds)
            self.dist.barrier()
            if rank == 0:
                _save_table(path, table)
                for r in range(world):
                    (self.cache_dir / f"lengths-{key}.rank{r}of{world}.npz").unlink(missing_ok=True)
        self.log(f"packing: planned lengths of {n} samples in {table.seconds:.1f} s "
                 f"({1e3 * table.seconds / max(len(mine), 1):.2f} ms a sample on each of {world} rank(s), "
                 f"{self.cfg.data.num_workers} workers); cached in {path}")
        return table


def best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of the items of `order`, each bin in epoch order) of at most `capacity` planned tokens.

    `order` holds sample indices (repeats allowed: a mixture may draw a sample twice); `lengths[i]` must lie in
    [1, capacity]. Deterministic: the result depends on `order` and `lengths` only."""
    order = np.asarray(order, dtype=np.int64)
    sizes = lengths[order]
    if len(sizes) and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"item sizes must lie in [1, {capacity}]")
    by_size = np.lexsort((np.arange(len(order)), -sizes))  # longest first; ties: earlier in the epoch first
    bins: list[list[int]] = []  # positions in `order`
    by_room: dict[int, list[int]] = {}  # room left -> open bins with exactly that room
    rooms: list[int] = []  # sorted distinct rooms of open bins
    for pos, size in zip(by_size.tolist(), sizes[by_size].tolist()):
        k = bisect_left(rooms, size)
        if k < len(rooms):  # the tightest bin it fits in
            room = rooms[k]
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                del rooms[k], by_room[room]
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(pos)
        left = room - size
        if left > 0:
            stack = by_room.get(left)
            if stack is None:
                by_room[left] = [b]
                insort(rooms, left)
            else:
                stack.append(b)
    return [[int(order[p]) for p in sorted(positions)] for positions in bins]


class Refused(NamedTuple):
    """A sample the packer cannot place (longer than a bin, unplannable): delivered as a DroppedSample with this
    reason, without being decoded, in the micro-batch it was attached to (so it is logged and counted)."""

    index: int
    reason: str


@dataclass
class EpochPlan:
    bins: list[list[int]]  # in global micro-batch order: bin p goes to micro-batch p // world on rank p % world
    refused: dict[int, list[Refused]]  # bin position -> refused samples delivered with it
    world_size: int
    capacity: int

    def __len__(self) -> int:
        """Global micro-batches of the epoch."""
        return len(self.bins) // self.world_size

    def micro_batch(self, b: int, rank: int) -> list[int | Refused]:
        p = b * self.world_size + rank
        return [*self.bins[p], *self.refused.get(p, ())]

    def efficiency(self, lengths: np.ndarray) -> float:
        """Real tokens / slot tokens (capacity per bin)."""
        real = sum(int(lengths[b].sum()) for b in self.bins if b)
        return real / (len(self.bins) * self.capacity) if self.bins else 0.0


def _split_to_multiple(bins: list[list[int]], world_size: int) -> list[list[int]]:
    """Every rank needs one bin per global micro-batch: split the fullest-in-samples bins (halves of a bin fit
    where the bin did) until the count is a multiple of world_size; failing that (every bin one sample), empty
    bins (that rank runs the zero-weight filler pass), never dropped samples."""
    bins = list(bins)
    while len(bins) % world_size:
        b = max(range(len(bins)), key=lambda i: (len(bins[i]), -i)) if bins else -1
        if b < 0 or len(bins[b]) < 2:
            bins.extend([] for _ in range(-len(bins) % world_size))
            break
        half = len(bins[b]) // 2
        bins[b], extra = bins[b][:half], bins[b][half:]
        bins.append(extra)
    return bins


def balance_ranks(bins: list[list[int]], visual: np.ndarray, world_size: int, window: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """Reorder bins (len a multiple of world_size) so the ranks of each global micro-batch get similar visual
    tokens: per window of `window` micro-batches, sort by visual tokens, deal consecutive groups of world_size,
    shuffle the groups and the rank order within each group. window=1 or one rank: unchanged."""
    if world_size == 1 or window <= 1:
        return bins
    load = np.array([int(visual[b].sum()) if b else 0 for b in bins], dtype=np.int64)
    groups = len(bins) // world_size
    out: list[list[int]] = []
    for first in range(0, groups, window):
        g = min(window, groups - first)
        positions = np.arange(first * world_size, (first + g) * world_size)
        rows = positions[np.argsort(-load[positions], kind="stable")].reshape(g, world_size)
        for row in rows[rng.permutation(g)]:
            out.extend(bins[p] for p in row[rng.permutation(world_size)])
    return out


def plan_epoch(order: Sequence[int], table: LengthTable, capacity: int, seed: int, epoch: int, world_size: int = 1,
               balance_window: int = 32) -> EpochPlan:
    """The epoch's bins in micro-batch order; a pure function of its arguments."""
    order = np.asarray(order, dtype=np.int64)
    sizes = table.lengths[order]
    fits = (sizes >= 1) & (sizes <= capacity)
    bins = best_fit_decreasing(order[fits], table.lengths, capacity)
    rng = np.random.default_rng([seed, epoch, 0x7061636B])  # its own stream ("pack"), not the mixture's
    bins = [bins[i] for i in rng.permutation(len(bins))]
    bins = _split_to_multiple(bins, world_size)
    bins = balance_ranks(bins, table.visual, world_size, balance_window, rng)
    refused: dict[int, list[Refused]] = {}
    skipped = order[~fits].tolist()
    for k, i in enumerate(skipped):  # spread over the epoch, so the drop-rate window sees them where they fall
        reason = table.reasons.get(i) or (f"{int(table.lengths[i])} planned tokens > data.pack_tokens {capacity} "
                                          "(not truncated: the sample does not fit one packed bin)")
        refused.setdefault((k * len(bins)) // len(skipped) if bins else 0, []).append(Refused(i, reason))
    if not bins and skipped:  # nothing packable: one global micro-batch of refusals, so they are still reported
        bins = [[] for _ in range(world_size)]
    return EpochPlan(bins, refused, world_size, capacity)


class PackedBatchSampler(Sampler[list]):
    """One bin (sample indices, plus Refused entries) per micro-batch per rank, resumable mid-epoch in O(1).

    `lengths(epoch)` gives the planned lengths (LengthPlanner); `epoch_order(epoch)` the epoch's sample list (a data
    mixture), else a (seed, epoch) permutation as ResumableBatchSampler draws it. `start_batch` counts global
    micro-batches, as the trainer's batch_in_epoch does."""

    def __init__(self, lengths: Callable[[int], LengthTable], num_samples: int, pack_tokens: int, seed: int,
                 rank: int = 0, world_size: int = 1, epoch_order: Callable[[int], Sequence[int]] | None = None,
                 balance_window: int = 32):
        self.lengths, self.num_samples, self.pack_tokens, self.seed = lengths, num_samples, pack_tokens, seed
        self.rank, self.world_size, self.epoch_order, self.balance_window = rank, world_size, epoch_order, balance_window
        self.epoch, self.start_batch = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> Sequence[int]:
        if self.epoch_order is not None:
            return self.epoch_order(epoch)
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen).numpy()

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_epoch(self.order(epoch), self.lengths(epoch), self.pack_tokens, self.seed, epoch,
                                            self.world_size, self.balance_window))
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self) -> Iterator[list]:
        plan = self.plan(self.epoch)
        for b in range(self.start_batch, len(plan)):
            yield plan.micro_batch(b, self.rank)


class PackedDataset(Dataset):
    """The training dataset, plus: a Refused entry becomes its DroppedSample without being decoded."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.samples, self.encoder = dataset.samples, dataset.encoder

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, key: int | Refused) -> Any:
        if isinstance(key, Refused):
            sample = self.samples[key.index]
            return DroppedSample(sample.id, sample.task, key.reason)
        return self.dataset[key]


class PackCollator:
    """A bin's encoded samples -> one packed row (``pack_encoded``) as a Batch with seq_lens and slot_tokens."""

    def __init__(self, pad_token_id: int, pack_tokens: int):
        self.pad_token_id, self.pack_tokens = pad_token_id, pack_tokens

    def __call__(self, items: list[Any]) -> Any:
        from surgsigma_train.data.loader import Batch

        kept = [x for x in items if isinstance(x, EncodedSample)]
        dropped = [x for x in items if isinstance(x, DroppedSample)]
        batch = Batch({}, [x.id for x in kept], [x.task for x in kept], [x.source_video for x in kept], dropped,
                      [x.reference for x in kept])
        if not kept:
            return batch
        inputs, seq_lens = pack_encoded(kept, self.pad_token_id)
        real = int(sum(seq_lens))
        if real > self.pack_tokens:  # the plan said they fit: planning and encoding disagree (a bug, not bad data)
            raise InternalError(
                f"packed bin of {real} tokens > data.pack_tokens {self.pack_tokens}: the planned lengths disagree "
                f"with the encoded ones ({', '.join(f'{x.id}={n}' for x, n in zip(kept, seq_lens))}); please report")
        batch.inputs, batch.seq_lens, batch.slot_tokens = inputs, [int(n) for n in seq_lens], self.pack_tokens
        return batch


def build_packed_data(cfg: Any, ctx: Any, encoder: Any, dist: Any) -> tuple[PackedBatchSampler, PackedDataset,
                                                                           PackCollator]:
    """What the trainer needs for data.packing: the packed sampler (over the mixture's epoch list when a mixture is
    active), the dataset that turns refusals into drops, and the collator. Lengths are planned lazily at the first
    epoch and cached in <run>/packing/."""
    from surgsigma_train.data.loader import SFTDataset

    t, d = cfg.train, cfg.data
    log = print if dist.is_main else (lambda _msg: None)
    planner = LengthPlanner(cfg, encoder, ctx.train_samples, ctx.data_fingerprint, ctx.run_dir / "packing", dist, log)
    mixture = ctx.mixture
    weighted = mixture is not None and mixture.active
    if d.max_seq_len > d.pack_tokens and dist.is_main:
        print(f"packing: data.max_seq_len {d.max_seq_len} > data.pack_tokens {d.pack_tokens}: samples planned "
              "longer than a bin are dropped; set max_seq_len <= pack_tokens to plan videos down instead")
    sampler = PackedBatchSampler(planner, mixture.epoch_size if weighted else len(ctx.train_samples), d.pack_tokens,
                                 t.seed, dist.rank, dist.world_size,
                                 epoch_order=mixture.epoch_indices if weighted else None,
                                 balance_window=d.pack_balance_window)
    return sampler, PackedDataset(SFTDataset(ctx.train_samples, encoder)), PackCollator(ctx.pad_token_id,
                                                                                        d.pack_tokens)
