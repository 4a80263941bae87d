"""The environment `make test` / `make demo` / CI build is the tested set: every package pinned in the lock is
installed at exactly its pinned version (`make test` sets SURGSIGMA_LOCK; `make test-latest` and `make test-pin`
do not, since they move versions on purpose)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from surgsigma_train.versions import KEY_PACKAGES, installed_version, key_versions

LOCK = os.environ.get("SURGSIGMA_LOCK")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"{path}: not an exact pin: {line!r}"
        pins[match[1]] = match[2]
    return pins


@pytest.mark.skipif(not LOCK, reason="not the locked environment (run through `make test`)")
def test_installed_versions_are_the_locked_ones():
    pins = read_lock(Path(LOCK))
    assert "transformers" in pins and "torch" not in pins  # torch comes from TORCH_SPEC
    wrong = {name: (pinned, installed_version(name)) for name, pinned in pins.items()
             if installed_version(name) != pinned}
    assert not wrong, f"installed versions differ from {LOCK} (pinned, installed): {wrong}"


def test_lock_file_pins_every_dependency_exactly():
    pins = read_lock(Path(__file__).resolve().parents[1] / "requirements" / "lock-cpu.txt")
    for name in ("transformers", "tokenizers", "peft", "accelerate", "datasets", "deepspeed", "av", "decord"):
        assert name in pins, f"{name} is not locked"


def test_key_versions_name_what_is_installed():
    versions = key_versions()
    assert list(versions) == list(KEY_PACKAGES)
    import transformers

    assert versions["transformers"] == transformers.__version__
    assert installed_version("surely-not-a-package-name") is None
