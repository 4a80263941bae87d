"""Media access: paths confined to the data root, and images via Pillow (videos: `data/video/`).

Errors become `MediaError`s naming the file, so a bad file is reported and dropped by the dataset
rather than crashing a run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# Pillow's own guard against decompression bombs stays on; this is its limit in pixels.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class MediaError(RuntimeError):
    """A media file is missing, outside the data root, or cannot be decoded."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resolve_media_path(root: Path, relative: str) -> Path:
    """The file `relative` names under `root`; refuses absolute paths and anything resolving outside it."""
    if not relative:
        raise MediaError(relative, "empty media path")
    if Path(relative).is_absolute():
        raise MediaError(relative, f"absolute media path; media paths must be relative to the data root {root}")
    root_resolved = root.resolve()
    candidate = (root_resolved / relative).resolve()  # resolves symlinks too
    if not candidate.is_relative_to(root_resolved):
        raise MediaError(relative, f"resolves outside the data root {root}")
    return candidate


def image_mode_problem(mode: str) -> str | None:
    """Why an image of this Pillow mode cannot be trained on, or None.

    More than 8 bits per channel (16-bit PNG "I;16", 32-bit "I", float "F"): `convert("RGB")` clips values
    above 255 instead of scaling them, so the model would silently see a washed-out image.
    """
    if mode in ("I", "F") or mode.startswith("I;16"):
        return (f"{mode} image with more than 8 bits per channel: converting it to RGB clips values above 255 "
                "(convert it to 8-bit first)")
    return None


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            if problem := image_mode_problem(img.mode):
                raise MediaError(path, problem)
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise MediaError(path, "file not found") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"cannot decode image ({exc})") from exc
