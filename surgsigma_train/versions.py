"""Versions of the packages whose behaviour the project depends on: printed by `make test` (so a CI log says what
was tested), recorded in every run folder (run_info.json), named in errors that may be version-specific.

``python -m surgsigma_train.versions`` prints them one a line.
"""

from __future__ import annotations

import importlib.metadata

# the libraries whose changes have moved our results before (transformers 5.25: Qwen3-VL video token layout)
KEY_PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "deepspeed", "flash-attn",
    "decord", "av", "torchcodec", "numpy", "pillow",
)


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def key_versions() -> dict[str, str | None]:
    return {package: installed_version(package) for package in KEY_PACKAGES}


def main() -> None:
    for package, version in key_versions().items():
        print(f"{package:<13} {version or 'not installed'}")


if __name__ == "__main__":
    main()
