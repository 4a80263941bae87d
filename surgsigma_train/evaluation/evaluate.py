"""Held-out evaluation: greedy generation, answer extraction (<think> stripped), exact match per task.

Writes `eval/metrics.json` shaped {"tasks": {task: {"accuracy", "n", "dropped"}}, ...} and every
prediction to `eval/predictions.jsonl`. (The field's full metric suite is a later layer.)

Refused: no held-out sample at all, or a task whose every sample was dropped (exit 3, with the drops and their
reasons; no metrics.json), and a held-out source video the checkpoint was trained on (exit 2, naming the
videos, unless eval.allow_train_overlap=true: then warned and listed in metrics.json as train_overlap_videos).
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.encode import SampleEncoder, extract_answer
from surgsigma_train.data.loader import PadCollator, SFTDataset, build_loader
from surgsigma_train.data.sample import Sample
from surgsigma_train.errors import ConfigError, DataError, InternalError, UserError
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


def checkpoint_train_videos(checkpoint: Path) -> list[str]:
    """The source videos (split keys) a checkpoint was trained on: its train_videos.json, or, for a checkpoint
    written before that file existed, its own recipe's training data read again and split as it was then."""
    recorded = checkpoint / ckpt.TRAIN_VIDEOS
    if recorded.is_file():
        return json.loads(recorded.read_text())["videos"]
    from surgsigma_train.config.loading import load_recipe
    from surgsigma_train.data.splits import split_indices
    from surgsigma_train.training.run import read_samples, sample_columns

    trained = load_recipe(checkpoint / "recipe.yaml")
    samples, _ = read_samples(trained.data.train, trained.data.task_ids)
    keys = sample_columns(samples).split_key
    if trained.data.split is not None:
        keys = keys[split_indices(sample_columns(samples), trained.data.split).train]
    return sorted(set(keys.tolist()))


def check_train_overlap(cfg: RecipeConfig, checkpoint: Path | None, samples: list[Sample]) -> list[str]:
    """Held-out source videos the checkpoint was trained on: exit 2, or with eval.allow_train_overlap a loud
    warning (the list is returned and recorded in metrics.json)."""
    if checkpoint is None:
        return []
    try:
        trained = set(checkpoint_train_videos(checkpoint))
    except (UserError, OSError, ValueError, KeyError) as exc:
        print(f"WARNING: cannot tell which videos {checkpoint} was trained on ({exc}); the held-out set is NOT "
              "checked for overlap with its training data", file=sys.stderr)
        return []
    overlap = sorted({s.split_key for s in samples} & trained)
    if not overlap:
        return []
    n = sum(s.split_key in trained for s in samples)
    message = (f"{len(overlap)} held-out source video(s) ({n} of {len(samples)} samples) were in the training "
               f"data of {checkpoint}: {', '.join(overlap[:20])}{', ...' if len(overlap) > 20 else ''}")
    if not cfg.eval.allow_train_overlap:
        raise ConfigError(message + ". Scores on them measure memorisation, not generalisation. Evaluate with the "
                          "data.split / data.eval the run was trained with, or set eval.allow_train_overlap=true "
                          "to score them anyway.")
    warning = f"WARNING: eval.allow_train_overlap=true: {message}; these scores are inflated by leakage"
    print(warning)
    print(warning, file=sys.stderr)
    return overlap


def _unevaluated(tasks: list[str], drops: list[tuple[str, str, str]], limit: int = 10) -> str:
    lines = [f"no sample of task(s) {', '.join(tasks)} could be evaluated (each one was dropped); "
             "an accuracy over 0 samples is not a score. Dropped:"]
    shown = [d for d in drops if d[1] in tasks]
    lines += [f"  {sid} ({task}): {reason}" for sid, task, reason in shown[:limit]]
    if len(shown) > limit:
        lines.append(f"  ... {len(shown) - limit} more")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(cfg: RecipeConfig, checkpoint: Path | None = None) -> dict[str, Any]:
    if not cfg.data.eval and cfg.data.split is None:
        raise ConfigError("no evaluation data: set data.eval or data.split in the recipe")
    ctx = prepare_run(cfg, need_train=False, write_record=False)
    out_dir = ctx.run_dir / "eval"
    if not ctx.eval_samples:
        bad = [f"  {b.record} ({b.file}): {b.reason}" for r in ctx.reports for b in r.bad]
        raise DataError("no evaluation samples: the held-out data (data.eval, data.split) yielded none"
                        + (":\n" + "\n".join(bad[:10]) + (f"\n  ... {len(bad) - 10} more" if len(bad) > 10 else "")
                           if bad else " (see the report above)"))
    if checkpoint is None and cfg.eval.checkpoint:
        checkpoint = Path(cfg.eval.checkpoint)
    if checkpoint is None:
        checkpoint = ckpt.latest_checkpoint(ctx.run_dir / "checkpoints")
    if checkpoint is not None and not (checkpoint / ckpt.COMMIT_MARKER).is_file():
        raise ConfigError(f"eval.checkpoint {checkpoint} is not a committed checkpoint (no {ckpt.COMMIT_MARKER} marker)")
    samples = select_eval_samples(ctx.eval_samples, cfg.eval.max_samples_per_task)
    overlap = check_train_overlap(cfg, checkpoint, samples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_for_eval(cfg, ctx.family, checkpoint).to(device).eval()
    tokenizer = ctx.processor.tokenizer
    encoder = SampleEncoder(ctx.processor, ctx.family, cfg.data, cfg.video, seed=cfg.train.seed)
    loader = build_loader(SFTDataset(samples, encoder, prompt_only=True), None,
                          PadCollator(ctx.pad_token_id, padding_side="left"), cfg.data.num_workers,
                          batch_size=cfg.eval.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    drops: list[tuple[str, str, str]] = []  # (id, task, reason)
    stop_ids = _stop_token_ids(tokenizer)
    with (out_dir / "predictions.jsonl").open("w") as pred_file:
        for batch in loader:
            for d in batch.dropped:
                if d.fatal:  # a bug (the token plan disagrees with the processor), not a drop to score around
                    raise InternalError(d.reason)
                drops.append((d.id, d.task, d.reason))
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
    dropped = Counter(task for _, task, _ in drops)
    empty = sorted(task for task in dropped if not total[task])
    if empty:  # no metrics.json: an old one would read as this checkpoint's score
        (out_dir / "metrics.json").unlink(missing_ok=True)
        raise DataError(_unevaluated(empty, drops) + f"\n(every drop is in {out_dir / 'predictions.jsonl'})")
    tasks = {task: {"accuracy": correct[task] / total[task], "n": total[task], "dropped": dropped[task]}
             for task in sorted(total)}
    metrics = {"tasks": tasks, "checkpoint": str(checkpoint) if checkpoint else None,
               "metric": "exact match after normalisation (case, punctuation, whitespace; <think> stripped)"}
    if overlap:
        metrics["train_overlap_videos"] = overlap
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    rows = [f"{'task':<28} {'accuracy':>8} {'n':>5} {'dropped':>7}"]
    for task, m in metrics["tasks"].items():
        rows.append(f"{task:<28} {m['accuracy']:>8.3f} {m['n']:>5} {m['dropped']:>7}")
    return "\n".join(rows)
