"""Everything a run needs before its first step: the run folder and its record, the data, the model.

A run folder is reproducible from itself: the resolved config, package and library versions, git
commit, data manifest fingerprint, the video decoders present and the vision preprocessing spec.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from surgsigma_train import __version__
from surgsigma_train.versions import key_versions
from surgsigma_train.config.loading import dump_recipe
from surgsigma_train.config.schema import DataSource, RecipeConfig
from surgsigma_train.data.video import available_backends, backend_version
from surgsigma_train.data.index import ConcatSamples, SampleIndex
from surgsigma_train.data.readers import ReadReport, read_source
from surgsigma_train.data.mixture import Mixture, format_mixture
from surgsigma_train.data.sample import Sample
from surgsigma_train.data.splits import SampleColumns, check_disjoint, format_split, split_indices
from surgsigma_train.errors import ConfigError, DataError
from surgsigma_train.models.family import ModelFamily
from surgsigma_train.models.registry import get_family
from surgsigma_train.training import checkpoint as ckpt


def read_samples(sources: list[DataSource], task_ids: dict[int, str]) -> tuple[list[Sample], list[ReadReport]]:
    """All sources' samples in order. An Arrow index source stays memory-mapped (a sequence, not a list)."""
    parts, reports = [], []
    for source in sources:
        got, rep = read_source(source, task_ids)
        parts.append(got)
        reports.extend(rep)
    if all(isinstance(p, list) for p in parts):
        return [s for p in parts for s in p], reports
    return (parts[0] if len(parts) == 1 else ConcatSamples(parts)), reports  # type: ignore[return-value]


def sample_columns(samples: Sequence[Sample]) -> SampleColumns:
    """Split/mixture columns; an index reads them from Arrow instead of building millions of samples."""
    return samples.sample_columns() if hasattr(samples, "sample_columns") else SampleColumns.from_samples(samples)


def data_fingerprint(samples: list[Sample]) -> str:
    """Identity of the training data: ids, media and targets in order (not file mtimes)."""
    if isinstance(samples, SampleIndex):  # hashed per sample at build time, kept in its manifest
        return samples.fingerprint()
    if isinstance(samples, ConcatSamples):
        return samples.fingerprint(data_fingerprint)
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.task, [m.path for m in s.media], [m.content for m in s.messages]]).encode())
    return h.hexdigest()[:16]


