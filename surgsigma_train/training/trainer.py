"""The training loop: explicit forward, backward and optimizer step, read top to bottom.

One optimizer step = `grad_accum_steps` micro-batches. The loss of a step is the sum of token losses
over all its micro-batches divided by the number of loss tokens in the whole step, so gradient
accumulation gives the same gradient as one big batch (no per-micro-batch averaging bias).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.encode import IGNORE_INDEX, SampleEncoder
from surgsigma_train.data.loader import Batch, PadCollator, ResumableBatchSampler, SFTDataset, build_loader
from surgsigma_train.models.family import ModelFamily
from surgsigma_train.training import checkpoint as ckpt
from surgsigma_train.training.params import build_optimizer, build_scheduler, count_parameters
from surgsigma_train.training.run import RunContext, build_model_for_training, prepare_run
from surgsigma_train.training.telemetry import Telemetry


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    samples_seen: int = 0
    tokens_seen: int = 0
    dropped_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


class NonFiniteAbort(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions whose logits predict a supervised token [B, L] bool, those tokens [N]).

    Only these positions go through the LM head: with a ~150k vocabulary the logits of every
    position would dominate the step's time and memory.
    """
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts, labels[:, 1:][predicts[:, :-1]]


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the supervised tokens of one micro-batch."""
    predicts, targets = loss_positions(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits
    return F.cross_entropy(logits.reshape(targets.numel(), -1).float(), targets, reduction="sum")


def autocast_context(mode: str, device: torch.device):
    use_bf16 = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


class Trainer:
    def __init__(self, cfg: RecipeConfig, ctx: RunContext | None = None):
        self.cfg = cfg
        self.ctx = ctx or prepare_run(cfg)
        self.family: ModelFamily = self.ctx.family
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.checkpoint_dir = self.ctx.run_dir / "checkpoints"
        removed = ckpt.clean_uncommitted(self.checkpoint_dir)
        for path in removed:
            print(f"removed uncommitted checkpoint folder {path}")
        self.resume_from = self._resolve_resume()

        self.model = build_model_for_training(cfg, self.family, self.resume_from).to(self.device)
        self.optimizer = build_optimizer(self.model, self.family, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.state = TrainerState()
        if self.resume_from is not None:
            saved = ckpt.load_training_state(self.resume_from, self.optimizer, self.scheduler)
            self.state = TrainerState(**saved["trainer"])
            if saved.get("data_fingerprint") != self.ctx.data_fingerprint:
                raise RuntimeError(
                    f"the training data changed since {self.resume_from} was saved (manifest fingerprint "
                    f"{saved.get('data_fingerprint')} -> {self.ctx.data_fingerprint}); resuming would not be exact. "
                    "Use train.resume=never for a fresh run.")

        t = cfg.train
        self.encoder = SampleEncoder(self.ctx.processor, self.family, cfg.data, cfg.video, seed=t.seed)
        self.sampler = ResumableBatchSampler(len(self.ctx.train_samples), t.micro_batch_size, seed=t.seed)
        self.loader = build_loader(SFTDataset(self.ctx.train_samples, self.encoder), self.sampler,
                                   PadCollator(self.ctx.pad_token_id), cfg.data.num_workers)
        self.drop_reasons: Counter = Counter()

    def _resolve_resume(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.latest_checkpoint(self.checkpoint_dir)
        path = Path(mode)
        if not (path / ckpt.COMMIT_MARKER).is_file():
            raise FileNotFoundError(f"train.resume={mode}: not a committed checkpoint")
        return path

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

    def _log_drops(self, batch: Batch, telemetry: Telemetry) -> None:
        for dropped in batch.dropped:
            self.state.dropped_samples += 1
            self.drop_reasons[dropped.reason.split(":")[0]] += 1
            with (self.ctx.run_dir / "dropped_samples.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": self.state.step, "id": dropped.id, "task": dropped.task,
                                     "reason": dropped.reason}) + "\n")
            telemetry.write(f"dropped sample {dropped.id} ({dropped.task}): {dropped.reason}")

    # ------------------------------------------------------------ loop
    def fit(self) -> TrainerState:
        cfg, t = self.cfg, self.cfg.train
        params = count_parameters(self.model)
        print(f"model {cfg.model.family} ({cfg.model.source}): {params['total']:,} parameters, "
              f"{params['trainable']:,} trainable; {len(self.ctx.train_samples)} training samples; device {self.device}")
        if self.resume_from is not None:
            print(f"resuming from {self.resume_from} at step {self.state.step}")
        telemetry = Telemetry(self.ctx.run_dir, t.max_steps, self.state.step, cfg.output.tensorboard, t.progress_bar)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        batches = self._batches()
        self.model.train()
        try:
            while self.state.step < t.max_steps:
                step_start = time.perf_counter()
                data_wait = 0.0
                micro: list[Batch] = []
                for _ in range(t.grad_accum_steps):
                    wait_start = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - wait_start
                    self._log_drops(batch, telemetry)
                    micro.append(batch)
                loss_tokens = sum(b.num_loss_tokens for b in micro)
                loss_sum = torch.zeros((), device=self.device)
                for batch in micro:
                    if batch.num_samples == 0 or loss_tokens == 0:
                        continue
                    inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
                    labels = inputs.pop("labels")
                    with autocast_context(t.mixed_precision, self.device):
                        micro_loss = token_loss_sum(self.model, inputs, labels)
                    (micro_loss / loss_tokens).backward()
                    loss_sum += micro_loss.detach()
                loss = (loss_sum / max(loss_tokens, 1)).item()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    trainable, t.max_grad_norm if t.max_grad_norm is not None else math.inf))
                finite = math.isfinite(loss) and math.isfinite(grad_norm) and loss_tokens > 0
                if finite:
                    self.optimizer.step()
                    self.state.consecutive_nonfinite = 0
                else:
                    self.state.skipped_steps += 1
                    self.state.consecutive_nonfinite += 1
                    telemetry.write(f"step {self.state.step + 1}: skipped (loss {loss}, grad norm {grad_norm}, "
                                    f"{loss_tokens} loss tokens)")
                    if self.state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                        raise NonFiniteAbort(f"{self.state.consecutive_nonfinite} consecutive non-finite steps")
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.state.step += 1
                tokens = sum(b.num_tokens for b in micro)
                samples = sum(b.num_samples for b in micro)
                self.state.tokens_seen += tokens
                self.state.samples_seen += samples
                elapsed = time.perf_counter() - step_start
                if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                    telemetry.log({
                        "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                        "lr": self.optimizer.param_groups[-1]["lr"], "grad_norm": grad_norm,
                        "tokens": tokens, "loss_tokens": loss_tokens, "samples": samples,
                        "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                        "data_wait_s": data_wait, "step_time_s": elapsed,
                        "dropped_samples": self.state.dropped_samples, "skipped_steps": self.state.skipped_steps,
                    })
                telemetry.advance()
                if t.save_every and self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                    self.save()
            self.save()
        finally:
            telemetry.close()
        if self.drop_reasons:
            print(f"dropped {self.state.dropped_samples} samples during training: {dict(self.drop_reasons)} "
                  f"(details in {self.ctx.run_dir / 'dropped_samples.jsonl'})")
        return self.state

    def save(self) -> Path:
        trainer_state = {"trainer": asdict(self.state), "data_fingerprint": self.ctx.data_fingerprint}
        path = ckpt.save_checkpoint(
            self.checkpoint_dir, self.state.step, self.model, self.optimizer, self.scheduler, trainer_state,
            tokenizer=self.ctx.processor.tokenizer, keep_last=self.cfg.train.keep_last,
            extra_files=self.ctx.checkpoint_files(),
        )
        return path


def run_training(cfg: RecipeConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer
