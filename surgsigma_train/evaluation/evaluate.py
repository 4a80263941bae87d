"""Held-out evaluation: greedy generation, answer extraction (<think> stripped), exact match per task.

Writes `eval/metrics.json` shaped {"tasks": {task: {"accuracy", "n", "dropped"}}, ...} and every
prediction to `eval/predictions.jsonl`. (The field's full metric suite is a later layer.)
"""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.encode import SampleEncoder, extract_answer
from surgsigma_train.data.loader import PadCollator, SFTDataset, build_loader
from surgsigma_train.data.sample import Sample
from surgsigma_train.training import checkpoint as ckpt
from surgsigma_train.training.run import load_model_for_eval, prepare_run

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Case, punctuation and whitespace do not count; the words and numbers do."""
    return re.sub(r"\s+", " ", extract_answer(text).lower().translate(_PUNCT)).strip()


def select_eval_samples(samples: list[Sample], per_task: int | None) -> list[Sample]:
    """Up to `per_task` samples of each task, evenly spaced over the held-out set (so a subset still spans
    every held-out video instead of the first one), in the original order."""
    if per_task is None:
        return list(samples)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_task[s.task].append(i)
    keep: set[int] = set()
    for indices in by_task.values():
        if len(indices) <= per_task:
            keep.update(indices)
        else:
            keep.update(indices[int(k * len(indices) / per_task)] for k in range(per_task))
    return [s for i, s in enumerate(samples) if i in keep]


def _stop_token_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def evaluate(cfg: RecipeConfig, checkpoint: Path | None = None) -> dict[str, Any]:
    ctx = prepare_run(cfg, need_train=False, write_record=False)
    if not ctx.eval_samples:
        raise ValueError("no evaluation samples: set data.eval or data.split in the recipe")
    if checkpoint is None and cfg.eval.checkpoint:
        checkpoint = Path(cfg.eval.checkpoint)
    if checkpoint is None:
        checkpoint = ckpt.latest_checkpoint(ctx.run_dir / "checkpoints")
    if checkpoint is not None and not (checkpoint / ckpt.COMMIT_MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a committed checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_for_eval(cfg, ctx.family, checkpoint).to(device).eval()
    tokenizer = ctx.processor.tokenizer
    samples = select_eval_samples(ctx.eval_samples, cfg.eval.max_samples_per_task)
    encoder = SampleEncoder(ctx.processor, ctx.family, cfg.data, cfg.video, seed=cfg.train.seed)
    loader = build_loader(SFTDataset(samples, encoder, prompt_only=True), None,
                          PadCollator(ctx.pad_token_id, padding_side="left"), cfg.data.num_workers,
                          batch_size=cfg.eval.batch_size)
    out_dir = ctx.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    dropped: dict[str, int] = defaultdict(int)
    stop_ids = _stop_token_ids(tokenizer)
    with (out_dir / "predictions.jsonl").open("w") as pred_file:
        for batch in loader:
            for d in batch.dropped:
                dropped[d.task] += 1
                pred_file.write(json.dumps({"id": d.id, "task": d.task, "dropped": d.reason}) + "\n")
            if not batch.ids:
                continue
            inputs = {k: v.to(device) for k, v in batch.inputs.items() if k != "labels"}
            generated = model.generate(**inputs, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                       eos_token_id=stop_ids, pad_token_id=ctx.pad_token_id)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            for sid, task, ref, row in zip(batch.ids, batch.tasks, batch.references, new_tokens):
                # Only stop and pad tokens are dropped: skip_special_tokens would also delete Qwen2-VL's
                # <|box_start|>/<|object_ref_start|> grounding tokens, which the references (data.box_format) carry.
                text = tokenizer.decode([t for t in row.tolist() if t not in stop_ids and t != ctx.pad_token_id])
                ok = normalize_answer(text) == normalize_answer(ref or "")
                correct[task] += int(ok)
                total[task] += 1
                pred_file.write(json.dumps({"id": sid, "task": task, "prediction": text, "reference": ref,
                                            "correct": ok}) + "\n")
    tasks = {
        task: {"accuracy": correct[task] / total[task] if total[task] else 0.0, "n": total[task],
               "dropped": dropped[task]}
        for task in sorted(set(total) | set(dropped))
    }
    metrics = {"tasks": tasks, "checkpoint": str(checkpoint) if checkpoint else None,
               "metric": "exact match after normalisation (case, punctuation, whitespace; <think> stripped)"}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    rows = [f"{'task':<28} {'accuracy':>8} {'n':>5} {'dropped':>7}"]
    for task, m in metrics["tasks"].items():
        rows.append(f"{task:<28} {m['accuracy']:>8.3f} {m['n']:>5} {m['dropped']:>7}")
    return "\n".join(rows)
