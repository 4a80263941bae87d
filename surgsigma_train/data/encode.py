"""Sample -> model inputs: chat-template rendering, media loading, placeholder expansion, loss mask.

The loss mask is derived from the chat template itself, not from a hard-coded token pattern: the
assistant turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end
of `render(messages[:i+1])` (its end-of-turn token included, trailing newline not); a token overlapping a span is supervised. The processor
then expands media placeholders and reports where each replacement went, so those character spans
are mapped exactly onto the expanded text and from there onto tokens via the offset mapping.
Samples that do not fit are dropped with a reason; nothing is truncated inside a media span.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.video_utils import VideoMetadata

from surgsigma_train.config.schema import DataConfig, VideoConfig
from surgsigma_train.data.media import MediaError, VideoClip, load_image, load_video, resolve_media_path
from surgsigma_train.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample

IGNORE_INDEX = -100
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


class EncodeError(ValueError):
    """A sample that cannot be turned into model inputs (too long, template problem, ...)."""


@dataclass
class EncodedSample:
    id: str
    task: str
    source_video: str | None
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX outside the trained assistant spans
    mm_token_type_ids: torch.Tensor  # [L] long: 0 text, 1 image, 2 video
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    backends: tuple[str, ...] = ()  # video decoder used per clip, for the run record
    reference: str | None = None  # the expected answer (prompt-only encodings used by eval)


@dataclass(frozen=True)
class DroppedSample:
    """A sample the data pipeline could not use, with why; counted in metrics, never replaced."""

    id: str
    task: str
    reason: str


def extract_answer(text: str) -> str:
    """The scored part of a model output: the <answer> body if present, else the text minus <think>."""
    match = _ANSWER_RE.search(text)
    if match:
        return match.group(1).strip()
    return _THINK_RE.sub("", text).strip()


def _stable_fraction(*parts: Any) -> float:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SampleEncoder:
    def __init__(self, processor: Any, data_cfg: DataConfig, video_cfg: VideoConfig, seed: int = 0):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.data_cfg = data_cfg
        self.video_cfg = video_cfg
        self.seed = seed

    # ------------------------------------------------------------ targets
    def use_reasoning(self, sample: Sample) -> bool:
        mode = self.data_cfg.reasoning
        if sample.thinking is None or mode == "plain":
            return False
        if mode == "reasoning":
            return True
        # mix: a stable per-sample choice, so the realised mixture is reproducible and resumable
        return _stable_fraction(self.seed, sample.id) < self.data_cfg.reasoning_ratio

    def final_answer(self, sample: Sample) -> str:
        answer = sample.messages[-1].content
        if self.use_reasoning(sample):
            return f"<think> {sample.thinking.strip()} </think><answer> {answer.strip()} </answer>"
        return answer

    def conversation(self, sample: Sample, with_final_answer: bool = True) -> list[dict[str, Any]]:
        """Messages in the chat-template structure (content parts for media)."""
        conv: list[dict[str, Any]] = []
        if self.data_cfg.system_prompt and sample.messages[0].role != "system":
            conv.append({"role": "system", "content": [{"type": "text", "text": self.data_cfg.system_prompt}]})
        last = len(sample.messages) - 1
        for i, msg in enumerate(sample.messages):
            if i == last and not with_final_answer:
                break
            text = self.final_answer(sample) if i == last else msg.content
            parts = []
            for piece in _PLACEHOLDER_RE.split(text):
                if piece == IMAGE_PLACEHOLDER:
                    parts.append({"type": "image"})
                elif piece == VIDEO_PLACEHOLDER:
                    parts.append({"type": "video"})
                elif piece:
                    parts.append({"type": "text", "text": piece})
            conv.append({"role": msg.role, "content": parts})
        return conv

    def _render(self, conv: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation_prompt)

    def render_with_spans(self, conv: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans that carry loss."""
        full = self._render(conv, False)
        spans = []
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            before = self._render(conv[:i], True)
            through = self._render(conv[: i + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise EncodeError("the chat template is not prefix-consistent, so assistant spans cannot be located")
            start, end = len(before), len(through.rstrip())
            if not self.data_cfg.reasoning_loss:
                think = _THINK_RE.search(full, start, end)
                if think:
                    spans.append((start, think.start()))
                    start = think.end()
            spans.append((start, end))
        return full, spans

    # ------------------------------------------------------------ media
    def load_media(self, sample: Sample) -> tuple[list[Any], list[VideoClip]]:
        root = Path(sample.media_root)
        images, clips = [], []
        for ref in sample.media:
            path = resolve_media_path(root, ref.path)
            if ref.kind == "image":
                images.append(load_image(path))
            else:
                clips.append(load_video(path, ref, self.video_cfg.num_frames, self.video_cfg.backend))
        return images, clips

    def _process(self, text: str, images: list[Any], clips: list[VideoClip]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if clips:
            kwargs["videos"] = [c.frames_THWC for c in clips]
            kwargs["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=c.source_num_frames, fps=c.source_fps,
                    height=int(c.frames_THWC.shape[1]), width=int(c.frames_THWC.shape[2]),
                    duration=c.source_num_frames / c.source_fps, frames_indices=list(c.frame_indices),
                    video_backend=c.backend,
                )
                for c in clips
            ]
            kwargs["do_sample_frames"] = False
        return self.processor(
            text=[text], images=images or None, return_text_replacement_offsets=True,
            return_offsets_mapping=True, return_tensors="pt", **kwargs,
        )

    # ------------------------------------------------------------ encode
    def encode(self, sample: Sample) -> EncodedSample:
        """Training inputs for the whole conversation. Raises MediaError / EncodeError."""
        text, spans = self.render_with_spans(self.conversation(sample))
        images, clips = self.load_media(sample)
        out = self._process(text, images, clips)
        input_ids = out["input_ids"][0]
        if input_ids.numel() > self.data_cfg.max_seq_len:
            raise EncodeError(f"{input_ids.numel()} tokens > data.max_seq_len {self.data_cfg.max_seq_len} "
                              "(not truncated: that would cut a media span or the answer)")
        shifts = [(r["span"][1], len(r["replacement"]) - (r["span"][1] - r["span"][0]))
                  for r in out["text_replacement_offsets"][0]]

        def expanded(pos: int) -> int:
            return pos + sum(delta for end, delta in shifts if end <= pos)

        mapped = [(expanded(a), expanded(b)) for a, b in spans]
        # A token is supervised when it overlaps a supervised span at all: a token straddling a
        # boundary (e.g. `><` in `</think><answer>`) must be generated, so it must be learned.
        starts, ends = out["offset_mapping"][0][:, 0], out["offset_mapping"][0][:, 1]
        in_span = torch.zeros_like(input_ids, dtype=torch.bool)
        for a, b in mapped:
            in_span |= (starts < b) & (ends > a)
        labels = torch.where(in_span, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        if not in_span.any():
            raise EncodeError("no token carries loss (empty assistant answer after rendering)")
        return EncodedSample(
            id=sample.id, task=sample.task, source_video=sample.source_video, input_ids=input_ids,
            labels=labels, mm_token_type_ids=out["mm_token_type_ids"][0], vision=_vision_tensors(out),
            backends=tuple(c.backend for c in clips),
        )

    def encode_prompt(self, sample: Sample) -> EncodedSample:
        """Inputs for generation: everything before the final answer, plus the generation prompt."""
        text = self._render(self.conversation(sample, with_final_answer=False), True)
        images, clips = self.load_media(sample)
        out = self._process(text, images, clips)
        input_ids = out["input_ids"][0]
        return EncodedSample(
            id=sample.id, task=sample.task, source_video=sample.source_video, input_ids=input_ids,
            labels=torch.full_like(input_ids, IGNORE_INDEX), mm_token_type_ids=out["mm_token_type_ids"][0],
            vision=_vision_tensors(out), backends=tuple(c.backend for c in clips),
            reference=sample.messages[-1].content,
        )


_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _vision_tensors(out: Any) -> dict[str, torch.Tensor]:
    vision = {}
    for key in _VISION_KEYS:
        if key in out and out[key] is not None:
            value = out[key]
            vision[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return vision
