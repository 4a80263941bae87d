"""`surgsigma-train`: train, eval, validate, data demo.

Exit codes tell a launcher what to do: 0 done, 2 bad config (do not retry), 3 bad data (do not retry),
1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.errors import DataError, UserError

EXIT_DATA = DataError.exit_code

def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)  # config errors come back before any heavy import
    from surgsigma_train.training.trainer import run_training

    trainer = run_training(cfg)
    print(f"run folder: {trainer.ctx.run_dir}")
    if cfg.eval.after_training and cfg.data.eval:
        return _run_eval(cfg, None)
    return 0


def _run_eval(cfg, checkpoint: Path | None) -> int:
    from surgsigma_train.evaluation.evaluate import evaluate, format_metrics

    metrics = evaluate(cfg, checkpoint)
    print(f"held-out evaluation ({metrics['checkpoint']}):")
    print(format_metrics(metrics))
    print(f"written to {Path(cfg.output.dir) / 'eval' / 'metrics.json'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    # `checkpoint=PATH` is accepted as a short form of `eval.checkpoint=PATH`
    overrides = [f"eval.{o}" if o.startswith("checkpoint=") else o for o in args.overrides]
    cfg = load_recipe(args.recipe, overrides)
    return _run_eval(cfg, Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else None)


def _cmd_validate(args: argparse.Namespace) -> int:
    from surgsigma_train.data.media import MediaError, resolve_media_path
    from surgsigma_train.training.run import format_report, read_samples

    cfg = load_recipe(args.recipe, args.overrides)
    print(f"config {args.recipe}: ok ({cfg.model.family}, source {cfg.model.source})")
    problems = 0
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        try:
            samples, reports = read_samples(sources, cfg.data.task_ids)
        except DataError as exc:
            print(f"{split}: {exc}")
            problems += 1
            continue
        print(format_report(reports))
        problems += sum(len(r.bad) for r in reports)
        missing = []
        for s in samples:
            for ref in s.media:
                try:
                    if not resolve_media_path(Path(s.media_root), ref.path).is_file():
                        missing.append((s.id, ref.path, "file not found"))
                except MediaError as exc:
                    missing.append((s.id, ref.path, exc.reason))
        for sid, path, reason in missing[:20]:
            print(f"    sample {sid}: media {path}: {reason}")
        problems += len(missing)
        videos = len({s.split_key for s in samples})
        print(f"{split}: {len(samples)} samples from {videos} source videos; {len(missing)} media problems")
    if problems:
        print(f"validate: {problems} problems found")
        return EXIT_DATA
    print("validate: ok")
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from surgsigma_train.data.demo import write_demo_dataset

    summary = write_demo_dataset(Path(args.out_dir), seed=args.seed, n_train_videos=args.train_videos,
                                 n_heldout_videos=args.heldout_videos)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    from surgsigma_train.data.encode import SampleEncoder
    from surgsigma_train.models.registry import get_family
    from surgsigma_train.training.run import build_processor, read_samples

    samples, _ = read_samples(cfg.data.train + cfg.data.eval, cfg.data.task_ids)
    match = [s for s in samples if s.id == args.sample]
    if not match:
        raise DataError(f"no sample with id {args.sample!r} in the recipe's train or eval data")
    family = get_family(cfg.model.family)
    encoder = SampleEncoder(build_processor(cfg, family), family, cfg.data, cfg.video, seed=cfg.train.seed)
    report = encoder.inspect(match[0])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgsigma-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("train", _cmd_train, "fine-tune a model as a recipe says"),
        ("eval", _cmd_eval, "evaluate a checkpoint on the recipe's held-out data (checkpoint=PATH)"),
        ("validate", _cmd_validate, "check a recipe and its data without training"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(func=func)
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the synthetic SurgΣ-DB-format demo data set")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-videos", type=int, default=32, help="synthetic training patient videos")
    demo.add_argument("--heldout-videos", type=int, default=4, help="synthetic held-out patient videos")
    demo.set_defaults(func=_cmd_data_demo)
    inspect = data.add_parser("inspect", help="show how one sample is sampled, sized and tokenised")
    inspect.add_argument("recipe")
    inspect.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    inspect.add_argument("--sample", required=True, help="sample id")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
