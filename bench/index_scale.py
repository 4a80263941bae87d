"""SurgΣ-DB Arrow sample index at full scale: build RAM and time, disk size, random access, worker memory.

    .venv/bin/python bench/index_scale.py                   # 6 M annotations (~2.5 GB of JSON, cached)
    .venv/bin/python bench/index_scale.py --records 200000  # quick run

Writes a release-layout document (video table, image table, `annos`) under the cache dir (reused when
present), builds the index in a child process while sampling its RSS (and its children's), then measures
`index[i]` latency and the memory growth of 4 DataLoader workers each reading 20k random samples. Worker
memory comes from /proc/<pid>/smaps_rollup: memory-mapped shard pages are file-backed and shared, so the
growth of USS (pages private to the worker: its own allocations and copy-on-write copies of the parent's
pages) is what each worker really costs; RSS (counts shared pages) and PSS are printed next to it.
Targets: build peak RSS <= 4 GB, < 200 MB growth per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgsigma_train.data.index import SampleIndex  # noqa: E402

GB, MB = 1024 ** 3, 1024 ** 2
PHASES = ["Preparation", "Calot Triangle Dissection", "Clipping Cutting", "Gallbladder Dissection",
          "Gallbladder Packaging", "Cleaning Coagulation", "Gallbladder Retraction"]
TOOLS = ["grasper", "bipolar", "hook", "scissors", "clipper", "irrigator", "specimen bag"]
TARGETS = ["gallbladder", "cystic duct", "cystic artery", "liver", "omentum", "peritoneum", "fluid"]
ACTIONS = ["aspiration", "clipping", "coagulation", "dissection", "knot-tying", "needle grasping",
           "needle puncture", "packaging", "suture pulling", "tissue retraction"]


def _answer(task: int, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of a realistic length (100-300 bytes together) for a task id."""
    tool, target, phase = rng.choice(TOOLS), rng.choice(TARGETS), rng.choice(PHASES)
    if task == 1:
        x, y = rng.randrange(0, 500), rng.randrange(0, 500)
        return ("Locate every surgical instrument visible in this laparoscopic frame and give its bounding box.",
                f"{tool} ({x},{y}),({x + rng.randrange(50, 400)},{y + rng.randrange(50, 400)})")
    if task == 5:
        return ("Which surgical phase of the laparoscopic cholecystectomy does this frame show? Answer briefly.",
                f"The reflected phase is {phase}.")
    if task == 8:
        return ("Which of the basic surgical actions is performed in this clip?",
                f"The action performed in the clip is {rng.choice(ACTIONS)}.")
    if task == 9:
        return ("Describe the instrument-verb-target triplets in this frame.",
                f"The triplet is <{tool}, {rng.choice(['retract', 'dissect', 'grasp', 'coagulate'])}, {target}>.")
    if task == 13:
        return ("Describe what happens in this surgical video clip in temporal order.",
                f"The {tool} retracts the {target}, then the hook dissects along the {rng.choice(TARGETS)}, "
                f"then the {rng.choice(TOOLS)} is withdrawn from the field of view.")
    if task == 7:
        return "Remove the surgical smoke from this frame.", "dense_prediction/desmoke/000510.png"
    return ("Which instruments are visible in this frame? List their categories.",
            f"They belong to the categories {tool.capitalize()}, {rng.choice(TOOLS).capitalize()}.")


