"""The one internal sample type every reader produces and every later stage consumes.

A sample keeps its id, task and source video from the reader to the metrics, so that bad data,
per-task metrics and patient-level splits can always name what they are about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class MediaRef:
    """One image or video clip referenced by a sample.

    ``path`` is relative to the data root (readers never produce absolute paths that escape it).
    For videos, ``start_s``/``end_s`` select a clip in seconds of the file (``None`` = start/end of the
    file) and ``observe_until_s`` is a cutoff after which no frame is ever decoded (planning tasks:
    the model must not see the future it is asked about).
    """

    kind: Literal["image", "video"]
    path: str
    start_s: float | None = None
    end_s: float | None = None
    observe_until_s: float | None = None


@dataclass(frozen=True)
class Message:
    """One conversation turn.

    ``content`` is plain text in which the media of this turn are marked by the placeholders
    ``<image>`` and ``<video>``, in the order of ``Sample.media``.
    """

    role: Role
    content: str


IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


@dataclass(frozen=True)
class Sample:
    id: str
    messages: tuple[Message, ...]
    media: tuple[MediaRef, ...] = ()
    task: str = "unknown"
    specialty: str | None = None
    source: str | None = None  # source dataset, e.g. "Cholec80"
    source_video: str | None = None  # split key: samples of one patient video never cross splits
    media_root: str = ""  # folder the media paths are relative to
    thinking: str | None = None  # hierarchical reasoning for the (last) answer, when the record has it
    sampling: dict | None = field(default=None, compare=False, hash=False)  # the source's video sampling override
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def split_key(self) -> str:
        """The unit a train/held-out split must not cut through (the patient video)."""
        return self.source_video or self.id
