"""Resume refuses a changed model (exit 2 naming the key and both values, no traceback) and resumes an unchanged
one: through the real CLI entry point (in-process, so each refusal costs no interpreter start-up) on a LoRA and a
full fine-tuning run folder of the tiny Qwen2.5-VL."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgsigma_train.cli import main as cli_main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("resume_data")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "ok.png")
    rows = [json.dumps({"id": f"r{i}", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>Which phase is this?"}, {"from": "gpt", "value": "Preparation."}]})
        for i in range(8)]
    (root / "d.jsonl").write_text("\n".join(rows) + "\n")
    return [f"data.train.0.path={root / 'd.jsonl'}", "data.eval=[]", "train.warmup_steps=0",
            "train.micro_batch_size=2", "train.progress_bar=false", "output.tensorboard=false"]


def train(capsys, *overrides: str) -> tuple[int, str, str]:
    code = cli_main(["train", RECIPE, *overrides])  # anything but a UserError would raise here: a traceback
    out = capsys.readouterr()
    return code, out.out, out.err


LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora_run")
    assert cli_main(["train", RECIPE, *data, *LORA, f"output.dir={run}", "train.max_steps=1"]) == 0
    return run


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full_run")
    assert cli_main(["train", RECIPE, *data, f"output.dir={run}", "train.max_steps=1"]) == 0
    return run


@pytest.mark.parametrize("override, key, saved, now", [
    ("model.family=qwen2_vl", "model.family", "'qwen2_5_vl'", "'qwen2_vl'"),
    ("lora.enabled=false", "lora.enabled", "True", "False"),
    ("lora.rank=8", "lora.rank", "4", "8"),
    ("lora.alpha=16", "lora.alpha", "8.0", "16.0"),
    ("lora.dora=true", "lora.dora", "False", "True"),
    ("lora.target_modules=[q_proj]", "lora.target_modules", "None", "['q_proj']"),
    ("train.freeze_vision=false", "train.freeze_vision", "True", "False"),
    ("train.freeze_projector=false", "train.freeze_projector", "True", "False"),
])
def test_lora_resume_refuses_changed_model(data, lora_run, capsys, override, key, saved, now):
    code, out, err = train(capsys, *data, *LORA, f"output.dir={lora_run}", "train.max_steps=2", override)
    assert code == 2, out[-2000:] + err[-2000:]
    assert f"{key}: {saved} in the checkpoint, {now} now" in err, err
    assert "Traceback" not in err and "resuming from" not in out
    assert not (lora_run / "checkpoints" / "step-2").exists()


@pytest.mark.parametrize("override, key", [
    ("lora.enabled=true", "lora.enabled"),
    ("train.freeze_language=true", "train.freeze_language"),
    ("model.source=SOURCE", "model.source"),
])
def test_full_resume_refuses_changed_model(data, full_run, capsys, override, key):
    if "SOURCE" in override:  # another loadable source: the tiny processor saved to a local directory
        from surgsigma_train.config.loading import load_recipe
        from surgsigma_train.models.registry import get_family
        from surgsigma_train.training.run import build_processor

        source = full_run.parent / "other_source"
        build_processor(load_recipe(RECIPE), get_family("qwen2_5_vl")).save_pretrained(source)
        override = override.replace("SOURCE", str(source))
    code, out, err = train(capsys, *data, f"output.dir={full_run}", "train.max_steps=2", override)
    assert code == 2, out[-2000:] + err[-2000:]
    assert f"{key}: " in err and " in the checkpoint, " in err and "Traceback" not in err


def test_unchanged_model_resumes(data, lora_run, full_run, capsys):
    for run, extra in ((lora_run, LORA), (full_run, [])):
        code, out, err = train(capsys, *data, *extra, f"output.dir={run}", "train.max_steps=2",
                               "lora.dropout=0.1")  # dropout does not change the weights' shape: allowed
        assert code == 0, out[-2000:] + err[-2000:]
        assert "resuming from" in out and "step-1" in out
        assert (run / "checkpoints" / "step-2" / "COMMITTED").is_file()
