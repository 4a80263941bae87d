"""`surgsigma-train data stats`: what a recipe's data holds, before any training.

Counts of samples by task, specialty, source dataset and split (after `data.split`), and the token length
distribution per task. Token lengths are exact and cheap: the conversation is rendered with the family's chat
template and tokenised by the real tokenizer; visual tokens are PLANNED, never decoded: images from their
header size (Pillow reads no pixels), videos from container metadata through the same planner and token
budget the encoder uses (`SampleEncoder.plan_videos`), so the number is the `len(input_ids)` training will
see. `--max-samples N` measures token lengths on N samples evenly spaced over the data (counts always use
all). Writes `<output.dir>/stats/stats.json` and PNG histograms there.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.data.encode import EncodeError, SampleEncoder
from surgsigma_train.data.media import MediaError, resolve_media_path
from surgsigma_train.data.sample import Sample
from surgsigma_train.data.video.planning import PlanningError, count_text_tokens, plan_image

PERCENTILES = (0, 50, 90, 95, 99, 100)


def planned_length(encoder: SampleEncoder, sample: Sample) -> int:
    """len(input_ids) of the encoded sample, from the tokenizer and media metadata only (nothing decoded)."""
    return planned_tokens(encoder, sample)[0]


def planned_tokens(encoder: SampleEncoder, sample: Sample) -> tuple[int, int]:
    """(len(input_ids), visual tokens = image/video pad tokens, i.e. mm_token_type_ids != 0) of the encoded
    sample, from the tokenizer and media metadata only (nothing decoded). The packer bins and balances on these."""
    text, _ = encoder.render_with_spans(encoder.conversation(sample))
    sizes = []
    for ref in sample.media:
        if ref.kind == "image":
            path = resolve_media_path(Path(sample.media_root), ref.path)
            with Image.open(path) as img:  # lazy: reads the header, not the pixels
                sizes.append(SimpleNamespace(height=img.height, width=img.width))
    _, decision = encoder.plan_videos(sample, text, sizes)  # raises EncodeError when over the token budget
    v = encoder.video_cfg
    images = [plan_image(s.height, s.width, encoder.family, encoder.processor, min_pixels=v.image_min_pixels,
                         max_pixels=v.image_max_pixels) for s in sizes]
    visual = sum(p.num_pad_tokens for p in images)
    if decision is not None:
        return decision.total_tokens, visual + sum(p.num_pad_tokens for p in decision.plans)
    return count_text_tokens(text, encoder.processor) + sum(p.num_tokens for p in images), visual


def _distribution(lengths: list[int]) -> dict[str, Any]:
    values = np.asarray(lengths)
    out: dict[str, Any] = {"n": len(lengths)}
    if len(lengths):
        out["mean"] = round(float(values.mean()), 1)
        out.update({f"p{p}": int(np.percentile(values, p, method="nearest")) for p in PERCENTILES})
    return out


def _save_plots(out_dir: Path, counts: dict[str, dict[str, int]], lengths: dict[str, list[int]],
                max_seq_len: int) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with the Agg canvas

    written = []
    fig = Figure(figsize=(12, 8), layout="constrained")
    for ax, (axis, rows) in zip(fig.subplots(2, 2).flat, counts.items()):
        names = sorted(rows, key=lambda n: -rows[n])
        ax.barh(names[::-1], [rows[n] for n in names][::-1])
        ax.set_title(f"samples by {axis}")
    fig.savefig(out_dir / "counts.png")
    written.append("counts.png")
    for task, values in sorted(lengths.items()):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        ax.hist(values, bins=min(50, max(1, len(set(values)))))
        ax.axvline(max_seq_len, color="red", linestyle="--", label=f"data.max_seq_len {max_seq_len}")
        ax.set(title=f"tokens per sample: {task} (n={len(values)})", xlabel="tokens", ylabel="samples")
        ax.legend()
        name = f"tokens_{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"  # task names from free-form data
        fig.savefig(out_dir / name)
        written.append(name)
    return written


def compute_stats(cfg: RecipeConfig, max_samples: int | None = None, *, plots: bool = True) -> dict[str, Any]:
    """Counts and token lengths of the recipe's data; writes stats.json and the PNGs under output.dir/stats."""
    from surgsigma_train.models.registry import get_family
    from surgsigma_train.training.run import apply_split, build_processor, format_report, read_samples

    train, train_reports = read_samples(cfg.data.train, cfg.data.task_ids)
    evals, eval_reports = read_samples(cfg.data.eval, cfg.data.task_ids)
    if train_reports + eval_reports:
        print(format_report(train_reports + eval_reports))
    train, evals, split_report = apply_split(cfg, train, evals)
    samples = train + evals
    splits = ["train"] * len(train) + ["eval"] * len(evals)
    counts = {
        "task": dict(Counter(s.task for s in samples)),
        "specialty": dict(Counter(s.specialty or "unknown" for s in samples)),
        "source": dict(Counter(s.source or "unknown" for s in samples)),
        "split": dict(Counter(splits)),
    }
    videos = {"train": len({s.split_key for s in train}), "eval": len({s.split_key for s in evals})}

    family = get_family(cfg.model.family)
    encoder = SampleEncoder(build_processor(cfg, family), family, cfg.data, cfg.video, seed=cfg.train.seed)
    chosen = range(len(samples))
    if max_samples is not None and max_samples < len(samples):
        chosen = sorted(set(np.linspace(0, len(samples) - 1, max_samples).round().astype(int).tolist()))
    lengths: dict[str, list[int]] = defaultdict(list)
    failed: list[dict[str, str]] = []
    for i in chosen:
        s = samples[i]
        try:
            lengths[s.task].append(planned_length(encoder, s))
        except (MediaError, EncodeError, PlanningError, OSError) as exc:
            failed.append({"id": s.id, "task": s.task, "reason": str(exc)})
    over = {task: sum(n > cfg.data.max_seq_len for n in values) for task, values in lengths.items()}
    result = {
        "samples": len(samples), "videos": videos, "counts": counts, "max_seq_len": cfg.data.max_seq_len,
        "measured_samples": len(chosen),
        "tokens": {task: {**_distribution(values), "over_max_seq_len": over[task]}
                   for task, values in sorted(lengths.items())},
        "tokens_all": _distribution([n for values in lengths.values() for n in values]),
        "not_measured": {"count": len(failed), "reasons": dict(Counter(f["reason"] for f in failed)),
                         "samples": failed[:100]},
        "split": split_report,
    }
    out_dir = Path(cfg.output.dir) / "stats"
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(out_dir / n) for n in _save_plots(out_dir, counts, lengths, cfg.data.max_seq_len)] if plots else []
    (out_dir / "stats.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def format_stats(result: dict[str, Any]) -> str:
    lines = [f"{result['samples']} samples; source videos: {result['videos']['train']} train, "
             f"{result['videos']['eval']} eval"]
    for axis, rows in result["counts"].items():
        lines.append(f"by {axis}:")
        lines += [f"  {name:<32} {n:>9} {n / result['samples']:>7.1%}" for name, n in
                  sorted(rows.items(), key=lambda kv: -kv[1])]
    lines.append(f"tokens per sample ({result['measured_samples']} measured; text tokenised, visual tokens planned "
                 f"from metadata; data.max_seq_len {result['max_seq_len']}):")
    header = "".join(f"{'p' + str(p):>7}" for p in PERCENTILES)
    lines.append(f"  {'task':<32} {'n':>7} {'mean':>8}{header} {'>max':>6}")
    for task, d in [*result["tokens"].items(), ("(all)", {**result["tokens_all"], "over_max_seq_len": sum(
            t["over_max_seq_len"] for t in result["tokens"].values())})]:
        if d["n"]:
            lines.append(f"  {task:<32} {d['n']:>7} {d['mean']:>8}" + "".join(f"{d[f'p{p}']:>7}" for p in PERCENTILES)
                         + f" {d['over_max_seq_len']:>6}")
    skipped = result["not_measured"]
    if skipped["count"]:
        lines.append(f"not measured: {skipped['count']} samples (would be dropped in training):")
        lines += [f"  {n} x {reason}" for reason, n in sorted(skipped["reasons"].items(), key=lambda kv: -kv[1])[:10]]
    if result["plots"]:
        lines.append(f"histograms: {Path(result['plots'][0]).parent}/*.png")
    return "\n".join(lines)
