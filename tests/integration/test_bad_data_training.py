"""A 2-worker training run over demo data mixed with the bad-input corpus completes, and every corpus sample that
reaches the loader and cannot be encoded is dropped, logged with its id and reason, and counted in metrics.jsonl."""

import json
from pathlib import Path

import pytest

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.data.preflight import run_preflight
from surgsigma_train.training.trainer import Trainer
from tests.data.bad_corpus import write_bad_corpus

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_run_over_bad_corpus_completes_and_counts_drops(demo_data, tmp_path):
    pytest.importorskip("av")
    corpus, cases = write_bad_corpus(tmp_path)
    reach_loader = [c for c in cases if c.stage in ("load", "preflight", "ok") and c.outcome != "excluded"]
    dropped_ids = {c.id for c in cases if c.stage == "load"}
    micro_batch = 4
    demo_samples = micro_batch * 8 - len(reach_loader) % micro_batch  # a whole number of batches in all
    total = demo_samples + len(reach_loader)
    assert total % micro_batch == 0
    steps = total // micro_batch  # exactly one epoch: every sample is drawn once
    overrides = [
        f"data.train.0.path={demo_data / 'train.json'}", f"data.train.0.max_samples={demo_samples}",
        "data.eval=[]", f"output.dir={tmp_path / 'run'}", "data.num_workers=2", f"train.micro_batch_size={micro_batch}",
        f"train.max_steps={steps}", "train.warmup_steps=0", "train.save_every=0", "train.progress_bar=false",
        "output.tensorboard=false", "train.log_every=1",
        "data.max_bad_fraction=1.0",  # the corpus is mostly bad on purpose: train must not refuse it up front
    ]
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", overrides)
    cfg.data.train.append(cfg.data.train[0].model_copy(update={"path": str(corpus), "max_samples": None}))

    trainer = Trainer(cfg)
    assert len(trainer.ctx.train_samples) == total
    state = trainer.fit()

    assert state.step == steps and state.dropped_samples == len(dropped_ids)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps and rows[-1]["dropped_samples"] == len(dropped_ids)
    assert sum(r["samples"] for r in rows) == total - len(dropped_ids)  # nothing replaced, nothing trained twice
    logged = [json.loads(line) for line in (tmp_path / "run" / "dropped_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in logged) == sorted(dropped_ids)
    assert all(r["reason"] for r in logged)

    # The preflight over the same recipe had named every one of them before the run.
    found = run_preflight(cfg, workers=2, write=False)
    assert dropped_ids <= {f.id for f in found.bad}
