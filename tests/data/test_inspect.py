import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_inspect_json(demo_data):
    anno = json.loads((demo_data / "train.json").read_text())["annos"]
    clip_id = next(a["id"] for a in anno if a["task type"] == [8])
    proc = subprocess.run(
        [sys.executable, "-m", "surgsigma_train.cli", "data", "inspect", "recipes/demo.yaml",
         f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
         "--sample", clip_id, "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["id"] == clip_id and report["task"] == "action_recognition"
    assert report["planned_tokens"] == report["actual_tokens"] <= report["max_seq_len"]
    (video,) = report["videos"]
    assert len(video["frame_indices"]) == 4 and video["backend"] in ("decord", "pyav", "torchcodec")
    assert video["timestamps_s"] == [i / video["source_fps"] for i in video["frame_indices"]]
    assert video["grid_thw"] == video["processor_grid_thw"]
    assert video["decoded_size_HW"] == [128, 224] and video["resized_size_HW"][0] % 28 == 0

    missing = subprocess.run(
        [sys.executable, "-m", "surgsigma_train.cli", "data", "inspect", "recipes/demo.yaml",
         f"data.train.0.path={demo_data / 'train.json'}", "data.eval=[]", "--sample", "nope"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert missing.returncode == 3 and "no sample with id 'nope'" in missing.stderr


# ---- every outcome of `data inspect` on real files, through the real CLI ---------------------------------------------
THINKING = "A grasper is in the upper right of the frame."


def _inspect(data_file: Path, media_root: Path, sample_id: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgsigma_train.cli", "data", "inspect", "recipes/demo.yaml",
         f"data.train.0.path={data_file}", f"data.train.0.media_root={media_root}", "data.eval=[]", *overrides,
         "--sample", sample_id, "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)


def _chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_records(folder: Path, demo_data: Path) -> tuple[Path, Path, dict]:
    """A LLaVA JSONL over the demo media: an image localization sample with reasoning, a clip cut past the end of
    its video, a record whose image is missing (refused at read time)."""
    from PIL import Image

    from surgsigma_train.data.video import probe

    media_root = demo_data / "raw_data"
    image = "DemoLap/frames/VID01/000001.png"
    clip = "DemoLap/clips/VID01/clip_000.mp4"
    duration = probe(media_root / clip).duration_s
    facts = {"image_hw": Image.open(media_root / image).size[::-1], "clip": clip, "clip_duration_s": duration,
             "box": (701, 0, 879, 539)}
    x1, y1, x2, y2 = facts["box"]
    records = [
        {"id": "loc", "task": "instrument_localization", "image": image, "thinking": THINKING,
         "conversations": _chat("<image>\nWhere are the instruments? Answer with bounding boxes.",
                                f"grasper ({x1},{y1}),({x2},{y2})")},
        {"id": "past_end", "task": "action_recognition",
         "videos": [{"path": clip, "start": duration / 2, "end": duration + 4.0}],
         "conversations": _chat("<video>\nWhich basic surgical action does this clip show?", "The action is cutting.")},
        {"id": "refused", "task": "phase_recognition", "image": "DemoLap/frames/VID01/no_such_frame.png",
         "conversations": _chat("<image>\nWhat is the phase?", "Preparation.")},
    ]
    data_file = folder / "records.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data_file, media_root, facts


def test_data_inspect_image_sample_plans_tokens_and_shows_the_target(demo_data, tmp_path):
    import re

    data_file, media_root, facts = _write_records(tmp_path, demo_data)
    proc = _inspect(data_file, media_root, "loc", "data.reasoning=reasoning")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    # an image sample is planned too, and the plan is what the processor produced
    assert report["planned_tokens"] == report["actual_tokens"] <= report["max_seq_len"]
    (image,) = report["images"]
    assert image["size_HW"] == list(facts["image_hw"]) and image["grid_thw"] == image["processor_grid_thw"]
    # the target as trained on: reasoning wrapped in <think>/<answer>, the box in Qwen2.5-VL's convention
    # (absolute pixels of the resized image, not the data's 0-1000 grid)
    assert report["reasoning"] is True
    match = re.fullmatch(r"<think> (.*) </think><answer> (.*) </answer>", report["target"], re.DOTALL)
    assert match and match.group(1) == THINKING
    numbers = re.search(r'"bbox_2d":\s*\[([^\]]*)\]', match.group(2))
    assert numbers and '"grasper"' in match.group(2)
    height, width = image["resized_size_HW"]
    expected = [v / 1000 * size for v, size in zip(facts["box"], (width, height, width, height))]
    got = [float(v) for v in numbers.group(1).split(",")]
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), (got, expected)
    assert got != list(facts["box"])
    assert report["supervised_text"][-1].startswith(report["target"])  # the loss span: the target + end of turn


def test_data_inspect_reports_a_clip_past_the_end_of_its_video(demo_data, tmp_path):
    data_file, media_root, facts = _write_records(tmp_path, demo_data)
    past_end = _inspect(data_file, media_root, "past_end")
    output = past_end.stdout + past_end.stderr
    assert past_end.returncode == 3 and "Traceback" not in output, output[-3000:]
    assert f"{data_file} record past_end" in past_end.stderr
    assert str(media_root / facts["clip"]) in past_end.stderr  # the video file, and why
    assert f"after the end of the {facts['clip_duration_s']:.3f} s video" in past_end.stderr


def test_data_inspect_says_why_a_record_was_refused_when_read(demo_data, tmp_path):
    data_file, media_root, _ = _write_records(tmp_path, demo_data)
    refused = _inspect(data_file, media_root, "refused")
    output = refused.stdout + refused.stderr
    assert refused.returncode == 3 and "Traceback" not in output, output[-3000:]
    assert "was refused when the data was read" in refused.stderr and "no sample with id" not in refused.stderr
    assert f"{data_file} record refused:" in refused.stderr and "no_such_frame.png" in refused.stderr
