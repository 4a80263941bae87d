"""Speed of the preflight (`surgsigma-train validate`) on 10,000 generated records.

    .venv/bin/python bench/validate_speed.py                  # 10,000 records, 300 videos, 400 images
    .venv/bin/python bench/validate_speed.py --records 2000   # quick

Writes LLaVA-format JSONL records (70% one image, 30% one video clip) referencing a few hundred small generated
media files (H.264 mp4s of 60 frames at 128x64, 10 fps, and 96x64 PNGs) under a temporary folder, then runs the
full preflight of the demo recipe (qwen2_5_vl, tiny source: the real Qwen tokenizer) over them with 1 and 2
decoder processes. Each distinct video is probed and its first and last frames decoded once, in a child process
with a timeout; each image is decoded fully; every record is tokenised and its visual tokens planned.
Prints records/s, videos probed per second, the time of each phase (best of 2 interleaved rounds), and last
`validate_records_per_s=X` (the 2-process run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgsigma_train.config.loading import load_recipe  # noqa: E402
from surgsigma_train.data.preflight import run_preflight  # noqa: E402
from tests.data.video.video_media import encode_video  # noqa: E402


def write_data(root: Path, records: int, videos: int, images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "vid").mkdir(parents=True)
    (root / "img").mkdir()
    for v in range(videos):
        encode_video(root / "vid" / f"v{v:04d}.mp4", 60)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "img" / f"i{i:04d}.png")
    with (root / "train.jsonl").open("w") as fh:
        for r in range(records):
            if rng.random() < 0.3:
                start = float(rng.integers(0, 4))
                media = {"videos": [{"path": f"vid/v{rng.integers(videos):04d}.mp4", "start": start, "end": start + 2}]}
                task, question, answer = "action_recognition", "<video>\nWhich action is shown?", "dissection"
            else:
                media = {"images": [f"img/i{rng.integers(images):04d}.png"]}
                task, question, answer = "phase_recognition", "<image>\nWhich phase?", "The phase is Preparation."
            fh.write(json.dumps({"id": f"r{r}", "task": task, **media, "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}) + "\n")
    return root / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = write_data(Path(tmp) / "data", args.records, args.videos, args.images)
        print(f"generated {args.records} records, {args.videos} videos, {args.images} images "
              f"in {time.perf_counter() - start:.1f} s")
        cfg = load_recipe(REPO / "recipes" / "demo.yaml", [f"data.train.0.path={data}", "data.eval=[]",
                                                           f"output.dir={Path(tmp) / 'run'}"])
        rates: dict[int, float] = {}
        for round_ in range(args.rounds):  # interleaved rounds, best of each: the machine is shared
            for workers in (1, 2):
                start = time.perf_counter()
                result = run_preflight(cfg, workers=workers)
                seconds = time.perf_counter() - start
                assert len(result.clean) == args.records and not result.bad, result.summary()["bad_reasons"]
                t = result.timings_s
                rates[workers] = max(rates.get(workers, 0.0), args.records / seconds)
                print(f"round {round_ + 1}, {workers} decoder process(es): {seconds:.1f} s, "
                      f"{args.records / seconds:.0f} records/s; "
                      f"{result.videos_probed} videos + {result.images_checked} images checked in {t['media']:.1f} s "
                      f"({result.videos_probed / t['media']:.0f} videos/s with the images alongside); "
                      f"read {t['read']:.1f} s, token planning {t['plan']:.1f} s")
    print(f"best records/s: 1 process {rates[1]:.0f}, 2 processes {rates[2]:.0f}")
    print(f"validate_records_per_s={rates[2]:.0f}")


if __name__ == "__main__":
    main()
