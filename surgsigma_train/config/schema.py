"""The typed recipe schema. Every key a recipe may use is declared here; anything else is an error.

Relative paths in a recipe are resolved against the current working directory (where you launch),
like every other path you type on a command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FamilyName = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


class Strict(BaseModel):
    # extra="forbid" is what turns a misspelled key into an error instead of a silently ignored one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    family: FamilyName
    source: str = Field("tiny", description='"tiny" (random weights, offline) | hub id | local directory')
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention", "sdpa_varlen", "auto"] = Field(
        "sdpa", description="auto = flash_attention_2 (CUDA + flash_attn), else sdpa_varlen with data.packing, else "
        "sdpa; sdpa_varlen = SDPA per packed sample (see models/attention.py for what each backend costs)")
    trust_remote_code: bool = False
    vision_backend: Literal["auto", "ours", "stock"] = Field(
        "auto", description="ours = torchvision-free preprocessing; stock = transformers' (needs torchvision)"
    )
    gradient_checkpointing: bool = False


class DataSource(Strict):
    path: str
    format: Literal["auto", "surgsigma", "llava", "openai", "hf"] = Field(
        "auto", description="hf = a datasets-library dataset: save_to_disk folder, data folder or hub id "
        "(record layout then detected); auto also recognises local datasets folders")
    hf_split: str | None = Field(None, description="split of a datasets-library dataset (default: its only one)")
    check_media: bool = Field(
        True, description="look media up at read time: repair VIDn -> VID0n paths, records with missing media are bad")
    media_root: str | None = Field(None, description="root that media paths are relative to (default: the file's folder, or its raw_data/ if present)")
    max_samples: int | None = Field(None, ge=1, description="keep the first N samples (debugging)")
    video: VideoSampling | None = Field(None, description="frame sampling for this source (default: video.sampling)")


# Task ids as they appear in the data -> registry names. The released numbering is not published (SurgΣ,
# arXiv 2603.16822; localization appears as [1] in the v0.1 release), so this is a default a recipe can replace.
DEFAULT_TASK_IDS: dict[int, str] = {
    1: "instrument_localization",
    2: "instrument_recognition",
    3: "tissue_recognition",
    4: "tissue_localization",
    5: "phase_recognition",
    6: "step_recognition",
    7: "desmoking",
    8: "action_recognition",
    9: "triplet_recognition",
    10: "depth_estimation",
    11: "safety_assessment",
    12: "image_captioning",
    13: "video_captioning",
    14: "action_remaining_time",
    15: "next_action_planning",
    16: "instrument_segmentation",
    17: "next_frame_prediction",
    18: "conditional_video_generation",
}


class SplitConfig(Strict):
    """Held-out split of data.train by source video (patient); see data/splits.py."""

    by: Literal["video", "sample"] = Field(
        "video", description="video: whole source videos (patients) per side; sample: frame-level (leaks, warned)")
    eval_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of source videos held out (0 = lists only)")
    seed: int = 0
    stratify: bool = Field(True, description="hold out eval_ratio of the videos of each source dataset")
    train_videos: list[str] | None = Field(None, description="explicit training videos (split keys)")
    eval_videos: list[str] | None = Field(None, description="explicit held-out videos (split keys)")


class MixtureConfig(Strict):
    """Sampling weights; a sample's weight is the product of its task, source and specialty weights (default 1)."""

    task: dict[str, float] = {}
    source: dict[str, float] = {}
    specialty: dict[str, float] = {}

    @model_validator(mode="after")
    def _non_negative(self) -> "MixtureConfig":
        for axis in ("task", "source", "specialty"):
            for name, weight in getattr(self, axis).items():
                if not weight >= 0 or weight == float("inf"):
                    raise ValueError(f"mixture.{axis}.{name}: weight must be a finite number >= 0, got {weight}")
        return self


