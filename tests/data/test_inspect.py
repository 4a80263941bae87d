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
