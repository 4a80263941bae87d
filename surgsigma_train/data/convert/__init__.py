"""Converters: public surgical data sets' own label files -> SurgΣ-DB release-layout JSON.

`convert_dataset("cholec80" | "cholect50" | "endoscapes", input_dir, out_file, ...)` writes a document
that `surgsigma_train.data.readers` loads like the release (video, image and `annos` tables; task ids
from `config.schema.DEFAULT_TASK_IDS`; answers phrased as in `data.demo`). Rows that cannot be used
are returned with file, line/record and reason; nothing usable at all is a `DataError` (exit code 3).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from surgsigma_train.data.convert import cholec80, cholect50, endoscapes
from surgsigma_train.data.convert.common import ReleaseBuilder, parse_video_selection, write_release
from surgsigma_train.data.readers import BadRecord
from surgsigma_train.errors import ConfigError, DataError

CONVERTERS: dict[str, tuple[Any, Callable[..., None]]] = {
    "cholec80": (cholec80, cholec80.convert),
    "cholect50": (cholect50, cholect50.convert),
    "endoscapes": (endoscapes, endoscapes.convert),
}

__all__ = ["CONVERTERS", "convert_dataset", "parse_video_selection", "write_release"]


def convert_dataset(name: str, input_dir: Path, out_file: Path, *, videos: set[int] | None = None,
                    **options: Any) -> tuple[dict[str, Any], list[BadRecord]]:
    """Convert and write; returns (summary, unusable rows). `options` are the converter's own keywords
    (frame_pattern, video_pattern; fps for Cholec80; split, include_interpolated for Endoscapes)."""
    if name not in CONVERTERS:
        raise ConfigError(f"unknown data set {name!r} (known: {', '.join(CONVERTERS)})")
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: not a directory")
    module, convert = CONVERTERS[name]
    options = {key: value for key, value in options.items() if value is not None}  # None: the converter's default
    if unsupported := sorted(set(options) - set(inspect.signature(convert).parameters)):
        raise ConfigError(f"{name}: option(s) {', '.join('--' + o.replace('_', '-') for o in unsupported)} "
                          f"do not apply to this data set")
    builder = ReleaseBuilder(module.DATASET, module.SOURCE_URL)
    convert(input_dir, builder, videos=videos, **options)
    write_release(builder.release(), Path(out_file))
    return {"out": str(out_file), **builder.summary()}, builder.bad
