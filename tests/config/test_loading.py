import subprocess
import sys
from pathlib import Path

import pytest

from surgsigma_train.config.loading import ConfigError, dump_recipe, load_recipe

RECIPE = """
model: {family: qwen2_5_vl}
data: {train: [{path: x.json}]}
output: {dir: runs/x}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_defaults_and_overrides(recipe):
    cfg = load_recipe(recipe, ["lora.enabled=true", "lora.rank=4", "train.lr=3e-4", "data.train.0.path=y.json"])
    assert cfg.lora.rank == 4 and cfg.train.lr == 3e-4 and cfg.data.train[0].path == "y.json"
    # mode-dependent defaults are resolved and visible in the saved config
    assert cfg.train.freeze_vision is True and cfg.train.freeze_projector is True
    assert load_recipe(recipe).train.freeze_vision is False
    assert "freeze_vision: false" in dump_recipe(load_recipe(recipe))


@pytest.mark.parametrize("override, expected", [
    ("lora.rnak=8", "unknown key 'lora.rnak' (did you mean 'lora.rank'?)"),
    ("train.max_step=8", "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ("data.train.0.pth=a", "unknown key 'data.train.0.pth' (did you mean 'data.train.0.path'?)"),
    ("modle.family=qwen2_vl", "unknown key 'modle'"),
    ("train.lr=abc", "train.lr"),
    ("model.family=llama", "model.family"),
    ("train.warmup_steps=1000", "warmup_steps"),
    ("lora.rank.x=1", "lora.rank"),
    ("nokeyvalue", "key.sub=value"),
])
def test_bad_overrides_name_the_key(recipe, override, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, [override])
    assert expected in str(info.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "train: {micro_batch: 2}\n")
    with pytest.raises(ConfigError, match="train.micro_batch' \\(did you mean 'train.micro_batch_size'"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "extra: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_cli_misspelled_key_exits_nonzero(recipe):
    proc = subprocess.run([sys.executable, "-m", "surgsigma_train.cli", "train", str(recipe), "lora.rnak=8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lora.rnak" in proc.stderr and "lora.rank" in proc.stderr
