"""The training loop: explicit forward, backward and optimizer step, read top to bottom.

One optimizer step = `grad_accum_steps` micro-batches on each of `world_size` ranks. The loss of a
step is the sum of token losses over all its micro-batches on all ranks divided by the number of
loss tokens in the whole global step, so gradient accumulation and data parallelism give the same
gradient as one big batch (no per-micro-batch or per-rank averaging bias).

Distribution is the engine's business (surgsigma_train/distributed/engines.py); what the loop adds
is agreement: every rank runs the same collectives each step (a rank whose micro-batch lost all its
samples runs a zero-weight pass on a filler batch), the skip decision for a non-finite loss or
gradient norm is taken from all-reduced numbers before the optimizer step, and a preemption signal
seen by any rank stops all of them after the same step, with a committed checkpoint (exit 75).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.encode import IGNORE_INDEX, EncodedSample, SampleEncoder
from surgsigma_train.data.loader import Batch, PadCollator, ResumableBatchSampler, SFTDataset, build_loader
from surgsigma_train.data.packing import build_packed_data, packed_position_ids
from surgsigma_train.distributed.engines import build_engine
from surgsigma_train.distributed.env import init_distributed
from surgsigma_train.distributed.preemption import PreemptionFlag
from surgsigma_train.errors import (ConfigError, DataError, InfraError, InternalError, Preempted, TrainingDiverged,
                                    UserError)
from surgsigma_train.models.family import ModelFamily
from surgsigma_train.models.vision_call_graph import VisionCallGraph, media_slots
from surgsigma_train.training import checkpoint as ckpt
from surgsigma_train.training.params import build_optimizer, build_scheduler, count_parameters
from surgsigma_train.training.run import RunContext, build_model_for_training, prepare_run
from surgsigma_train.training.telemetry import Telemetry


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches consumed in the current epoch (the same on every rank)
    micro_step: int = 0  # micro-batch within the accumulation window; checkpoints are taken at 0
    samples_seen: int = 0
    tokens_seen: int = 0
    dropped_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


NonFiniteAbort = TrainingDiverged  # the name this module used before exit codes were typed


def _crash_point(point: str, rank: int) -> None:
    """Test hook for the crash tests: SURGSIGMA_TEST_SIGKILL=POINT (e.g. "micro:5:1" = step 5 after micro-batch
    1's backward, "save:4" = inside the save of step-4 before its commit) kills this process like `kill -9`,
    on rank SURGSIGMA_TEST_SIGKILL_RANK (default 0)."""
    wanted_rank = int(os.environ.get("SURGSIGMA_TEST_SIGKILL_RANK", 0))
    if os.environ.get("SURGSIGMA_TEST_SIGKILL") == point and wanted_rank == rank:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions whose logits predict a supervised token [B, L] bool, those tokens [N]).

    Only these positions go through the LM head: with a ~150k vocabulary the logits of every
    position would dominate the step's time and memory.
    """
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts, labels[:, 1:][predicts[:, :-1]]


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   vision: VisionCallGraph | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the supervised tokens of one micro-batch.

    `vision`: the forward calls the vision tower once per media slot of the run, with a zero-weight dummy for a
    slot this micro-batch leaves empty, so that every rank issues the same collectives (models/vision_call_graph.py)."""
    predicts, targets = loss_positions(labels)
    with vision.complete(inputs) if vision is not None else nullcontext():
        logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits
    return F.cross_entropy(logits.reshape(targets.numel(), -1).float(), targets, reduction="sum")


def autocast_context(mode: str, device: torch.device):
    use_bf16 = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()



class Trainer:
    def __init__(self, cfg: RecipeConfig, ctx: RunContext | None = None):
        self.cfg = cfg
        self.dist = init_distributed(cfg.distributed)  # joins torchrun's process group, long start-up timeout
        self.ctx = ctx or prepare_run(cfg, write_record=self.dist.is_main)
        self.family: ModelFamily = self.ctx.family
        self.device = self.dist.device
        self.checkpoint_dir = self.ctx.run_dir / "checkpoints"
        if self.dist.is_main:
            for path in ckpt.clean_uncommitted(self.checkpoint_dir):
                print(f"removed uncommitted checkpoint folder {path}")
        self.dist.barrier()
        self.resume_from = self._resolve_resume()
        saved = self._check_resumable() if self.resume_from is not None else None

        t = cfg.train
        self.model = build_model_for_training(cfg, self.family, self.resume_from)  # unwrapped (HF / peft)
        self.engine = build_engine(cfg, self.model, lambda m: build_optimizer(m, self.family, t), self.dist)
        self.optimizer = self.engine.optimizer  # the torch optimizer whose param groups carry the LRs
        # One vision tower call per media kind of the training set in every forward (a zero-weight dummy where a
        # micro-batch has none); SURGSIGMA_TEST_NO_DUMMY_VISION=1 turns it off for the test that shows the hang.
        kinds = () if os.environ.get("SURGSIGMA_TEST_NO_DUMMY_VISION") == "1" else media_slots(self.ctx.train_samples)
        self.vision_call_graph = VisionCallGraph(self.model, self.family, kinds)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.state = TrainerState()
        if saved is not None:
            self.engine.load(self.resume_from)
            self.scheduler.load_state_dict(torch.load(self.resume_from / "scheduler.pt", weights_only=True))
            ckpt.load_trainer_state(self.resume_from, self.dist.rank)  # this rank's RNGs
            self.state = TrainerState(**saved["trainer"])

        self.encoder = SampleEncoder(self.ctx.processor, self.family, cfg.data, cfg.video, seed=t.seed)
        mixture = self.ctx.mixture
        shard = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        dataset, collator = SFTDataset(self.ctx.train_samples, self.encoder), PadCollator(self.ctx.pad_token_id)
        if cfg.data.packing:  # a micro-batch is one bin of planned lengths, packed into one row (data/packing.py)
            self.sampler, dataset, collator = build_packed_data(cfg, self.ctx, self.encoder, self.dist)
        elif mixture is not None and mixture.active:  # weighted: the epoch's list is a pure function of (seed, epoch)
            self.sampler = ResumableBatchSampler(mixture.epoch_size, t.micro_batch_size, seed=t.seed,
                                                 epoch_order=mixture.epoch_indices, **shard)
        else:
            self.sampler = ResumableBatchSampler(len(self.ctx.train_samples), t.micro_batch_size, seed=t.seed, **shard)
        self.loader = build_loader(dataset, self.sampler, collator, cfg.data.num_workers)
        self.drop_reasons: Counter = Counter()
        self._recent_drops: deque[tuple[int, int]] = deque()  # (samples met, dropped) per step, for the drop rate
        self._filler: Batch | None = None
        self.preemption = PreemptionFlag().install()
        self.dist.barrier()
        self.dist.set_timeout(cfg.distributed.step_timeout_s)  # from now on a hung peer fails fast

    def _resolve_resume(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.latest_checkpoint(self.checkpoint_dir)
        path = Path(mode)
        if not (path / ckpt.COMMIT_MARKER).is_file():
            raise ConfigError(f"train.resume={mode}: not a committed checkpoint")
        return path

    def _check_resumable(self) -> dict[str, Any]:
        """Refuse, before anything heavy, a resume that could not be exact."""
        saved = json.loads((self.resume_from / "trainer_state.json").read_text())
        if saved.get("data_fingerprint") != self.ctx.data_fingerprint and not self.cfg.train.resume_allow_data_change:
            raise DataError(
                f"the training data changed since {self.resume_from} was saved (manifest fingerprint "
                f"{saved.get('data_fingerprint')} -> {self.ctx.data_fingerprint}); resuming would not be exact. "
                "Use train.resume=never for a fresh run, or train.resume_allow_data_change=true to continue anyway.")
        for key, now in (("world_size", self.dist.world_size), ("backend", self.cfg.distributed.backend)):
            if saved.get(key, now) != now:
                raise ConfigError(f"{self.resume_from} was saved with {key} {saved[key]}, this run has {now}: the "
                                  "per-rank data positions and optimizer shards would not match; use the same "
                                  f"{key} or train.resume=never")
        return saved

    def _write_layout(self) -> None:
        """distributed.json: backend, world size and what each rank holds (tests assert real sharding)."""
        shards = self.engine.sharding()
        if self.dist.active:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, shards)
        else:
            gathered = [shards]
        if self.dist.is_main:
            (self.ctx.run_dir / "distributed.json").write_text(json.dumps(
                {"backend": self.cfg.distributed.backend, "world_size": self.dist.world_size,
                 "device": str(self.device), "ranks": gathered}, indent=2))

    # ------------------------------------------------------------ data
    def _batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, starting where the state says."""
        while True:
            self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            self.loader.dataset.set_epoch(self.state.epoch)
            for batch in self.loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _filler_batch(self) -> Batch:
        """A real batch for a zero-weight pass when this rank's micro-batch lost every sample: the other
        ranks run forward/backward, so this one must issue the same collectives (or they all hang)."""
        if self._filler is None:
            dataset = self.loader.dataset
            for i in range(len(dataset)):
                item = dataset[i]
                if getattr(item, "fatal", False):
                    raise InternalError(item.reason)
                if isinstance(item, EncodedSample):
                    self._filler = self.loader.collate_fn([item])
                    break
            else:
                raise DataError("no training sample encodes; nothing to train on")
        return self._filler

    def _log_drops(self, batch: Batch, telemetry: Telemetry) -> int:
        for dropped in batch.dropped:
            if dropped.fatal:  # a bug (e.g. the token plan disagrees with the processor): stop, never count it
                raise InternalError(dropped.reason)
            self.drop_reasons[dropped.reason.split(":")[0]] += 1
            # one line per write in append mode: the ranks' lines interleave but never mix
            with (self.ctx.run_dir / "dropped_samples.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": self.state.step, "rank": self.dist.rank, "id": dropped.id,
                                     "task": dropped.task, "reason": dropped.reason}) + "\n")
            print(f"dropped sample {dropped.id} ({dropped.task}): {dropped.reason}")
        return len(batch.dropped)

    def _check_drop_rate(self, samples: int, dropped: int, final: bool) -> None:
        """Stop (exit 3) when too many samples were dropped, over the run or over the last `dropped_window` ones.

        Called with the step's all-reduced counts, so every rank takes the same decision. Judged once the window is
        full (a handful of samples says nothing about a share), and at the end whatever the count."""
        data = self.cfg.data
        limit = data.max_bad_fraction if data.max_dropped_fraction is None else data.max_dropped_fraction
        self._recent_drops.append((samples + dropped, dropped))
        while len(self._recent_drops) > 1 and sum(n for n, _ in self._recent_drops) - self._recent_drops[0][0] \
                >= data.dropped_window:
            self._recent_drops.popleft()
        met = self.state.samples_seen + self.state.dropped_samples
        checks = [("the run so far", met, self.state.dropped_samples)]
        window_met = sum(n for n, _ in self._recent_drops)
        if window_met >= data.dropped_window:
            checks.append((f"the last {window_met} samples", window_met, sum(d for _, d in self._recent_drops)))
        for where, seen, lost in checks:
            if lost and (final or seen >= data.dropped_window) and lost / seen > limit:
                top = "; ".join(f"{count} x {reason}" for reason, count in self.drop_reasons.most_common(5))
                raise DataError(
                    f"{lost} of {seen} samples ({lost / seen:.1%}) were dropped over {where} at step "
                    f"{self.state.step}, above data.max_dropped_fraction {limit} (default: data.max_bad_fraction). "
                    f"Top reasons on rank {self.dist.rank}: {top or 'on other ranks'}. Every drop is listed in "
                    f"{self.ctx.run_dir / 'dropped_samples.jsonl'}; `surgsigma-train validate` checks the data first")

    # ------------------------------------------------------------ loop
    def fit(self) -> TrainerState:
        cfg, t, d = self.cfg, self.cfg.train, self.cfg.distributed
        world = self.dist.world_size
        params = count_parameters(self.model)
        if self.dist.is_main:
            print(f"model {cfg.model.family} ({cfg.model.source}): {params['total']:,} parameters, "
                  f"{params['trainable']:,} trainable; {len(self.ctx.train_samples)} training samples; "
                  f"device {self.device}; backend {d.backend}, world size {world}")
            if self.resume_from is not None:
                print(f"resuming from {self.resume_from} at step {self.state.step}")
        telemetry = Telemetry(self.ctx.run_dir, t.max_steps, self.state.step, cfg.output.tensorboard, t.progress_bar,
                              enabled=self.dist.is_main)
        batches = self._batches()
        first_step = self.state.step
        self.model.train()
        try:
            while self.state.step < t.max_steps:
                step_start = time.perf_counter()
                data_wait = 0.0
                micro: list[Batch] = []
                dropped = 0
                for _ in range(t.grad_accum_steps):
                    wait_start = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - wait_start
                    dropped += self._log_drops(batch, telemetry)
                    micro.append(batch)
                # Global loss tokens first: each rank's loss is scaled so that the ranks' averaged
                # gradients equal the gradient of the whole global step's mean token loss.
                (loss_tokens,) = self.dist.all_reduce([sum(b.num_loss_tokens for b in micro)])
                loss_sum = torch.zeros((), device=self.device)
                inject_nan = d.debug_nan_step == self.state.step + 1 and d.debug_nan_rank == self.dist.rank
                if loss_tokens > 0:
                    for i, batch in enumerate(micro):
                        self.state.micro_step = i
                        real = batch.num_samples > 0
                        source = batch if real else self._filler_batch()
                        inputs = {k: v.to(self.device) for k, v in source.inputs.items()}
                        labels = inputs.pop("labels")
                        if source.seq_lens is not None:  # packed row: text positions restart per sample, + mRoPE
                            inputs["position_ids"] = packed_position_ids(self.model, inputs, source.seq_lens)
                        with self.engine.accumulate(last=i == len(micro) - 1):
                            with autocast_context(t.mixed_precision, self.device):
                                micro_loss = token_loss_sum(self.engine.model, inputs, labels, self.vision_call_graph)
                            if inject_nan:
                                micro_loss = micro_loss * float("nan")
                            if not real:
                                micro_loss = micro_loss * 0.0
                            self.engine.backward(micro_loss / (loss_tokens / world))
                        _crash_point(f"micro:{self.state.step + 1}:{i}", self.dist.rank)
                        loss_sum += micro_loss.detach()
                self.state.micro_step = 0
                local = [float(loss_sum), sum(b.num_samples for b in micro), sum(b.num_tokens for b in micro),
                         dropped, float(self.preemption.requested), sum(b.slot_tokens for b in micro),
                         sum(b.num_visual_tokens for b in micro)]
                total_loss, samples, tokens, dropped, preempt, slots, visual = self.dist.all_reduce(local)
                loss = total_loss / max(loss_tokens, 1)
                # Decided from all-reduced numbers, so every rank takes the same decision.
                skip = not math.isfinite(loss) or loss_tokens == 0
                if loss_tokens > 0:
                    grad_norm, applied = self.engine.step(t.max_grad_norm, skip)
                else:
                    grad_norm, applied = 0.0, False
                if applied:
                    self.state.consecutive_nonfinite = 0
                else:
                    self.state.skipped_steps += 1
                    if loss_tokens > 0:  # a step whose samples were all dropped is empty, not a sign of divergence
                        self.state.consecutive_nonfinite += 1
                    message = (f"step {self.state.step + 1}: skipped on rank {self.dist.rank} (loss {loss}, "
                               f"grad norm {grad_norm}, {int(loss_tokens)} loss tokens)")
                    telemetry.write(message) if self.dist.is_main else print(message)
                    if self.state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                        raise TrainingDiverged(f"{self.state.consecutive_nonfinite} consecutive non-finite steps")
                self.scheduler.step()
                self.state.step += 1
                self.state.tokens_seen += int(tokens)
                self.state.samples_seen += int(samples)
                self.state.dropped_samples += int(dropped)
                self._check_drop_rate(int(samples), int(dropped), final=False)
                elapsed = time.perf_counter() - step_start
                if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                    telemetry.log({
                        "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                        "lr": self.optimizer.param_groups[-1]["lr"], "grad_norm": grad_norm,
                        "tokens": int(tokens), "loss_tokens": int(loss_tokens), "samples": int(samples),
                        "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                        # real / slot tokens (packing: bins x data.pack_tokens; padding: rows x padded length)
                        "slot_tokens": int(slots), "packing_efficiency": tokens / slots if slots else 0.0,
                        "text_tokens_per_s": (tokens - visual) / elapsed, "visual_tokens_per_s": visual / elapsed,
                        "data_wait_s": data_wait, "step_time_s": elapsed,
                        "dropped_samples": self.state.dropped_samples, "skipped_steps": self.state.skipped_steps,
                    })
                telemetry.advance()
                if self.state.step == first_step + 1:  # optimizer state exists only after a step
                    self._write_layout()
                if preempt > 0 and self.state.step < t.max_steps:
                    self.save()
                    raise Preempted(f"preempted ({self.preemption.signal_name or 'signal on another rank'}): "
                                    f"committed checkpoint at step {self.state.step}; rerun to resume")
                if t.save_every and self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                    self.save()
            self.save()
            self._check_drop_rate(0, 0, final=True)
        except torch.distributed.DistError as exc:  # a peer died or a collective timed out
            raise InfraError(f"collective failed at step {self.state.step + 1}: {exc}") from exc
        finally:
            telemetry.close()
        if self.drop_reasons:
            print(f"rank {self.dist.rank} dropped samples during training: {dict(self.drop_reasons)} "
                  f"(details in {self.ctx.run_dir / 'dropped_samples.jsonl'})")
        return self.state

    def save(self) -> Path:
        trainer_state = {"trainer": asdict(self.state), "data_fingerprint": self.ctx.data_fingerprint,
                         "world_size": self.dist.world_size, "backend": self.cfg.distributed.backend}

        def write(tmp: Path) -> None:
            self.engine.save(tmp)  # weights + optimizer: the backend decides which ranks write what
            torch.save(ckpt.rng_state(), tmp / ckpt.rng_file(self.dist.rank))
            _crash_point(f"save:{self.state.step}", self.dist.rank)
            if self.dist.is_main:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
                self.ctx.processor.tokenizer.save_pretrained(tmp / "tokenizer")
                for name, text in self.ctx.checkpoint_files().items():
                    (tmp / name).write_text(text)

        try:
            return ckpt.save_checkpoint(self.checkpoint_dir, self.state.step, write, rank=self.dist.rank,
                                        barrier=self.dist.barrier, keep_last=self.cfg.train.keep_last)
        except OSError as exc:  # disk full, lost mount: the last committed checkpoint is intact, retry
            raise InfraError(f"saving checkpoint step-{self.state.step}: {exc}") from exc

    def write_exit_status(self, code: int, message: str) -> None:
        """run_dir/exit_status.json (rank 0): what a launcher reads when torchrun hides the workers' exit code."""
        if self.dist.is_main:
            (self.ctx.run_dir / "exit_status.json").write_text(json.dumps(
                {"exit_code": code, "step": self.state.step, "message": message}, indent=2))


def run_training(cfg: RecipeConfig) -> Trainer:
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    except (Preempted, InfraError, UserError) as exc:
        trainer.write_exit_status(exc.exit_code, str(exc))
        raise
    trainer.write_exit_status(0, "done")
    return trainer
