"""Where metrics go: metrics.jsonl (one JSON object per logged step), TensorBoard, a progress bar.

Every numeric field of a record is a TensorBoard scalar (train/<key>): loss, tokens_per_s, packing_efficiency (real
/ slot tokens), text_tokens_per_s and visual_tokens_per_s (mm_token_type_ids != 0) among them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class Telemetry:
    def __init__(self, run_dir: Path, total_steps: int, initial_step: int = 0, tensorboard: bool = True,
                 progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self._writer = None
        self._bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if progress_bar:
            # In a log file (Slurm, CI) a bar redrawn every step would be most of the log: refresh rarely.
            interactive = sys.stderr.isatty()
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=0.5 if interactive else 30.0)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(f"train/{key}", value, record["step"])
        if self._bar is not None:
            extra = {}
            if "packing_efficiency" in record:  # real / slot tokens, and the vision share of the throughput
                extra = {"pack": f"{record['packing_efficiency']:.1%}", "vis_tok_s": f"{record['visual_tokens_per_s']:.0f}"}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra,
                                  refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
