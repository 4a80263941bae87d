"""`train` applies `validate`'s bad-data rule (data.max_bad_fraction) before the model is built: through the
real CLI on a small LLaVA-format data set where 3 of 15 records are bad (20 %)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
FAST = ["data.eval=[]", "train.max_steps=1", "train.warmup_steps=0", "train.micro_batch_size=2",
        "train.progress_bar=false", "output.tensorboard=false"]


def _record(i: int, image: str) -> str:
    return json.dumps({"id": f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>Which phase is this?"}, {"from": "gpt", "value": "Preparation."}]})


def write_data(root: Path, corrupt_image: bool = False) -> list[str]:
    """12 good records and a file of 3 bad ones (2 missing images, 1 malformed line): a data.train override.
    With corrupt_image, one good record's image is a broken PNG instead: reading cannot tell, only `validate`'s
    media check can."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "ok.png")
    (root / "broken.png").write_bytes((root / "ok.png").read_bytes()[:8] + b"not a PNG chunk stream" * 4)
    good = [_record(i, "broken.png" if corrupt_image and i == 0 else "ok.png") for i in range(12)]
    (root / "good.jsonl").write_text("\n".join(good) + "\n")
    (root / "bad.jsonl").write_text("\n".join([_record(100, "missing.png"), "{broken", _record(101, "gone.png")]) + "\n")
    files = [root / "good.jsonl"] + ([] if corrupt_image else [root / "bad.jsonl"])
    return ["data.train=[" + ", ".join(f"{{path: {f}}}" for f in files) + "]"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgsigma_train.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_refuses_above_max_bad_fraction_then_trains_when_raised(tmp_path):
    data = write_data(tmp_path / "data")
    run = tmp_path / "run"
    refused = cli("train", "recipes/demo.yaml", *data, f"output.dir={run}", *FAST)
    assert refused.returncode == 3, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    err = refused.stderr
    assert "3 of 15 records are bad (20.00%" in err and "data.max_bad_fraction 0.00%" in err
    assert "malformed JSON" in err and "missing.png" in err and "gone.png" in err  # the top reasons
    assert "parameters" not in refused.stdout, "the model must not be built"
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    logged = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in logged) == ["line 2", "r100", "r101"]

    # validate says the same about the same data
    validate = cli("validate", "recipes/demo.yaml", *data, "data.eval=[]", f"output.dir={tmp_path / 'v'}")
    assert validate.returncode == 3 and "3 bad (20.00%" in validate.stdout

    trained = cli("train", "recipes/demo.yaml", *data, f"output.dir={run}", *FAST, "data.max_bad_fraction=0.25")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "bad records: 3 of 15 (20.00%), within data.max_bad_fraction 25.00%" in trained.stdout
    assert (run / "checkpoints" / "step-1" / "COMMITTED").is_file()


def test_train_uses_a_fresh_preflight_of_the_same_data(tmp_path):
    """A broken image passes reading (the file exists); `validate` decodes it and writes preflight/: `train` in
    that run folder then applies the preflight's count. A preflight older than the data is ignored."""
    data = write_data(tmp_path / "data", corrupt_image=True)
    run = tmp_path / "run"
    validate = cli("validate", "recipes/demo.yaml", *data, "data.eval=[]", f"output.dir={run}")
    assert validate.returncode == 3, validate.stdout[-2000:]
    refused = cli("train", "recipes/demo.yaml", *data, f"output.dir={run}", *FAST)
    assert refused.returncode == 3, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "1 of 12 records are bad (8.33%, preflight" in refused.stderr and "r0" in refused.stderr
    assert "Traceback" not in refused.stderr and not (run / "checkpoints").exists()

    from surgsigma_train.config.loading import load_recipe
    from surgsigma_train.training.run import _preflight_counts, read_samples

    cfg = load_recipe(REPO / "recipes" / "demo.yaml", data + ["data.eval=[]", f"output.dir={run}"])
    _, reports = read_samples(cfg.data.train, cfg.data.task_ids)
    assert _preflight_counts(run, reports)[:2] == (12, 1)
    later = (run / "preflight" / "summary.json").stat().st_mtime + 10
    os.utime(tmp_path / "data" / "good.jsonl", (later, later))  # the data changed after validate ran
    assert _preflight_counts(run, reports) is None
