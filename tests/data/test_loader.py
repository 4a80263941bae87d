import torch

from surgsigma_train.data.encode import IGNORE_INDEX, DroppedSample, EncodedSample, extract_answer
from surgsigma_train.data.loader import PadCollator, ResumableBatchSampler


def _sample(sid, n, with_image=False):
    ids = torch.arange(1, n + 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-2:] = ids[-2:]
    vision = {"pixel_values": torch.ones(4, 6), "image_grid_thw": torch.tensor([[1, 2, 2]])} if with_image else {}
    return EncodedSample(sid, "t", f"vid{sid}", ids, labels, torch.zeros_like(ids), vision)


def test_sampler_resumes_exactly_and_shards():
    full = ResumableBatchSampler(20, 3, seed=1)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 6 and len({i for b in batches for i in b}) == 18
    resumed = ResumableBatchSampler(20, 3, seed=1)
    resumed.set_epoch(2, start_batch=4)
    assert list(resumed) == batches[4:]
    other_epoch = ResumableBatchSampler(20, 3, seed=1)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != batches
    ranks = [ResumableBatchSampler(20, 3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 3
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_collate_pads_and_keeps_meta():
    batch = PadCollator(pad_token_id=0)([_sample("a", 3, True), DroppedSample("x", "t", "bad file"), _sample("b", 5)])
    assert batch.ids == ["a", "b"] and batch.source_videos == ["vida", "vidb"]
    assert [d.id for d in batch.dropped] == ["x"]
    assert batch.inputs["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.inputs["attention_mask"].sum().item() == 8 == batch.num_tokens
    assert batch.inputs["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.num_loss_tokens == 4
    assert batch.inputs["pixel_values"].shape == (4, 6) and batch.inputs["image_grid_thw"].shape == (1, 3)
    left = PadCollator(pad_token_id=0, padding_side="left")([_sample("a", 3), _sample("b", 5)])
    assert left.inputs["input_ids"][0].tolist() == [0, 0, 1, 2, 3]
    empty = PadCollator(0)([DroppedSample("x", "t", "r")])
    assert empty.num_samples == 0 and empty.num_loss_tokens == 0


def test_extract_answer():
    assert extract_answer("<think> Level 1: a </think><answer> The phase is X. </answer>") == "The phase is X."
    assert extract_answer("<think>abc</think> plain") == "plain"
    assert extract_answer("no tags") == "no tags"
