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
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from surgsigma_train.config.schema import DataConfig, VideoConfig
from surgsigma_train.data.boxes import BoxError, render_answer
from surgsigma_train.data.media import MediaError, load_image, resolve_media_path
from surgsigma_train.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MediaRef, Sample
from surgsigma_train.data.tasks import get_task
from surgsigma_train.data.video import FileIdentity, FrameCache, load_clip, probe, probe_in_subprocess, select_frames
from surgsigma_train.data.video.cache import Resize
from surgsigma_train.data.video.planning import (BudgetDecision, PlanningError, VideoPlan, VideoRequest,
                                                 count_text_tokens, fit_to_budget, plan_image,
                                                 video_metadata_for_clip)
from surgsigma_train.data.video.types import SamplingSpec, VideoClip, VideoMeta
from surgsigma_train.errors import InternalError
from surgsigma_train.models.family import ModelFamily
from surgsigma_train.versions import installed_version

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
    fatal: bool = False  # an InternalError: the consumer stops the run with `reason` instead of counting a drop


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
    def __init__(self, processor: Any, family: ModelFamily, data_cfg: DataConfig, video_cfg: VideoConfig,
                 seed: int = 0):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.data_cfg = data_cfg
        self.video_cfg = video_cfg
        self.seed = seed
        self.epoch = 0  # seeds segment_random frame jitter; set by the dataset each epoch
        self.cache = (FrameCache(video_cfg.cache_dir, max_bytes=int(video_cfg.cache_max_gb * 2**30))
                      if video_cfg.cache_dir else None)
        # Many samples share one source video (SurgΣ-DB: every clip and frame of a procedure): probe each file
        # once per worker, not once per sample. Keyed by file identity, so a changed file is probed again.
        self._metas: OrderedDict[FileIdentity, VideoMeta] = OrderedDict()

    # ------------------------------------------------------------ targets
    def use_reasoning(self, sample: Sample) -> bool:
        mode = self.data_cfg.reasoning
        if sample.thinking is None or mode == "plain":
            return False
        if mode == "reasoning":
            return True
        # mix: a stable per-sample choice, so the realised mixture is reproducible and resumable
        return _stable_fraction(self.seed, sample.id) < self.data_cfg.reasoning_ratio

    def answer_target(self, sample: Sample, text: str) -> str:
        """An assistant answer as the model learns it (and eval compares against): the boxes of localization
        tasks rewritten in the family's own convention (data.box_format=family); anything else verbatim."""
        task = get_task(sample.task)
        if self.data_cfg.box_format == "keep" or task is None or not task.answer_kind.startswith("boxes"):
            return text
        try:
            resized_hw = self.resized_image_hw(sample) if self.family.name == "qwen2_5_vl" else None
            return render_answer(text, self.family.name, resized_hw)
        except (BoxError, PlanningError, ValueError) as exc:
            raise EncodeError(f"cannot render the boxes for {self.family.name}: {exc}") from exc

    def resized_image_hw(self, sample: Sample) -> tuple[int, int]:
        """(height, width) the processor resizes the sample's single image to (Qwen2.5-VL boxes are its pixels)."""
        if [r.kind for r in sample.media] != ["image"]:
            raise EncodeError("pixel boxes need exactly one image in the sample, got "
                              f"{[r.kind for r in sample.media]}")
        path = resolve_media_path(Path(sample.media_root), sample.media[0].path)
        try:
            with Image.open(path) as img:  # header only: the size, without decoding the pixels
                width, height = img.size
        except FileNotFoundError as exc:
            raise MediaError(path, "file not found") from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise MediaError(path, f"cannot read image header ({exc})") from exc
        v = self.video_cfg
        plan = plan_image(height, width, self.family, self.processor, min_pixels=v.image_min_pixels,
                          max_pixels=v.image_max_pixels)
        return plan.resized_height, plan.resized_width

    def final_answer(self, sample: Sample) -> str:
        answer = self.answer_target(sample, sample.messages[-1].content)
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
            text = (self.final_answer(sample) if i == last
                    else self.answer_target(sample, msg.content) if msg.role == "assistant" else msg.content)
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
    def sampling_spec(self, sample: Sample, ref: MediaRef) -> SamplingSpec:
        """The run's frame sampling, the sample source's override, then the clip bounds of this reference."""
        sampling = sample.sampling if sample.sampling is not None else self.video_cfg.sampling.model_dump()
        return SamplingSpec(**sampling, start_s=ref.start_s, end_s=ref.end_s, observe_until_s=ref.observe_until_s)

    _MAX_PROBED_FILES = 4096

    def _probe(self, path: Path) -> VideoMeta:
        """The file's container metadata, probed once per file identity. With ``video.isolate`` the probe runs in
        the decoder child process like the decode, bounded by ``video.decode_timeout_s``: a probe that crashes or
        hangs raises ``DecoderCrashedError`` / ``DecoderTimeoutError`` (``VideoError``s naming the file), so it
        costs this sample only."""
        identity = FileIdentity.of(path)
        meta = self._metas.get(identity)
        if meta is None:
            if self.video_cfg.isolate:
                meta = probe_in_subprocess(path, timeout_s=self.video_cfg.decode_timeout_s,
                                           backend=self.video_cfg.backend)
            else:
                meta = probe(path, self.video_cfg.backend)
            self._metas[identity] = meta
            if len(self._metas) > self._MAX_PROBED_FILES:
                self._metas.popitem(last=False)
        else:
            self._metas.move_to_end(identity)
        return meta

    def plan_videos(self, sample: Sample, text: str, images: list[Any]) -> tuple[list[tuple[Path, SamplingSpec, VideoMeta]], BudgetDecision | None]:
        """Container metadata first: which frames and pixels each video gets so the sample fits the token budget.

        Nothing is decoded here. A sample that cannot fit even at the fewest frames and pixels is refused.
        """
        videos, requests = [], []
        for ref in sample.media:
            if ref.kind != "video":
                continue
            path = resolve_media_path(Path(sample.media_root), ref.path)
            spec = self.sampling_spec(sample, ref)
            meta = self._probe(path)
            chosen = select_frames(meta, spec, sample_key=sample.id, epoch=self.epoch)

            def fewer(n: int, meta: VideoMeta = meta, spec: SamplingSpec = spec) -> list[int]:
                return select_frames(meta, replace(spec, num_frames=n), sample_key=sample.id, epoch=self.epoch)

            videos.append((path, spec, meta))
            requests.append(VideoRequest.from_spec(meta, spec, chosen, timestamps=self.video_cfg.timestamps,
                                                   select=fewer))
        if not requests:
            return videos, None
        v = self.video_cfg
        try:
            other = count_text_tokens(text, self.processor) + sum(
                plan_image(img.height, img.width, self.family, self.processor, min_pixels=v.image_min_pixels,
                           max_pixels=v.image_max_pixels).num_tokens for img in images)
            decision = fit_to_budget(requests, self.family, self.processor, max_tokens=self.data_cfg.max_seq_len,
                                     other_tokens=other, min_pixels=v.video_min_pixels, max_pixels=v.video_max_pixels)
        except PlanningError as exc:
            raise EncodeError(f"cannot plan the visual tokens: {exc}") from exc
        if not decision.keep:
            raise EncodeError(decision.reason)
        return videos, decision

    def load_media(self, sample: Sample, text: str) -> tuple[list[Any], list[VideoClip], BudgetDecision | None]:
        root = Path(sample.media_root)
        images = [load_image(resolve_media_path(root, ref.path)) for ref in sample.media if ref.kind == "image"]
        videos, decision = self.plan_videos(sample, text, images)
        clips = [
            load_clip(path, spec, backend=self.video_cfg.backend, sample_key=sample.id, epoch=self.epoch,
                      cache=self.cache, isolate=self.video_cfg.isolate, timeout_s=self.video_cfg.decode_timeout_s,
                      frame_indices=plan.frame_indices, meta=meta, resize=self._cache_resize(plan))
            for (path, spec, meta), plan in zip(videos, decision.plans if decision else ())
        ]
        return images, clips, decision

    def _cache_resize(self, plan: VideoPlan) -> Resize | None:
        """With a frame cache: frames are resized to the planned size before they are cached (6x less disk at 720p,
        and a cache hit skips the resize too). The processor then leaves them as they are, so the patches are
        bit-identical to the uncached path; only where its resize rule maps the planned size to itself."""
        video_processor = getattr(self.processor, "video_processor", None)
        if self.cache is None or not hasattr(video_processor, "resize_frames_THWC"):
            return None
        size_hw = (plan.resized_height, plan.resized_width)
        if not video_processor.keeps_size(plan.num_frames, *size_hw, min_pixels=plan.min_pixels,
                                          max_pixels=plan.max_pixels):
            return None
        name = f"{type(video_processor).__name__}.resize_frames_THWC:{video_processor.resample}:v1"
        return Resize(size_hw, video_processor.resize_frames_THWC, name)

    def _process(self, text: str, images: list[Any], clips: list[VideoClip], decision: BudgetDecision | None,
                 sample: Sample) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if clips:
            starts = [ref.start_s for ref in sample.media if ref.kind == "video"]
            kwargs["videos"] = [c.frames_THWC for c in clips]
            kwargs["video_metadata"] = [video_metadata_for_clip(c, clip_start_s=start, timestamps=self.video_cfg.timestamps)
                                        for c, start in zip(clips, starts)]
            kwargs["videos_kwargs"] = {"size": {"shortest_edge": decision.min_pixels, "longest_edge": decision.max_pixels},
                                       "input_data_format": "channels_last"}
        return self.processor(
            text=[text], images=images or None, return_text_replacement_offsets=True,
            return_offsets_mapping=True, return_tensors="pt", **kwargs,
        )

    # ------------------------------------------------------------ encode
    def encode(self, sample: Sample) -> EncodedSample:
        """Training inputs for the whole conversation. Raises MediaError / EncodeError."""
        text, spans = self.render_with_spans(self.conversation(sample))
        images, clips, decision = self.load_media(sample, text)
        out = self._process(text, images, clips, decision, sample)
        input_ids = out["input_ids"][0]
        _check_plan(decision, input_ids.numel(), sample, self.family.name)
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

    def inspect(self, sample: Sample) -> dict[str, Any]:
        """What encoding one sample does: the training target, frames, times, sizes, planned vs actual tokens
        (`data inspect`). Raises what ``encode`` raises (MediaError / VideoError, EncodeError, PlanningError)."""
        text, spans = self.render_with_spans(self.conversation(sample))
        images, clips, decision = self.load_media(sample, text)
        out = self._process(text, images, clips, decision, sample)
        plans = decision.plans if decision else ()
        grids = out.get("video_grid_thw")
        image_grids = out.get("image_grid_thw")
        v = self.video_cfg
        image_plans = [plan_image(img.height, img.width, self.family, self.processor, min_pixels=v.image_min_pixels,
                                  max_pixels=v.image_max_pixels) for img in images]
        refs = [r for r in sample.media if r.kind == "image"]
        # Without videos there is no budget decision: the plan is the text's tokens plus each image's own.
        planned = (decision.total_tokens if decision else
                   count_text_tokens(text, self.processor) + sum(p.num_tokens for p in image_plans))
        return {
            "id": sample.id, "task": sample.task, "source_video": sample.source_video,
            # the final answer as trained on (boxes in the family's convention, <think>/<answer> with reasoning),
            # and every span of the rendered conversation that carries loss (end-of-turn tokens included)
            "target": self.final_answer(sample), "reasoning": self.use_reasoning(sample),
            "supervised_text": [text[a:b] for a, b in spans],
            "planned_tokens": planned,
            "actual_tokens": int(out["input_ids"].shape[1]), "max_seq_len": self.data_cfg.max_seq_len,
            "budget": decision.reason if decision else None,
            "videos": [{
                "path": c.path, "backend": c.backend, "frame_indices": list(c.frame_indices),
                "timestamps_s": [round(t, 6) for t in c.timestamps_s], "source_fps": c.source_fps,
                "source_num_frames": c.source_num_frames, "decoded_size_HW": list(c.frames_THWC.shape[1:3]),
                "resized_size_HW": [plan.resized_height, plan.resized_width], "grid_thw": list(plan.grid_thw),
                "processor_grid_thw": grids[i].tolist() if grids is not None else None,
                "planned_tokens": plan.num_tokens, "cache": c.extra.get("cache"), "notes": list(c.extra.get("notes", ())),
            } for i, (c, plan) in enumerate(zip(clips, plans))],
            "images": [{"path": ref.path, "size_HW": [img.height, img.width],
                        "resized_size_HW": [p.resized_height, p.resized_width], "grid_thw": list(p.grid_thw),
                        "processor_grid_thw": image_grids[i].tolist() if image_grids is not None else None,
                        "planned_tokens": p.num_tokens}
                       for i, (ref, img, p) in enumerate(zip(refs, images, image_plans))],
        }

    def encode_prompt(self, sample: Sample) -> EncodedSample:
        """Inputs for generation: everything before the final answer, plus the generation prompt."""
        text = self._render(self.conversation(sample, with_final_answer=False), True)
        images, clips, decision = self.load_media(sample, text)
        out = self._process(text, images, clips, decision, sample)
        input_ids = out["input_ids"][0]
        _check_plan(decision, input_ids.numel(), sample, self.family.name)
        return EncodedSample(
            id=sample.id, task=sample.task, source_video=sample.source_video, input_ids=input_ids,
            labels=torch.full_like(input_ids, IGNORE_INDEX), mm_token_type_ids=out["mm_token_type_ids"][0],
            vision=_vision_tensors(out), backends=tuple(c.backend for c in clips),
            reference=self.answer_target(sample, sample.messages[-1].content),  # rendered like training targets
        )


class PlanMismatch(InternalError):
    """The metadata-first plan disagrees with the processor: a bug (e.g. a transformers release that changed a
    family's token layout), never bad data. It stops the run: dropping the sample would silently drop every
    sample of its kind."""


def _check_plan(decision: BudgetDecision | None, actual: int, sample: Sample, family: str) -> None:
    if decision is not None and decision.total_tokens != actual:
        media = ", ".join(ref.path for ref in sample.media) or "no media"
        raise PlanMismatch(
            f"sample {sample.id!r} ({media}): planned {decision.total_tokens} tokens but the {family} processor "
            f"produced {actual} with transformers {installed_version('transformers')}. This is a bug in "
            "surgsigma_train's token planning, not in your data: please report it with this message."
        )


_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _vision_tensors(out: Any) -> dict[str, torch.Tensor]:
    vision = {}
    for key in _VISION_KEYS:
        if key in out and out[key] is not None:
            value = out[key]
            vision[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return vision
