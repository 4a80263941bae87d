"""`surgsigma-train`: train, eval, validate, data demo.

Exit codes tell a launcher what to do (surgsigma_train/errors.py): 0 done, 1 anything unexpected,
2 bad config, 3 bad data, 4 training diverged (these three: do not retry), 75 preempted after saving a
committed checkpoint and 76 infrastructure failure (collective timeout, lost peer, I/O): requeue or
retry, `train` resumes by itself. Under torchrun, which reports any failed worker as 1, rank 0 also
writes the code to RUN_DIR/exit_status.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
import weakref
from pathlib import Path

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.errors import EXIT_PREEMPTED, DataError, InfraError, InternalError, Preempted, UserError

EXIT_DATA = DataError.exit_code

def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)  # config errors come back before any heavy import
    from surgsigma_train.training.trainer import run_training

    trainer = run_training(cfg)
    run_dir, dist, step = trainer.ctx.run_dir, trainer.dist, trainer.state.step
    print(f"run folder: {run_dir}")
    if not (cfg.eval.after_training and (cfg.data.eval or cfg.data.split is not None)):
        return 0
    trained_model = weakref.ref(trainer.model)
    del trainer  # the engine, optimizer, model and loader go before the evaluation model is loaded
    return _eval_after_training(cfg, run_dir, dist, step, trained_model)


def _eval_after_training(cfg, run_dir: Path, dist, step: int, trained_model: weakref.ref) -> int:
    """eval.after_training: once, on rank 0, after every rank has freed its engine, optimizer and model and
    left the process group (the other ranks then exit 0 instead of idling on a collective with a timeout)."""
    import torch

    from surgsigma_train.training import checkpoint as ckpt

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if trained_model() is not None:
        print(f"rank {dist.rank}: WARNING: the trained model is still referenced; evaluation loads a second copy",
              file=sys.stderr)
    dist.barrier()  # every rank has finished training and freed its share
    if dist.active:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if not dist.is_main:
        print(f"rank {dist.rank}: training done; evaluation after training runs on rank 0 only")
        return 0
    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints")
    print(f"rank {dist.rank}: evaluating after training (world size {dist.world_size})")
    try:
        return _run_eval(cfg, checkpoint)
    except UserError as exc:  # exit_status.json said "done": the launcher must see the evaluation's failure
        (run_dir / "exit_status.json").write_text(json.dumps(
            {"exit_code": exc.exit_code, "step": step, "message": f"evaluation after training: {exc}"}, indent=2))
        raise


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
    from surgsigma_train.data.preflight import format_preflight, run_preflight
    from surgsigma_train.training.run import format_report

    cfg = load_recipe(args.recipe, args.overrides)
    print(f"config {args.recipe}: ok ({cfg.model.family}, source {cfg.model.source})")
    result = run_preflight(cfg, workers=args.workers, timeout_s=args.timeout)
    if result.reports:
        print(format_report(result.reports))  # what each reader did: formats, exclusions, repairs, unmapped fields
    for split, (n, videos) in result.read.items():
        media = [f for f in result.bad if f.split == split and f.media is not None]
        for f in media[:20]:
            print(f"    sample {f.id}: media {f.media}: {f.reason}")
        print(f"{split}: {n} samples from {videos} source videos; {len(media)} media problems")
    print(format_preflight(result, Path(cfg.output.dir) / "preflight"))
    train = [s for split, s, _ in result.clean if split == "train"]
    evals = [s for split, s, _ in result.clean if split == "eval"]
    problems = 0
    if train:  # the split (data.split, no video on both sides) and the mixture weights' names, on the clean data
        from surgsigma_train.data.mixture import Mixture, format_mixture
        from surgsigma_train.data.splits import SampleColumns
        from surgsigma_train.training.run import apply_split

        try:
            train, _, _ = apply_split(cfg, train, evals)
            print(format_mixture(Mixture(SampleColumns.from_samples(train), cfg.data.mixture, seed=cfg.train.seed)))
        except UserError as exc:
            print(f"split/mixture: {exc}")
            problems += 1
    else:
        print("validate: no clean training sample")
        problems += 1
    if problems or not result.ok:
        print(f"validate: {problems + len(result.bad)} problems found")
        return EXIT_DATA
    print("validate: ok" + (f" ({len(result.bad)} bad records within data.max_bad_fraction)" if result.bad else ""))
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from surgsigma_train.data.demo import write_demo_dataset

    summary = write_demo_dataset(Path(args.out_dir), seed=args.seed, n_train_videos=args.train_videos,
                                 n_heldout_videos=args.heldout_videos)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from surgsigma_train.data.convert import convert_dataset, parse_video_selection

    summary, bad = convert_dataset(
        args.dataset, Path(args.input), Path(args.out), videos=parse_video_selection(args.videos),
        frame_pattern=args.frame_pattern, video_pattern=args.video_pattern, fps=args.fps, split=args.split,
        include_interpolated=args.include_interpolated)
    for b in bad:  # every unusable row, so that nothing is dropped unseen
        print(f"unusable: {b.file} {b.record}: {b.reason}", file=sys.stderr)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_data_index(args: argparse.Namespace) -> int:
    from surgsigma_train.config.schema import DEFAULT_TASK_IDS
    from surgsigma_train.data.index import build_index

    # Given entries are the whole map, as data.task_ids in a recipe is: the same entries in both agree.
    task_ids = {} if args.task_ids else dict(DEFAULT_TASK_IDS)
    for pair in args.task_ids:
        tid, sep, name = (part.strip() for part in pair.partition("="))
        if not sep or not tid.isdigit() or not name:
            raise DataError(f"--task-ids entry {pair!r} is not ID=NAME")
        if int(tid) in task_ids:
            raise DataError(f"--task-ids gives id {int(tid)} twice")
        task_ids[int(tid)] = name
    manifest = build_index(args.source, args.out_dir, task_ids, fmt=args.format, media_root=args.media_root,
                           check_media=not args.no_check_media, shard_rows=args.shard_rows)
    summary = {k: v for k, v in manifest["report"].items() if k != "bad"}
    print(json.dumps({"index": args.out_dir, "shards": len(manifest["shards"]), **summary}, indent=2))
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    from surgsigma_train.data.encode import EncodeError, SampleEncoder
    from surgsigma_train.data.media import MediaError
    from surgsigma_train.data.video.planning import PlanningError
    from surgsigma_train.models.registry import get_family
    from surgsigma_train.training.run import build_processor, read_samples

    match, refused = [], []
    for source in cfg.data.train + cfg.data.eval:  # one source at a time, so the sample's data file is known
        samples, reports = read_samples([source], cfg.data.task_ids)
        match += [(source.path, s) for s in samples if s.id == args.sample]
        refused += [b for r in reports for b in r.bad if args.sample in (b.record, f"{Path(b.file).name}:{b.record}")]
    if not match and refused:  # refused at read time: say why, as validate would
        raise DataError(f"sample {args.sample!r} was refused when the data was read: "
                        + "; ".join(f"{b.file} record {b.record}: {b.reason}" for b in refused))
    if not match:
        raise DataError(f"no sample with id {args.sample!r} in the recipe's train or eval data")
    data_file, sample = match[0]
    family = get_family(cfg.model.family)
    encoder = SampleEncoder(build_processor(cfg, family), family, cfg.data, cfg.video, seed=cfg.train.seed)
    try:
        report = encoder.inspect(sample)
    except (MediaError, EncodeError, PlanningError) as exc:  # what would drop the sample in training (VideoError too)
        raise DataError(f"{data_file} record {sample.id} ({sample.task}) cannot be encoded, training drops it: "
                        f"{exc}") from exc
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    from surgsigma_train.data.stats import compute_stats, format_stats

    print(format_stats(compute_stats(cfg, args.max_samples)))
    return 0


def _cmd_launch_slurm(args: argparse.Namespace) -> int:
    from surgsigma_train.launch.slurm import SlurmJob, prepare_launch, submit

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                   account=args.account, signal_lead_s=args.signal_lead, extra=args.sbatch_arg)
    recipe, script = prepare_launch(args.recipe, args.overrides, job)
    print(f"recipe: {recipe}\nbatch script: {script}")
    if not args.dry_run:
        print(f"submitted job {submit(script)} (log: {job.output})")
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
        if name == "validate":
            p.add_argument("--workers", type=int, default=2, help="video probe processes working in parallel")
            p.add_argument("--timeout", type=float, default=None,
                           help="seconds per video probe/decode (default: video.decode_timeout_s)")
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the synthetic SurgΣ-DB-format demo data set")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-videos", type=int, default=32, help="synthetic training patient videos")
    demo.add_argument("--heldout-videos", type=int, default=4, help="synthetic held-out patient videos")
    demo.set_defaults(func=_cmd_data_demo)
    inspect = data.add_parser("inspect", help="show how one sample is sampled, sized and tokenised, and its training "
                              "target (exit 3 with the reason when it cannot be encoded or was refused when read)")
    inspect.add_argument("recipe")
    inspect.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    inspect.add_argument("--sample", required=True, help="sample id")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_data_inspect)
    index = data.add_parser("index", help="build the memory-mapped Arrow sample index of a large source "
                            "(offline, resumable: rerun after a kill to continue)")
    index.add_argument("source", help="SurgΣ-DB release JSON, JSON list or JSONL")
    index.add_argument("out_dir", help="index directory (a recipe data source path may name it)")
    index.add_argument("--task-ids", nargs="*", default=[], metavar="ID=NAME",
                       help="the task-id map, whole: the entries given replace the default 18-id map (ids not "
                       "listed are unknown), exactly as data.task_ids does in a recipe, whose map must equal this one")
    index.add_argument("--format", default="auto", choices=["auto", "surgsigma", "llava", "openai"])
    index.add_argument("--media-root", default=None, help="default: the source's folder, or its raw_data/")
    index.add_argument("--no-check-media", action="store_true",
                       help="do not look media up (no VIDn repair, missing files not reported)")
    index.add_argument("--shard-rows", type=int, default=262_144)
    index.set_defaults(func=_cmd_data_index)
    stats = data.add_parser("stats", help="counts by task/specialty/source/split and token lengths per task")
    stats.add_argument("recipe")
    stats.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    stats.add_argument("--max-samples", type=int, default=None, metavar="N",
                       help="measure token lengths on N samples evenly spaced over the data (counts use all)")
    stats.set_defaults(func=_cmd_data_stats)
    convert = data.add_parser("convert", help="turn Cholec80 / CholecT50 / Endoscapes label files into a "
                              "SurgΣ-DB-layout JSON")
    convert.add_argument("--from", dest="dataset", required=True, choices=("cholec80", "cholect50", "endoscapes"))
    convert.add_argument("--input", required=True, help="the data set's folder as published")
    convert.add_argument("--out", required=True, help="JSON file to write")
    convert.add_argument("--videos", help="only these video numbers, e.g. 1-40,45")
    convert.add_argument("--frame-pattern", help="frame path under the data root, e.g. "
                         "'Cholec80/frames/video{video:02d}/{index:06d}.png' (fields: video, frame[, index])")
    convert.add_argument("--video-pattern", help="video path for the video table (field: video)")
    convert.add_argument("--fps", type=float, help="cholec80: frames sampled per second (default 1)")
    convert.add_argument("--split", help="endoscapes: only the videos of SPLIT_vids.txt (train, val, test)")
    convert.add_argument("--include-interpolated", action="store_true", default=None,
                         help="endoscapes: also convert rows interpolated between rater-annotated frames")
    convert.set_defaults(func=_cmd_data_convert)
    launch = sub.add_parser("launch", help="multi-node launchers").add_subparsers(dest="launch_command", required=True)
    slurm = launch.add_parser("slurm", help="write <output.dir>/launch/{recipe.yaml,train.sbatch} and sbatch it "
                              "(preemption: save, requeue, resume)")
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*", help="key.sub=value overrides (baked into the written recipe)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU processes")
    slurm.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs, or 1)")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's task (all its processes)")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit, e.g. 24:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--signal-lead", type=int, default=300, metavar="S",
                       help="SIGUSR2 this many seconds before the time limit (enough to save a checkpoint)")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                       help="another #SBATCH option, e.g. --sbatch-arg=--qos=high (repeatable)")
    slurm.add_argument("--dry-run", action="store_true", help="write the files, do not submit")
    slurm.set_defaults(func=_cmd_launch_slurm)
    return parser


def _finish_distributed(code: int) -> int:
    """Under torchrun: ranks that ended together (done, preempted) meet at a barrier, then leave with
    os._exit, which avoids gloo's occasional abort at interpreter exit. A rank that failed alone leaves
    at once (a barrier would wait for peers that are not coming; the launcher stops them)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return code
    if code in (0, EXIT_PREEMPTED):
        try:
            dist.barrier()
        except Exception:  # a peer gone by now changes nothing about this rank's result
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, InternalError, InfraError, Preempted) as exc:
        print(f"{'stopped' if isinstance(exc, Preempted) else 'error'}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except BaseException as exc:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_initialized():
            raise
        traceback.print_exc()
        code = InfraError.exit_code if isinstance(exc, dist.DistError) else 1
    return _finish_distributed(code)


if __name__ == "__main__":
    sys.exit(main())