class DataConfig(Strict):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = []
    task_ids: dict[int, str] = Field(
        default_factory=lambda: dict(DEFAULT_TASK_IDS), description="data task id -> task name; a map given here "
        "replaces the default 18-id map whole (ids it does not list are unknown), as `data index --task-ids` does; "
        "an index source must have been built with the same map")
    reasoning: Literal["plain", "reasoning", "mix"] = Field(
        "plain", description="targets: plain answers, <think>..</think><answer>..</answer>, or a mix"
    )
    reasoning_ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of reasoning targets when reasoning=mix")
    reasoning_loss: bool = Field(True, description="whether tokens inside <think>..</think> carry loss")
    system_prompt: str | None = None
    max_seq_len: int = Field(
        4096, ge=16, description="token budget per sample: videos are planned down (frames, then pixels) to fit; "
        "a sample that still does not fit is dropped with a reason, never truncated")
    num_workers: int = Field(0, ge=0)
    max_bad_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="`validate` and `train` fail (exit 3) when more than this share of the records is bad")
    max_dropped_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="training stops (exit 3, with the top reasons) when more than this share of "
        "the samples it met was dropped (failed to load or encode), over the whole run or over the last "
        "`dropped_window` samples; judged once that many samples were met, and at the end. "
        "Default: data.max_bad_fraction")
    dropped_window: int = Field(
        200, ge=1, description="samples (trained plus dropped, all ranks) in the recent window of max_dropped_fraction")
    box_format: Literal["family", "keep"] = Field(
        "family", description="localization answers: boxes rewritten in the model family's own convention "
        "(Qwen2-VL tokens, Qwen2.5-VL resized-image pixels, Qwen3-VL 0-1000 JSON) or kept verbatim")
    split: SplitConfig | None = Field(
        None, description="carve a held-out set out of data.train by source video; it is added to data.eval")
    mixture: MixtureConfig = MixtureConfig()
    packing: bool = Field(
        False, description="pack samples into bins of at most pack_tokens tokens (one packed row per micro-batch, "
        "planned lengths, nothing decoded); train.micro_batch_size must then be 1 (a micro-batch IS one bin)")
    pack_tokens: int | None = Field(
        None, ge=16, description="token budget of a packed bin (needed with packing); a sample longer than this is "
        "dropped with its reason, never truncated. It may exceed max_seq_len (the per-sample budget); with "
        "max_seq_len <= pack_tokens videos are planned down to fit instead of being dropped")
    pack_balance_window: int = Field(
        32, ge=1, description="packing: bins are dealt to ranks in windows of this many global micro-batches, "
        "sorted by visual tokens, so the ranks of one micro-batch get similar vision work (1 = no balancing)")

    @model_validator(mode="after")
    def _check_packing(self) -> "DataConfig":
        if self.packing and self.pack_tokens is None:
            raise ValueError("data.packing needs data.pack_tokens (the token budget of one packed bin)")
        return self


class VideoSampling(Strict):
    """Which frames of a clip are decoded (see data/video/types.py SamplingSpec)."""

    fps: float | None = Field(2.0, gt=0, description="target frames per second over the clip")
    num_frames: int | None = Field(None, ge=1, description="exactly this many frames (overrides fps)")
    min_frames: int = Field(2, ge=1)
    max_frames: int = Field(32, ge=1)
    mode: Literal["uniform", "segment_random"] = Field(
        "uniform", description="segment_random: one random frame per segment, seeded by sample id and epoch")


class VideoConfig(Strict):
    backend: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"
    sampling: VideoSampling = VideoSampling()
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = Field(56 * 56, description="lower pixel bound of a video (per frame for Qwen2-VL and "
                                  "Qwen2.5-VL; over ALL frames of the clip together for Qwen3-VL)")
    video_max_pixels: int = Field(28 * 28 * 256, description="upper pixel bound of a video: per frame for Qwen2-VL and "
                                  "Qwen2.5-VL (as in LLaMA-Factory); for Qwen3-VL a budget over ALL frames of the clip "
                                  "together (its processor's rule), so the same number gives far fewer pixels a frame")
    timestamps: Literal["clip", "source"] = Field(
        "clip", description="Qwen3-VL frame times relative to the clip start or to the file start")
    cache_dir: str | None = Field(None, description="on-disk cache of decoded, resized frames (shared across runs)")
    cache_max_gb: float = Field(20.0, gt=0)
    isolate: bool = Field(False, description="probe and decode in a child process (with decode_timeout_s): a native "
                          "decoder crash or hang costs one sample")
    decode_timeout_s: float = Field(120.0, gt=0, description="with isolate: a decode taking longer is a bad file")


class LoraConfig(Strict):
    enabled: bool = False
    rank: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dora: bool = False
    target_modules: list[str] | None = Field(
        None, description="module names inside the language model (default: the family's attention+MLP linears)"
    )