def format_report(reports: list[ReadReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.file}: format {r.format}, {r.records} records -> {r.samples} samples, {len(r.bad)} bad")
        for reason, n in sorted(r.excluded.items()):
            lines.append(f"    excluded {n}: {reason}")
        for name, n in sorted(r.unmapped_fields.items()):
            lines.append(f"    unmapped field {name!r} in {n} records")
        for reason, n in sorted(r.repaired.items()):
            lines.append(f"    repaired {n}: {reason}")
        if r.missing_media:
            shown = ", ".join(sorted(r.missing_media)[:5]) + (", ..." if len(r.missing_media) > 5 else "")
            lines.append(f"    missing media: {len(r.missing_media)} files, {sum(r.missing_media.values())} "
                         f"records (bad): {shown}")
        for bad in r.bad[:10]:
            lines.append(f"    bad {bad.record}: {bad.reason}")
        if len(r.bad) > 10:
            lines.append(f"    ... {len(r.bad) - 10} more bad records (all in bad_samples.jsonl)")
    return "\n".join(lines)


def _preflight_counts(run_dir: Path, reports: list[ReadReport]) -> tuple[int, int, list[tuple[int, str, str]]] | None:
    """(records, bad, [(count, reason kind, example)]) of `validate`'s preflight/summary.json, if it describes
    these very data files: the same files with the same record counts, written after every one of them changed.
    It counts what reading cannot see (media probes, token budget); a stale or foreign one is ignored."""
    summary_path = run_dir / "preflight" / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
        files = {(f["file"], f["records"]) for f in summary["files"]}
        newest_data = max(Path(r.file).stat().st_mtime for r in reports)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if files != {(r.file, max(r.records, len(r.bad))) for r in reports} or summary_path.stat().st_mtime < newest_data:
        return None
    examples: dict[str, str] = {}
    try:
        for line in (run_dir / "preflight" / "bad_samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            from surgsigma_train.data.preflight import reason_kind

            examples.setdefault(reason_kind(row["reason"]), f"{row['id']} {row.get('media') or row['file']}")
    except (OSError, ValueError, KeyError):
        pass
    reasons = sorted(((n, kind, examples.get(kind, "")) for kind, n in summary.get("bad_reasons", {}).items()),
                     reverse=True)
    return int(summary["records"]), int(summary["bad"]), reasons


def check_bad_fraction(cfg: RecipeConfig, reports: list[ReadReport], run_dir: Path) -> None:
    """`train` applies `validate`'s rule before anything is built: above data.max_bad_fraction bad records
    (train and eval data together, as `validate` counts them) it stops with exit 3, the counts and the top
    reasons. The numbers are the readers' (what reading found), or the preflight's when `validate` wrote one
    for these data files (it also probed the media)."""
    from surgsigma_train.data.preflight import reason_kind

    if not reports:
        return
    bad = [b for r in reports for b in r.bad]
    records, n_bad = sum(max(r.records, len(r.bad)) for r in reports), len(bad)
    kinds = Counter(reason_kind(b.reason) for b in bad)
    reasons = [(n, kind, next(f"{b.record} {b.file}" for b in bad if reason_kind(b.reason) == kind))
               for kind, n in kinds.most_common()]
    origin = "read-time report"
    preflight = _preflight_counts(run_dir, reports)
    if preflight is not None and preflight[1] >= n_bad:
        records, n_bad, reasons = preflight
        origin = f"preflight {run_dir / 'preflight' / 'summary.json'}"
    fraction = n_bad / records if records else 0.0
    limit = cfg.data.max_bad_fraction
    if fraction <= limit:
        if n_bad:
            print(f"bad records: {n_bad} of {records} ({fraction:.2%}), within data.max_bad_fraction {limit:.2%}")
        return
    lines = [f"{n_bad} of {records} records are bad ({fraction:.2%}, {origin}), above data.max_bad_fraction "
             f"{limit:.2%} (the rule `validate` applies); training not started. Top reasons:"]
    lines += [f"  {n:>6} x {kind}   (e.g. {example})" for n, kind, example in reasons[:5]]
    if len(reasons) > 5:
        lines.append(f"  ... {len(reasons) - 5} more kinds")
    lines.append(f"Every bad record is in {run_dir / 'bad_samples.jsonl'}. Fix the data, or raise "
                 "data.max_bad_fraction to train on the rest.")
    raise DataError("\n".join(lines))


def write_bad_samples(run_dir: Path, reports: list[ReadReport]) -> None:
    with (run_dir / "bad_samples.jsonl").open("w") as fh:
        for r in reports:
            for bad in r.bad:
                fh.write(json.dumps({"file": bad.file, "id": bad.record, "reason": bad.reason}) + "\n")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def vision_spec(cfg: RecipeConfig, processor: Any) -> dict[str, Any]:
    """What eval and export must reproduce exactly: how pixels and frames became tokens."""
    spec: dict[str, Any] = {"family": cfg.model.family, "video": cfg.video.model_dump(),
                            "decoders": {name: backend_version(name) for name in available_backends()}}
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        if sub is not None:
            spec[name] = {"class": type(sub).__name__, **{
                k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in vars(sub).items()
                if isinstance(v, (int, float, str, bool, list, tuple, dict)) and not k.startswith("_")}}
    return spec


@dataclass
class RunContext:
    cfg: RecipeConfig
    run_dir: Path
    family: ModelFamily
    processor: Any
    train_samples: list[Sample]
    eval_samples: list[Sample]
    reports: list[ReadReport] = field(default_factory=list)
    data_fingerprint: str = ""
    mixture: Mixture | None = None  # the training data's per-epoch sampling (None when need_train=False)
    split_report: dict[str, Any] | None = None
    _train_videos: list[str] | None = None

    @property
    def train_videos(self) -> list[str]:
        """The source videos (split keys) trained on; `eval` refuses to score a checkpoint on them."""
        if self._train_videos is None:
            self._train_videos = sorted(set(sample_columns(self.train_samples).split_key.tolist()))
        return self._train_videos

    @property
    def pad_token_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def checkpoint_files(self) -> dict[str, str]:
        return {"recipe.yaml": dump_recipe(self.cfg),
                "vision_spec.json": json.dumps(vision_spec(self.cfg, self.processor), indent=2, default=str),
                ckpt.TRAIN_VIDEOS: json.dumps({"data_fingerprint": self.data_fingerprint,
                                              "videos": self.train_videos}, indent=1)}


def build_processor(cfg: RecipeConfig, family: ModelFamily) -> Any:
    v = cfg.video
    try:
        return family.build_processor(
            cfg.model.source, image_min_pixels=v.image_min_pixels, image_max_pixels=v.image_max_pixels,
            video_min_pixels=v.video_min_pixels, video_max_pixels=v.video_max_pixels,
            vision_backend=cfg.model.vision_backend, trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as exc:  # not a model directory / hub id, or a directory without a tokenizer or processor
        raise ConfigError(f"model.source {cfg.model.source!r}: cannot load the {cfg.model.family} processor from "
                          f"it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def apply_split(cfg: RecipeConfig, train: list[Sample], evals: list[Sample]
                ) -> tuple[list[Sample], list[Sample], dict[str, Any] | None]:
    """(train, held-out, split report): data.split's held-out videos go before data.eval's samples.

    Train and eval call this with the same config, so they see the same split. Whatever the split, no
    source video may be on both sides (an error), unless a frame-level split was asked for (a warning).
    """
    report = None
    if cfg.data.split is not None:
        result = split_indices(sample_columns(train), cfg.data.split)
        report = result.report
        print(format_split(report))
        evals = [train[i] for i in result.eval] + list(evals)  # held-out sets are small; an index may be one
        train = train.select(result.train) if hasattr(train, "select") else [train[i] for i in result.train]
    if train and evals:
        leak_ok = cfg.data.split is not None and cfg.data.split.by == "sample"
        warnings = check_disjoint(sample_columns(train), sample_columns(evals),
                                  allow_leak=leak_ok)
        if report is not None:
            report["warnings"] += warnings
    return train, evals, report


def prepare_run(cfg: RecipeConfig, *, need_train: bool = True, write_record: bool = True) -> RunContext:
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    family = get_family(cfg.model.family)
    # With data.split the held-out part is carved out of data.train, so eval reads data.train too.
    read_train = need_train or cfg.data.split is not None
    train, train_reports = read_samples(cfg.data.train, cfg.data.task_ids) if read_train else ([], [])
    evals, eval_reports = read_samples(cfg.data.eval, cfg.data.task_ids)
    reports = train_reports + eval_reports
    if reports:
        print(format_report(reports))
    if need_train:  # the rule `validate` applies, before anything is built
        if write_record:
            write_bad_samples(run_dir, reports)
        check_bad_fraction(cfg, reports, run_dir)
    train, evals, split_report = apply_split(cfg, train, evals)
    if need_train and not train:
        raise DataError("no usable training samples (see the report above)")
    mixture = None
    fingerprint = data_fingerprint(train)
    if need_train:
        mixture = Mixture(sample_columns(train), cfg.data.mixture, seed=cfg.train.seed)
        print(format_mixture(mixture))
        if mixture.active:  # other weights = another data order: resuming across that would not be exact
            fingerprint = hashlib.sha256((fingerprint + mixture.to_json()).encode()).hexdigest()[:16]
    processor = build_processor(cfg, family)
    ctx = RunContext(cfg, run_dir, family, processor, train, evals, reports, fingerprint, mixture, split_report)
    if write_record:
        if mixture is not None:
            (run_dir / "mixture.json").write_text(mixture.to_json())
        if split_report is not None:
            (run_dir / "split.json").write_text(json.dumps(split_report, indent=2))
        (run_dir / "config.yaml").write_text(dump_recipe(cfg))
        write_bad_samples(run_dir, reports)
        info = {
            "surgsigma_train": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "packages": key_versions(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "data_fingerprint": ctx.data_fingerprint, "train_samples": len(train), "eval_samples": len(evals),
            "data_reports": [r.summary() for r in reports], "vision_spec": vision_spec(cfg, processor),
            "split": {k: v for k, v in (split_report or {}).items() if k != "held_out_videos"} or None,
        }
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    return ctx


def _build_base(cfg: RecipeConfig, family: ModelFamily, source: str | Path) -> torch.nn.Module:
    from surgsigma_train.models.attention import check_packing_confined, resolve_attn_implementation

    # auto -> the fastest backend here that keeps packed samples apart; impossible combinations: ConfigError (exit 2)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, packing=cfg.data.packing,
                                       model_class=family.model_class)
    model = family.build_model(str(source), attn_implementation=attn,
                               trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed)
    if cfg.data.packing:
        check_packing_confined(model)  # never a silent leak between the samples of a packed row
    return model


def build_model_for_training(cfg: RecipeConfig, family: ModelFamily, resume_from: Path | None) -> torch.nn.Module:
    from surgsigma_train.training.params import apply_freezing, apply_lora

    kind, weights = None, None
    if resume_from is not None:
        kind, weights = ckpt.weights_dir(resume_from)
        ckpt.check_same_model(resume_from, cfg, kind)  # before anything is built: exit 2 naming what changed
    model = _build_base(cfg, family, weights if kind == "model" else cfg.model.source)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_freezing(model, family, cfg.train)
    if cfg.lora.enabled:
        model = apply_lora(model, family, cfg.lora, cfg.train)
        if kind == "adapter":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
            ckpt.load_base_trainables(model, weights)
    elif kind == "adapter":
        raise ConfigError(f"{resume_from} holds a LoRA adapter but lora.enabled is false")
    return model


def load_model_for_eval(cfg: RecipeConfig, family: ModelFamily, checkpoint: Path | None) -> torch.nn.Module:
    if checkpoint is None:
        return _build_base(cfg, family, cfg.model.source)
    kind, weights = ckpt.weights_dir(checkpoint)
    if kind == "model":
        return _build_base(cfg, family, weights)
    from peft import PeftModel

    base = _build_base(cfg, family, cfg.model.source)
    model = PeftModel.from_pretrained(base, str(weights))
    ckpt.load_base_trainables(model, weights)
    return model
