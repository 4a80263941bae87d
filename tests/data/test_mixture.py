"""Weighted mixtures (surgsigma_train.data.mixture) and their use by the resumable sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.config.schema import MixtureConfig
from surgsigma_train.data.loader import ResumableBatchSampler
from surgsigma_train.data.mixture import Mixture
from surgsigma_train.data.splits import SampleColumns
from surgsigma_train.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# (task, source, specialty, number of samples)
GROUPS = [("phase", "Cholec80", "Hepatobiliary", 40), ("phase", "M2CAI", "Hepatobiliary", 10),
          ("triplet", "CholecT50", "Hepatobiliary", 30), ("caption", "Web", "Urology", 20),
          ("action", "RARP", "Urology", 8)]


def columns() -> SampleColumns:
    rows = [(t, s, p, f"{s}/VID{i % 4}") for t, s, p, n in GROUPS for i in range(n)]
    order = np.random.default_rng(0).permutation(len(rows))  # groups interleaved, as in real files
    return SampleColumns(*(np.array([rows[i][k] for i in order], dtype=object) for k in range(4)))


WEIGHTS = MixtureConfig(task={"phase": 0.5, "caption": 0.0, "action": 2.5}, source={"M2CAI": 2.0},
                        specialty={"Urology": 1.0})


def test_weights_multiply_remove_up_and_downsample_exactly():
    cols = columns()
    mix = Mixture(cols, WEIGHTS, seed=7)
    # phase/Cholec80 0.5*40=20, phase/M2CAI 0.5*2*10=10 (all), triplet 30, caption 0, action 2.5*8=20
    expected = {"phase": 30, "triplet": 30, "caption": 0, "action": 20}
    assert mix.epoch_size == 80
    for epoch in range(4):
        idx = mix.epoch_indices(epoch)
        assert len(idx) == 80
        assert Counter(cols.task[idx]) == {k: v for k, v in expected.items() if v}
        assert Counter(cols.source[idx])["Cholec80"] == 20 and Counter(cols.source[idx])["M2CAI"] == 10
        per_sample = Counter(idx.tolist())
        action = np.flatnonzero(cols.task == "action")
        assert sorted(per_sample[i] for i in action) == [2] * 4 + [3] * 4  # 2 copies + a fresh half
        assert all(per_sample[i] == 1 for i in np.flatnonzero(cols.task == "triplet"))
        assert mix.realised(idx) == mix.realised()  # the report is what the draw gives, every epoch
    assert mix.realised()["task"]["phase"] == {"available": 50, "weight": 0.5, "count": 30, "share": 0.375}


def test_epoch_list_is_a_pure_function_of_seed_and_epoch():
    cols = columns()
    a, b = Mixture(cols, WEIGHTS, seed=7), Mixture(cols, WEIGHTS, seed=7)
    assert np.array_equal(a.epoch_indices(3), b.epoch_indices(3))
    assert not np.array_equal(a.epoch_indices(3), a.epoch_indices(4))  # reshuffled every epoch
    cholec = np.flatnonzero(cols.source == "Cholec80")
    drawn = [set(a.epoch_indices(e).tolist()) & set(cholec.tolist()) for e in range(2)]
    assert drawn[0] != drawn[1]  # the downsampled half is re-drawn each epoch
    assert not np.array_equal(a.epoch_indices(3), Mixture(cols, WEIGHTS, seed=8).epoch_indices(3))


def test_sampler_resumes_exactly_with_a_mixture():
    mix = Mixture(columns(), WEIGHTS, seed=1)
    full = ResumableBatchSampler(mix.epoch_size, 6, seed=1, epoch_order=mix.epoch_indices)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 13 and [i for b in batches for i in b] == mix.epoch_indices(2)[:78].tolist()
    resumed = ResumableBatchSampler(mix.epoch_size, 6, seed=1, epoch_order=Mixture(columns(), WEIGHTS, 1).epoch_indices)
    resumed.set_epoch(2, start_batch=9)
    assert list(resumed) == batches[9:]
    ranks = [ResumableBatchSampler(mix.epoch_size, 3, seed=1, rank=r, world_size=2, epoch_order=mix.epoch_indices)
             for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    interleaved = [i for pair in zip(*(list(r) for r in ranks)) for b in pair for i in b]
    assert interleaved == [i for b in batches for i in b]  # ranks split the same global order


def test_unknown_names_and_empty_mixtures_are_errors():
    with pytest.raises(ConfigError, match=r"data.mixture.task: 'phsae' .*did you mean 'phase'") as err:
        Mixture(columns(), MixtureConfig(task={"phsae": 2.0}, source={"Cholec80": 1.0}), seed=0)
    assert "Cholec80" not in str(err.value).split("present")[0]  # only the unknown name is reported
    with pytest.raises(ConfigError, match="data.mixture.specialty: 'Gynecology'"):
        Mixture(columns(), MixtureConfig(specialty={"Gynecology": 2.0}), seed=0)
    with pytest.raises(ConfigError, match="remove every training sample"):
        Mixture(columns(), MixtureConfig(specialty={"Hepatobiliary": 0, "Urology": 0}), seed=0)
    with pytest.raises(ValueError, match="mixture.task.phase: weight must be"):
        MixtureConfig(task={"phase": -1})


def test_run_prints_and_saves_the_realised_mixture(demo_data, tmp_path, capsys):
    from surgsigma_train.training.run import prepare_run

    base = [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={tmp_path}"]
    plain = prepare_run(load_recipe(REPO / "recipes" / "demo.yaml", base))
    ctx = prepare_run(load_recipe(REPO / "recipes" / "demo.yaml", base + [
        "data.mixture.task={phase_recognition: 2, action_recognition: 0}"]))
    out = capsys.readouterr().out
    assert "data mixture:" in out and "phase_recognition" in out
    saved = json.loads((tmp_path / "mixture.json").read_text())
    n_phase = sum(s.task == "phase_recognition" for s in ctx.train_samples)
    n_action = sum(s.task == "action_recognition" for s in ctx.train_samples)
    assert saved["epoch_size"] == len(ctx.train_samples) + n_phase - n_action
    assert saved["per_epoch"]["task"]["phase_recognition"]["count"] == 2 * n_phase
    assert saved["per_epoch"]["task"]["action_recognition"]["count"] == 0
    assert ctx.data_fingerprint != plain.data_fingerprint  # resuming under other weights is refused


@pytest.mark.integration
def test_training_with_a_mixture_resumes_exactly(demo_data, tmp_path, monkeypatch):
    from surgsigma_train.training.trainer import Trainer
    from tests.integration.test_training import fit_until_saved

    def recipe(run: str):
        return load_recipe(REPO / "recipes" / "demo.yaml", [
            f"data.train.0.path={demo_data / 'train.json'}", "data.eval=[]", f"output.dir={tmp_path / run}",
            "train.progress_bar=false", "output.tensorboard=false", "train.warmup_steps=0", "train.max_steps=4",
            "train.save_every=2", "train.micro_batch_size=2", "train.lr=1e-3",
            "data.mixture.task={phase_recognition: 0.5, action_recognition: 3, triplet_recognition: 0}"])

    def losses(run: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]

    reference = Trainer(recipe("a"))
    seen: list[str] = []
    original = reference.loader.collate_fn

    def spy(items):
        batch = original(items)
        seen.extend(batch.tasks)
        return batch

    reference.loader.collate_fn = spy
    reference.fit()
    assert len(seen) == 8 and "triplet_recognition" not in seen  # weight 0 removed the task
    fit_until_saved(recipe("b"), monkeypatch, step=2)
    Trainer(recipe("b")).fit()
    assert losses("b") == losses("a")  # bitwise on CPU