class TrainConfig(Strict):
    seed: int = 0
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(1, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0, description="learning rate of the language model")
    vision_lr: float | None = Field(None, gt=0, description="default: lr")
    projector_lr: float | None = Field(None, gt=0, description="default: lr")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="null disables clipping")
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU"
    )
    freeze_vision: bool | None = Field(None, description="default: false for full fine-tuning, true with LoRA")
    freeze_projector: bool | None = Field(None, description="default: false for full fine-tuning, true with LoRA")
    freeze_language: bool = Field(False, description="with LoRA the base language model is always frozen")
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_last: int = Field(2, ge=1)
    resume: str = Field("auto", description='"auto" (latest committed checkpoint), "never", or a checkpoint path')
    resume_allow_data_change: bool = Field(
        False, description="resume even though the data manifest fingerprint changed (the data order will differ)")
    progress_bar: bool = True
    max_consecutive_nonfinite: int = Field(5, ge=1, description="abort after this many skipped steps in a row")


class DistributedConfig(Strict):
    """How the ranks a launcher (torchrun, srun) started share the work; see surgsigma_train/distributed/."""

    backend: Literal["none", "ddp", "deepspeed", "fsdp2"] = Field(
        "none", description="none = one process; ddp = replicated weights; deepspeed = ZeRO (zero_stage); "
        "fsdp2 = torch fully_shard (parameters, gradients and optimizer state sharded)")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: 2 shards optimizer+gradients, 3 also parameters")
    offload_optimizer: bool = Field(False, description="deepspeed: optimizer state and step on the CPU")
    offload_params: bool = Field(False, description="deepspeed ZeRO-3: parameters on the CPU between uses")
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON to use instead of configs/deepspeed/zero{2,3}[_offload].json; "
        '"auto" values are filled from the recipe')
    init_timeout_s: float = Field(1800.0, gt=0, description="collective timeout while starting up (model load)")
    step_timeout_s: float = Field(600.0, gt=0, description="collective timeout once training runs: a hung peer "
                                  "ends the run with exit code 76 (retry) instead of blocking the allocation")
    debug_nan_step: int | None = Field(
        None, ge=1, description="test hook: make the loss non-finite at this optimizer step on debug_nan_rank")
    debug_nan_rank: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "DistributedConfig":
        if self.offload_params and not (self.backend == "deepspeed" and self.zero_stage == 3):
            raise ValueError("distributed.offload_params needs backend deepspeed with zero_stage 3")
        if self.offload_optimizer and self.backend != "deepspeed":
            raise ValueError("distributed.offload_optimizer needs backend deepspeed")
        return self


class EvalConfig(Strict):
    checkpoint: str | None = Field(None, description="checkpoint folder to evaluate (default: the latest)")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_samples_per_task: int | None = Field(None, ge=1)
    after_training: bool = Field(False, description="run evaluation at the end of `train`")
    allow_train_overlap: bool = Field(
        False, description="score a checkpoint on held-out source videos it was trained on (leaked: warned, "
        "named and recorded in metrics.json); by default `eval` refuses with exit 2")


class OutputConfig(Strict):
    dir: str = Field(description="the run folder; every file a run writes lives under it")
    tensorboard: bool = True


class RecipeConfig(Strict):
    model: ModelConfig
    data: DataConfig
    video: VideoConfig = VideoConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig

    @model_validator(mode="after")
    def _check_consistency(self) -> "RecipeConfig":
        t = self.train
        lora = self.lora.enabled
        # Resolve mode-dependent defaults once, so the saved config says what really happened.
        if t.freeze_vision is None:
            t.freeze_vision = lora
        if t.freeze_projector is None:
            t.freeze_projector = lora
        if t.freeze_vision and t.freeze_projector and t.freeze_language and not lora:
            raise ValueError("train: everything is frozen and LoRA is off; nothing would be trained")
        if t.warmup_steps > t.max_steps:
            raise ValueError(f"train.warmup_steps ({t.warmup_steps}) > train.max_steps ({t.max_steps})")
        if self.data.packing and t.micro_batch_size != 1:
            raise ValueError(f"data.packing: a micro-batch is one packed bin of data.pack_tokens tokens, so "
                             f"train.micro_batch_size must be 1 (got {t.micro_batch_size}); raise data.pack_tokens "
                             "or train.grad_accum_steps for bigger steps")
        return self
