"""CPU integration: packed training (data.packing) on the tiny Qwen2.5-VL with the real demo data."""

import json

import pytest

from surgsigma_train.data.packing import LengthPlanner
from surgsigma_train.data.stats import planned_tokens
from surgsigma_train.training.trainer import Trainer
from tests.integration.test_training import fit_until_saved, losses, recipe

pytestmark = pytest.mark.integration
PACKED = ["data.packing=true", "data.pack_tokens=1024", "train.micro_batch_size=1", "train.lr=1e-3"]


def test_planned_tokens_are_the_encoded_ones(demo_data, tmp_path):
    """The packer bins on planned (total, visual) tokens: they must be what encoding produces."""
    trainer = Trainer(recipe(demo_data, tmp_path / "run", *PACKED, "train.max_steps=1"))
    samples = trainer.ctx.train_samples
    kinds = {}
    for s in samples:  # text-free kinds present in the demo: image(s), video
        kinds.setdefault(tuple(sorted({m.kind for m in s.media})), []).append(s)
    checked = [s for group in kinds.values() for s in group[:4]]
    assert {"video"} <= {k for key in kinds for k in key} and {"image"} <= {k for key in kinds for k in key}
    for s in checked:
        encoded = trainer.encoder.encode(s)
        assert planned_tokens(trainer.encoder, s) == (encoded.input_ids.numel(),
                                                      int((encoded.mm_token_type_ids != 0).sum())), s.id


def test_packed_run_resumes_exactly_and_logs_packing_metrics(demo_data, tmp_path, monkeypatch):
    common = [*PACKED, "train.max_steps=4", "train.save_every=2", "train.grad_accum_steps=2"]
    Trainer(recipe(demo_data, tmp_path / "a", *common)).fit()
    reference = losses(tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["samples"] > 2 * 2  # several samples per bin, 2 bins a step
        assert row["slot_tokens"] == 2 * 1024
        assert 0.5 < row["packing_efficiency"] <= 1.0 and row["packing_efficiency"] == row["tokens"] / 2048
        assert row["visual_tokens_per_s"] > 0 and row["text_tokens_per_s"] > 0
        assert row["visual_tokens_per_s"] + row["text_tokens_per_s"] == pytest.approx(row["tokens_per_s"])
    assert list((tmp_path / "a" / "packing").glob("lengths-*.npz"))

    fit_until_saved(recipe(demo_data, tmp_path / "b", *common), monkeypatch, step=2)
    resumed = Trainer(recipe(demo_data, tmp_path / "b", *common))
    assert resumed.resume_from.name == "step-2" and resumed.state.batch_in_epoch == 4
    table = resumed.sampler.lengths(resumed.state.epoch)
    assert table.cached  # planned once per run, read back on resume
    resumed.fit()
    continued = losses(tmp_path / "b")
    assert [continued[s] for s in range(1, 5)] == [reference[s] for s in range(1, 5)]  # bitwise on CPU


def test_samples_longer_than_a_bin_are_dropped_with_their_reason(demo_data, tmp_path):
    cfg = recipe(demo_data, tmp_path / "run", *PACKED, "data.pack_tokens=80", "data.max_dropped_fraction=1.0",
                 "train.max_steps=2")
    trainer = Trainer(cfg)
    table = LengthPlanner(cfg, trainer.encoder, trainer.ctx.train_samples, trainer.ctx.data_fingerprint,
                          tmp_path / "run" / "packing", log=lambda m: None)(0)
    assert (table.lengths > 80).any() and (table.lengths[table.lengths > 0] <= 80).any()
    state = trainer.fit()
    drops = [json.loads(line) for line in (tmp_path / "run" / "dropped_samples.jsonl").read_text().splitlines()]
    assert state.dropped_samples == len(drops) > 0
    assert all("planned tokens > data.pack_tokens 80" in d["reason"] for d in drops)
