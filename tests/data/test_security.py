"""Security basics, one test (or pair: the code says so, and it behaves so) per item:
YAML is parsed with safe_load only; weights load from safetensors and other tensors with weights_only=True;
trust_remote_code is off unless the recipe sets it, and transformers gets exactly that value; media paths are
confined to the data root at train time, not only when records are read."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import surgsigma_train
from surgsigma_train.config.loading import load_recipe
from surgsigma_train.data.encode import DroppedSample, SampleEncoder
from surgsigma_train.data.loader import SFTDataset
from surgsigma_train.data.sample import MediaRef, Message, Sample
from surgsigma_train.errors import ConfigError
from surgsigma_train.models.registry import get_family
from surgsigma_train.training import checkpoint as ckpt
from surgsigma_train.training.run import build_processor, load_model_for_eval

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(surgsigma_train.__file__).parent


def _calls(name_test) -> list[tuple[Path, ast.Call]]:
    """Every call in the package's source whose dotted callee name satisfies ``name_test``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and name_test(ast.unparse(node.func)):
                found.append((path, node))
    return found


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------- YAML
def test_recipes_are_parsed_with_safe_load(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text((REPO / "recipes" / "demo.yaml").read_text()
                      + f"\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(REPO / "recipes" / "demo.yaml", [f"model.source=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
    unsafe = _calls(lambda name: name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                                          "yaml.unsafe_load_all", "yaml.full_load_all"})
    assert not unsafe, [f"{p}:{c.lineno}" for p, c in unsafe]


# ---------------------------------------------------------------- checkpoints
def test_torch_load_is_weights_only_everywhere():
    loads = _calls(lambda name: name == "torch.load" or name.endswith(".torch.load"))
    assert loads, "expected the checkpoint code to use torch.load"
    for path, call in loads:
        flags = {k.arg: k.value for k in call.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
            f"{path}:{call.lineno} calls torch.load without weights_only=True"


def test_a_pickled_payload_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "step-1"
    folder.mkdir()
    torch.save({"torch": torch.get_rng_state(), "x": Payload(marker)}, folder / ckpt.rng_file(0))
    (folder / "trainer_state.json").write_text("{}")
    (folder / ckpt.COMMIT_MARKER).write_text("step 1\n")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_trainer_state(folder, rank=0)
    assert not marker.exists()


def test_model_weights_load_from_safetensors_only(tmp_path):
    marker = tmp_path / "pwned"
    family = get_family("qwen2_5_vl")
    folder = tmp_path / "pickled_model"
    family.tiny_config().save_pretrained(folder)
    torch.save({"weights": Payload(marker)}, folder / "pytorch_model.bin")  # the only weights: a pickle
    with pytest.raises(OSError, match="safetensors"):
        family.build_model(str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------- trust_remote_code
class _Stop(Exception):
    pass


@pytest.mark.parametrize("setting", [None, "false", "true"])
def test_trust_remote_code_is_what_the_recipe_says(setting, monkeypatch, tmp_path):
    import transformers

    overrides = [f"model.source={tmp_path / 'some-model'}", f"output.dir={tmp_path / 'run'}"]
    if setting is not None:
        overrides.append(f"model.trust_remote_code={setting}")
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", overrides)
    assert cfg.model.trust_remote_code is (setting == "true")  # off by default
    seen: dict[str, dict] = {}

    def recorder(what):
        def from_pretrained(*args, **kwargs):
            seen[what] = kwargs
            raise _Stop
        return from_pretrained

    family = get_family(cfg.model.family)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    monkeypatch.setattr(family.model_class, "from_pretrained", recorder("model"))
    with pytest.raises(_Stop):
        build_processor(cfg, family)
    with pytest.raises(_Stop):
        load_model_for_eval(cfg, family, None)
    assert seen["tokenizer"]["trust_remote_code"] is (setting == "true")
    assert seen["model"]["trust_remote_code"] is (setting == "true")
    assert seen["model"]["use_safetensors"] is True
    literal_true = [(p, c) for p, c in _calls(lambda name: True)
                    if any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in c.keywords)]
    assert not literal_true, [f"{p}:{c.lineno}" for p, c in literal_true]


# ---------------------------------------------------------------- media paths
def test_media_paths_are_confined_at_train_time(tmp_path):
    """Samples built directly (bypassing the readers' checks): the encoder itself refuses to leave the root."""
    root = tmp_path / "root"
    (root / "links").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "inside.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "secret.png")
    (root / "links" / "escape.png").symlink_to(tmp_path / "secret.png")
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", [f"output.dir={tmp_path / 'run'}"])
    family = get_family(cfg.model.family)
    encoder = SampleEncoder(build_processor(cfg, family), family, cfg.data, cfg.video)

    def sample(path: str) -> Sample:
        return Sample(id=path, messages=(Message("user", "<image>\nPhase?"), Message("assistant", "Preparation")),
                      media=(MediaRef("image", path),), task="phase_recognition", media_root=str(root))

    paths = {"links/escape.png": "resolves outside the data root", "../secret.png": "resolves outside the data root",
             str(tmp_path / "secret.png"): "absolute media path", "inside.png": None}
    items = SFTDataset([sample(p) for p in paths], encoder)
    for i, (path, reason) in enumerate(paths.items()):
        got = items[i]
        if reason is None:
            assert not isinstance(got, DroppedSample), got
        else:
            assert isinstance(got, DroppedSample) and reason in got.reason, (path, got)
