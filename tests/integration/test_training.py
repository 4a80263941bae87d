"""CPU integration: the real loop on a tiny random Qwen2.5-VL with the real tokenizer and real media."""

import json
from pathlib import Path

import pytest
import torch

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.data.encode import SampleEncoder
from surgsigma_train.data.loader import PadCollator
from surgsigma_train.training import checkpoint as ckpt
from surgsigma_train.training.run import load_model_for_eval, prepare_run
from surgsigma_train.training.trainer import Trainer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def recipe(demo_data: Path, run_dir: Path, *overrides: str):
    base = [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={run_dir}", "train.progress_bar=false", "train.log_every=1", "output.tensorboard=false",
            "train.warmup_steps=0"]
    return load_recipe(REPO / "recipes" / "demo.yaml", base + list(overrides))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_thirty_steps_loss_falls(demo_data, tmp_path):
    cfg = recipe(demo_data, tmp_path / "run", "train.max_steps=30", "train.warmup_steps=3", "train.lr=2e-3",
                 "output.tensorboard=true")
    state = Trainer(cfg).fit()
    assert state.step == 30 and state.skipped_steps == 0 and state.dropped_samples == 0
    curve = losses(tmp_path / "run")
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 2.0, (first, last)  # > 7x lower perplexity from a random start (ln V ~ 11.9)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "samples_per_s", "data_wait_s"):
        assert all(key in r for r in rows), key
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "checkpoints" / "step-30" / ckpt.COMMIT_MARKER).is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "run_info.json").is_file()


def _logits(model, batch):
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("dora", [False, True])
def test_lora_adapter_roundtrip_identical_logits(demo_data, tmp_path, dora):
    cfg = recipe(demo_data, tmp_path / "run", "lora.enabled=true", "lora.rank=4", f"lora.dora={str(dora).lower()}",
                 "train.max_steps=3", "train.lr=1e-2", "train.freeze_projector=false")
    trainer = Trainer(cfg)
    trainer.fit()
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("merger" in n for n in names)
    assert not any("lora_" in n and ".visual." in n for n in names), "LoRA must stay inside the language model"
    trainer.model.eval()
    batch = PadCollator(trainer.ctx.pad_token_id)(
        [trainer.encoder.encode(s) for s in trainer.ctx.train_samples[:3]])
    expected = _logits(trainer.model, batch)
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_model_for_eval(cfg, trainer.family, checkpoint).eval()
    assert torch.equal(_logits(reloaded, batch), expected)
    base = load_model_for_eval(cfg, trainer.family, None).eval()
    assert not torch.allclose(_logits(base, batch), expected), "the adapter changed nothing"


class Interrupted(Exception):
    pass


def fit_until_saved(cfg, monkeypatch, step: int) -> None:
    """Train `cfg` and die (like a killed job) right after the checkpoint of `step` is committed."""
    save = Trainer.save

    def save_then_die(self):
        path = save(self)
        if self.state.step == step:
            raise Interrupted
        return path

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_die)
        with pytest.raises(Interrupted):
            Trainer(cfg).fit()


def test_full_finetune_resume_continues_exactly(demo_data, tmp_path, monkeypatch):
    common = ["train.max_steps=6", "train.save_every=3", "train.grad_accum_steps=2", "train.micro_batch_size=2",
              "train.lr=1e-3"]
    Trainer(recipe(demo_data, tmp_path / "a", *common)).fit()
    reference = losses(tmp_path / "a")

    fit_until_saved(recipe(demo_data, tmp_path / "b", *common), monkeypatch, step=3)
    resumed = Trainer(recipe(demo_data, tmp_path / "b", *common))
    assert resumed.resume_from.name == "step-3" and resumed.state.step == 3
    resumed.fit()
    continued = losses(tmp_path / "b")
    assert [continued[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]  # bitwise on CPU


def test_resume_refuses_changed_data(demo_data, tmp_path):
    Trainer(recipe(demo_data, tmp_path / "r", "train.max_steps=1")).fit()
    with pytest.raises(RuntimeError, match="training data changed"):
        Trainer(recipe(demo_data, tmp_path / "r", "train.max_steps=2", "data.train.0.max_samples=20"))


def test_uncommitted_checkpoint_is_ignored_and_cleaned(demo_data, tmp_path):
    Trainer(recipe(demo_data, tmp_path / "r", "train.max_steps=2", "train.save_every=1")).fit()
    broken = tmp_path / "r" / "checkpoints" / "step-3.tmp"
    broken.mkdir()
    (broken / "optimizer.pt").write_bytes(b"half written")
    trainer = Trainer(recipe(demo_data, tmp_path / "r", "train.max_steps=3"))
    assert trainer.resume_from.name == "step-2" and not broken.exists()
