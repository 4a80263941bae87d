"""Recipe keys of distributed training: validation, DeepSpeed "auto" values, launcher environment."""

import json

import pytest

from surgsigma_train.config.schema import DistributedConfig
from surgsigma_train.config.loading import load_recipe
from surgsigma_train.distributed.engines import REPO_CONFIGS, deepspeed_config
from surgsigma_train.distributed.env import DistEnv, init_distributed
from surgsigma_train.errors import ConfigError

REPO = REPO_CONFIGS.parents[1]


def recipe(tmp_path, *overrides):
    return load_recipe(REPO / "recipes" / "demo.yaml", [f"output.dir={tmp_path}", *overrides])


def test_offload_keys_need_deepspeed():
    with pytest.raises(ValueError, match="offload_params needs backend deepspeed with zero_stage 3"):
        DistributedConfig(backend="deepspeed", zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs backend deepspeed"):
        DistributedConfig(backend="fsdp2", offload_optimizer=True)


@pytest.mark.parametrize("stage,offload,name", [(2, False, "zero2"), (3, False, "zero3"), (3, True, "zero3_offload")])
def test_deepspeed_auto_values_filled_from_recipe(tmp_path, stage, offload, name):
    flag = str(offload).lower()
    cfg = recipe(tmp_path, "distributed.backend=deepspeed", f"distributed.zero_stage={stage}",
                 f"distributed.offload_optimizer={flag}", f"distributed.offload_params={flag}",
                 "train.micro_batch_size=3", "train.grad_accum_steps=4", "train.max_grad_norm=0.5")
    config = deepspeed_config(cfg, DistEnv(world_size=2))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 4, 24, 0.5)
    assert config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in config["zero_optimization"]) == offload
    assert not any(v == "auto" for v in config.values())
    assert json.loads((REPO_CONFIGS / f"{name}.json").read_text())["zero_optimization"]["stage"] == stage


def test_deepspeed_config_contradicting_recipe_is_an_error(tmp_path):
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cfg = recipe(tmp_path, "distributed.backend=deepspeed", f"distributed.deepspeed_config={custom}")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 contradicts the recipe"):
        deepspeed_config(cfg, DistEnv())


def test_launcher_environment_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed.backend is none"):
        init_distributed(DistributedConfig())
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="needs a launcher"):
        init_distributed(DistributedConfig(backend="ddp"))