def generate(path: Path, records: int, seed: int = 0) -> None:
    """A release-layout document: ~records/2 frames (1 fps, 40 frames a video), 1 clip per 50 records."""
    rng = random.Random(seed)
    n_images, n_clips = max(1, records // 2), max(1, records // 50)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", buffering=16 * MB) as fh:
        fh.write('{"video_list": [')
        for c in range(n_clips):
            v = c % 80 + 1
            start = rng.randrange(0, 1800)
            fh.write(("," if c else "") + json.dumps({
                "id": f"clip{c}", "source dataset": "Cholec80", "source url": "http://camma.u-strasbg.fr/datasets",
                "clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy",
                "video path": f"Cholec80/videos/video{v:02d}.mp4", "start": start, "end": start + 23}))
        fh.write('],\n"image_list": [')
        for i in range(n_images):
            fh.write(("," if i else "") + json.dumps(
                {"id": f"img{i}", "image path": f"CholecT50/videos/VID{i // 40 % 99 + 1:02d}/{i % 40 * 25:06d}.png"}))
        fh.write('],\n"annos": [')
        tasks = [1, 2, 5, 5, 5, 9, 2, 1, 9, 5] * 9 + [8, 13, 7]  # mostly image tasks, some clips, a few excluded
        for a in range(records):
            task = rng.choice(tasks)
            media = f"clip{rng.randrange(n_clips)}" if task in (8, 13) else f"img{rng.randrange(n_images)}"
            question, answer = _answer(task, rng)
            record = {"id": f"anno{a}", "images": [media], "task type": [task], "question": question,
                      "answer": answer}
            if a % 5 == 0:
                record["thinking"] = ("Level 1: a hook and a grasper; the gallbladder is exposed. Level 2: the "
                                      "grasper retracts while the hook dissects. Level 3: " + answer)
            fh.write(("," if a else "") + json.dumps(record))
        fh.write("]}\n")
    tmp.rename(path)


def build_in_child(source: Path, out: Path) -> dict:
    """Build in a child process; peak RSS = max of sampled RSS (child + its children) and the child's own HWM."""
    code = ("import json, resource, time; from surgsigma_train.config.schema import DEFAULT_TASK_IDS; "
            "from surgsigma_train.data.index import build_index; t = time.perf_counter(); "
            f"m = build_index({str(source)!r}, {str(out)!r}, DEFAULT_TASK_IDS, check_media=False); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'hwm_kb': "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'report': {k: v for k, v in m['report'].items() "
            "if k != 'bad'}, 'bad': len(m['report']['bad']), 'shards': len(m['shards'])}))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    out_text = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"index build failed (exit {proc.returncode})")
    result = json.loads(out_text.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss"] = max(peak, result["hwm_kb"] * 1024)
    return result


def smaps(pid: int) -> dict[str, int]:
    """Bytes per field of /proc/<pid>/smaps_rollup (Rss, Pss, Private_*, Anonymous...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    fields["Uss"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields


class _Reader(torch.utils.data.Dataset):
    """Reads whole samples (all fields) and reports this worker's memory with every batch."""

    def __init__(self, index: SampleIndex):
        self.index, self.baseline = index, None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        if self.baseline is None:  # before this worker touches the index (its open is counted as growth)
            self.baseline = smaps(os.getpid())
        s = self.index[i]
        return len(s.messages[-1].content) + len(s.media)

    def collate(self, batch: list[int]) -> tuple[int, dict, dict, int]:
        return os.getpid(), self.baseline, smaps(os.getpid()), len(batch)


def worker_growth(index: SampleIndex, workers: int, per_worker: int, batch: int = 500) -> dict[int, dict]:
    fresh = pickle.loads(pickle.dumps(index))  # unopened: each worker maps the shards itself
    dataset = _Reader(fresh)
    rng = np.random.default_rng(1)
    order = rng.integers(0, len(index), workers * per_worker).reshape(-1, batch).tolist()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: on purpose
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=workers,
                                         collate_fn=dataset.collate, prefetch_factor=2)
    seen: dict[int, dict] = {}
    for pid, base, now, n in loader:
        entry = seen.setdefault(pid, {"base": base, "samples": 0})
        entry["now"], entry["samples"] = now, entry["samples"] + n
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6_000_000)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/surgsigma_train/bench/index")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--per-worker", type=int, default=20_000)
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    source = args.cache_dir / f"release-{args.records}.json"
    if not source.exists():
        t = time.perf_counter()
        generate(source, args.records)
        print(f"generated {source} ({source.stat().st_size / GB:.2f} GB) in {time.perf_counter() - t:.0f} s")
    else:
        print(f"reusing {source} ({source.stat().st_size / GB:.2f} GB)")
    out = args.cache_dir / f"index-{args.records}"
    shutil.rmtree(out, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / GB:.0f} GB RAM, Python {platform.python_version()}")
    build = build_in_child(source, out)
    disk = sum(p.stat().st_size for p in out.iterdir())
    rep = build["report"]
    print(f"build: {build['seconds']:.0f} s ({args.records / build['seconds']:,.0f} records/s), "
          f"{rep['records']:,} records -> {rep['samples']:,} samples, {sum(rep['excluded'].values()):,} excluded, "
          f"{build['bad']:,} bad, {build['shards']} shards")
    print(f"build peak RSS: {build['peak_rss'] / GB:.2f} GB (target <= 4 GB: {build['peak_rss'] / (4 * GB):.2f}x)")
    print(f"on disk: {disk / GB:.2f} GB ({disk / max(rep['samples'], 1):.0f} B/sample; "
          f"source JSON {source.stat().st_size / GB:.2f} GB)")

    index = SampleIndex(out)
    picks = np.random.default_rng(0).integers(0, len(index), 10_000)
    t0 = time.perf_counter()
    index[0]
    open_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for i in picks:
        t = time.perf_counter()
        index[int(i)]
        times.append(time.perf_counter() - t)
    p50, p99 = np.percentile(times, [50, 99]) * 1e6
    print(f"random access index[i] over 10k i: p50 {p50:.0f} us, p99 {p99:.0f} us (first call, opening "
          f"{len(index.manifest['shards'])} shards: {open_ms:.0f} ms; page cache warm from the build)")

    grown = worker_growth(index, args.workers, args.per_worker)
    worst = {}
    for pid, w in sorted(grown.items()):
        delta = {k: (w["now"][k] - w["base"][k]) / MB for k in ("Rss", "Pss", "Uss", "Anonymous")}
        worst = {k: max(worst.get(k, -1e9), v) for k, v in delta.items()}
        print(f"worker {pid}: {w['samples']:,} samples, growth RSS {delta['Rss']:+.1f} MB, PSS {delta['Pss']:+.1f} MB, "
              f"USS {delta['Uss']:+.1f} MB, anonymous {delta['Anonymous']:+.1f} MB (now RSS "
              f"{w['now']['Rss'] / MB:.0f} MB, of it shared file pages {w['now'].get('Shared_Clean', 0) / MB:.0f} MB)")
    print(f"worker growth, worst of {len(grown)}: USS {worst['Uss']:.1f} MB, PSS {worst['Pss']:.1f} MB, "
          f"RSS {worst['Rss']:.1f} MB (target < 200 MB: {worst['Uss'] / 200:.2f}x)")
    print(f"peak_build_rss_gb={build['peak_rss'] / GB:.2f} worker_rss_growth_mb={worst['Uss']:.1f}")


if __name__ == "__main__":
    main()
