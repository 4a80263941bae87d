"""Tests for the synthetic SurgΣ-DB-format demo data set (surgsigma_train.data.demo).

Most tests use the small variant (2 train + 1 held-out video, ~2 s to write); the two learnability
tests use the default size because a nearest-centroid check needs a few train videos to mean anything.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgsigma_train.data import demo

av = pytest.importorskip("av")

SMALL = {"n_train_videos": 2, "n_heldout_videos": 1}
RELEASE_KEYS = ("videos", "images", "annos")
VIDEO_KEYS = ("id", "source dataset", "source url", "clinical specialty", "surgical type", "video path")

CHOLECT50_VERBS = {
    "grasp", "retract", "dissect", "coagulate", "clip", "cut", "aspirate", "irrigate", "pack", "null_verb",
}  # fmt: skip
CHOLECT50_TARGETS = {
    "gallbladder", "cystic_plate", "cystic_duct", "cystic_artery", "cystic_pedicle", "blood_vessel", "fluid",
    "abdominal_wall_cavity", "liver", "adhesion", "omentum", "peritoneum", "gut", "specimen_bag", "null_target",
}  # fmt: skip

_INSTRUMENT = "|".join(demo.INSTRUMENTS)
_CATEGORY = "|".join(name.capitalize() for name in demo.INSTRUMENTS)
_BOX = rf"(?:{_INSTRUMENT}) \(\d+,\d+\),\(\d+,\d+\)"
_TRIPLET = r"<(\w+), (\w+), (\w+)>"
ANSWER_PATTERNS: dict[int, re.Pattern[str]] = {
    demo.TASK_PHASE_RECOGNITION: re.compile(rf"The reflected phase is ({'|'.join(demo.PHASES)})\."),
    demo.TASK_INSTRUMENT_RECOGNITION: re.compile(
        rf"They belong to the categories (?:{_CATEGORY})(?:, (?:{_CATEGORY}))*\.|No tools detected\."
    ),
    demo.TASK_INSTRUMENT_LOCALIZATION: re.compile(rf"{_BOX}(?:; {_BOX})*|No tools detected\."),
    demo.TASK_TRIPLET_RECOGNITION: re.compile(rf"The action triplets are {_TRIPLET}(?:, {_TRIPLET})*\."),
    demo.TASK_SAFETY_ASSESSMENT: re.compile(
        r"Two structures: (yes|no)\. Hepatocystic triangle cleared: (yes|no)\. "
        r"Lower third of gallbladder dissected: (yes|no)\."
    ),
    demo.TASK_ACTION_RECOGNITION: re.compile(rf"The action is ({'|'.join(demo.ACTIONS)})\."),
}
THINKING_PATTERN = re.compile(r"Level 1: .+\. Level 2: .+\. Level 3: .+, so the phase is (.+)\.")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def load_release(root: Path, split: str) -> dict:
    return json.loads((root / f"{split}.json").read_text(encoding="utf-8"))


def media_bytes(root: Path, suffix: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "raw_data").rglob(f"*{suffix}"))}


def decode_with_pyav(path: Path) -> tuple[np.ndarray, float, str, str]:
    """(frames_THWC, average fps, codec name, pixel format) via a real decoder."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        codec, pix_fmt = stream.codec_context.name, stream.codec_context.pix_fmt
        frames_THWC = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return frames_THWC, fps, codec, pix_fmt


def anno_by_task(release: dict, task: int) -> list[dict]:
    return [record for record in release["annos"] if record["task type"] == [task]]


def video_of(record_id: str) -> str:
    match = re.search(r"_(VID\d\d)_", record_id)
    assert match, record_id
    return match.group(1)


def nearest_centroid_accuracy(
    train_X: np.ndarray, train_y: list[str], test_X: np.ndarray, test_y: list[str]
) -> float:
    mean, std = train_X.mean(0), train_X.std(0) + 1e-6
    train_X, test_X = (train_X - mean) / std, (test_X - mean) / std
    labels = sorted(set(train_y))
    centroids = np.stack([train_X[np.array(train_y) == label].mean(0) for label in labels])
    distances = ((test_X[:, None, :] - centroids[None]) ** 2).sum(-1)
    predicted = [labels[i] for i in distances.argmin(1)]
    return float(np.mean([p == t for p, t in zip(predicted, test_y)]))


def colour_4x4(image_HWC: np.ndarray) -> np.ndarray:
    """4x4 block means of the colour image: the 'trivial classifier' input (48 numbers)."""
    height, width, _ = image_HWC.shape
    blocks = image_HWC.astype(np.float32).reshape(4, height // 4, 4, width // 4, 3)
    return blocks.mean(axis=(1, 3)).ravel()


def motion_features(frames_THWC: np.ndarray) -> np.ndarray:
    """Frame-difference features only (no appearance): how much moves when, where, and how periodically."""
    grey_THW = frames_THWC.astype(np.float32).mean(-1)
    diff_THW = np.abs(np.diff(grey_THW, axis=0))
    energy_T = diff_THW.mean(axis=(1, 2))
    height, width = diff_THW.shape[1:]
    where_16 = diff_THW.sum(0).reshape(4, height // 4, 4, width // 4).mean(axis=(1, 3)).ravel()
    spectrum = np.abs(np.fft.rfft(energy_T - energy_T.mean()))
    return np.concatenate(
        [
            energy_T / (energy_T.mean() + 1e-6),
            where_16 / (where_16.sum() + 1e-6),
            spectrum / (spectrum.sum() + 1e-6),
            [energy_T.mean()],
        ]
    )


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_small")
    return root, demo.write_demo_dataset(root, seed=0, **SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_full")
    demo.write_demo_dataset(root, seed=0)
    return root


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_frames(small: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = small
    second = tmp_path / "again"
    demo.write_demo_dataset(second, seed=0, **SMALL)
    for name in ("train.json", "heldout.json", "README.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    first_pngs, second_pngs = media_bytes(first, ".png"), media_bytes(second, ".png")
    assert first_pngs and first_pngs == second_pngs
    first_clips, second_clips = media_bytes(first, ".mp4"), media_bytes(second, ".mp4")
    assert first_clips.keys() == second_clips.keys()
    for relative in first_clips:
        np.testing.assert_array_equal(decode_with_pyav(first / relative)[0], decode_with_pyav(second / relative)[0])


def test_different_seed_gives_different_data(small: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = small
    other = tmp_path / "seed1"
    demo.write_demo_dataset(other, seed=1, **SMALL)
    assert (first / "train.json").read_bytes() != (other / "train.json").read_bytes()
    frame = "raw_data/DemoLap/frames/VID01/000001.png"
    assert (first / frame).read_bytes() != (other / frame).read_bytes()


def test_no_two_frames_are_identical(small: tuple[Path, dict]) -> None:
    root, _ = small
    pngs = media_bytes(root, ".png")
    decoded = {np.asarray(Image.open(root / relative)).tobytes() for relative in pngs}
    assert len(decoded) == len(pngs)


# ---------------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------------


def test_release_layout_and_every_media_file_exists(small: tuple[Path, dict]) -> None:
    root, summary = small
    assert (root / "README.txt").read_text(encoding="utf-8").lower().count("synthetic") >= 1
    all_ids: set[str] = set()
    for split in ("train", "heldout"):
        release = load_release(root, split)
        assert tuple(release) == RELEASE_KEYS
        for key in RELEASE_KEYS:
            ids = [entry["id"] for entry in release[key]]
            assert ids == sorted(ids), f"{split}.{key} not sorted"
        for video in release["videos"]:
            assert tuple(video) == VIDEO_KEYS
            assert video["source dataset"] == "DemoLap" and video["surgical type"] == "Cholecystectomy"
            assert not video["video path"].startswith("/")
            assert (root / "raw_data" / video["video path"]).is_file()
        for image in release["images"]:
            assert not image["image path"].startswith("/")
            assert (root / "raw_data" / image["image path"]).is_file()
        media_ids = {entry["id"] for entry in release["videos"] + release["images"]}
        for record in release["annos"]:
            assert set(record) <= {"id", "images", "task type", "question", "answer", "thinking"}
            assert record["images"] and set(record["images"]) <= media_ids
            assert "<image>" not in record["question"] and "<video>" not in record["question"]
        split_ids = [entry["id"] for key in RELEASE_KEYS for entry in release[key]]
        assert len(split_ids) == len(set(split_ids))
        assert not all_ids & set(split_ids)
        all_ids |= set(split_ids)
        assert summary["splits"][split]["num_annos"] == len(release["annos"])


def test_train_and_heldout_use_disjoint_patient_videos(small: tuple[Path, dict]) -> None:
    root, summary = small
    videos = {}
    for split in ("train", "heldout"):
        release = load_release(root, split)
        ids = [entry["id"] for key in RELEASE_KEYS for entry in release[key]]
        videos[split] = {video_of(record_id) for record_id in ids}
        assert sorted(videos[split]) == summary["splits"][split]["videos"]
    assert videos["train"] == {"VID01", "VID02"} and videos["heldout"] == {"VID03"}


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.write_demo_dataset(tmp_path, seed=-1, **SMALL)
    with pytest.raises(ValueError):
        demo.write_demo_dataset(tmp_path, n_train_videos=2, n_heldout_videos=0)
    with pytest.raises(ValueError):
        demo.write_demo_dataset(tmp_path, n_train_videos=98, n_heldout_videos=2)


# ---------------------------------------------------------------------------------------------------
# clips decode with real decoders
# ---------------------------------------------------------------------------------------------------


def test_clips_decode_to_the_written_frames(small: tuple[Path, dict]) -> None:
    root, _ = small
    clips = sorted((root / "raw_data").rglob("*.mp4"))
    assert len(clips) == 3 * demo.CLIPS_PER_VIDEO
    for clip in clips[:: demo.CLIPS_PER_VIDEO]:
        frames_THWC, fps, codec, pix_fmt = decode_with_pyav(clip)
        assert frames_THWC.shape == (demo.CLIP_NUM_FRAMES, demo.FRAME_HEIGHT, demo.FRAME_WIDTH, 3)
        assert fps == demo.CLIP_FPS and codec == "h264" and pix_fmt == "yuv420p"
        # Motion: consecutive frames differ.
        assert np.abs(np.diff(frames_THWC.astype(np.int16), axis=0)).mean(axis=(1, 2, 3)).min() > 0


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed")
def test_clips_decode_with_decord(small: tuple[Path, dict]) -> None:
    import decord

    root, _ = small
    clip = sorted((root / "raw_data").rglob("*.mp4"))[0]
    reader = decord.VideoReader(str(clip))
    assert len(reader) == demo.CLIP_NUM_FRAMES
    assert reader.get_avg_fps() == pytest.approx(demo.CLIP_FPS)
    frames_THWC = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert frames_THWC.shape == (demo.CLIP_NUM_FRAMES, demo.FRAME_HEIGHT, demo.FRAME_WIDTH, 3)
    # Same bitstream, two decoders: frames agree up to colour-conversion rounding.
    pyav_THWC = decode_with_pyav(clip)[0]
    assert np.abs(frames_THWC.astype(np.int16) - pyav_THWC).mean() < 3.0


# ---------------------------------------------------------------------------------------------------
# tasks and answers
# ---------------------------------------------------------------------------------------------------


def test_all_tasks_present_with_expected_answer_formats(small: tuple[Path, dict]) -> None:
    root, summary = small
    for split in ("train", "heldout"):
        release = load_release(root, split)
        counts = Counter(record["task type"][0] for record in release["annos"])
        assert set(counts) == set(demo.TASK_IDS.values()), counts
        assert dict(counts) == {task: n for task, n in summary["splits"][split]["task_counts"].items() if n}
        for record in release["annos"]:
            (task,) = record["task type"]
            assert ANSWER_PATTERNS[task].fullmatch(record["answer"]), record
        for record in anno_by_task(release, demo.TASK_TRIPLET_RECOGNITION):
            for instrument, verb, target in re.findall(_TRIPLET, record["answer"]):
                assert instrument in demo.INSTRUMENTS and verb in CHOLECT50_VERBS and target in CHOLECT50_TARGETS
    # Some frames show no instrument at all.
    train = load_release(root, "train")
    assert any(r["answer"] == "No tools detected." for r in anno_by_task(train, demo.TASK_INSTRUMENT_LOCALIZATION))


def test_questions_are_paraphrased_per_task(small: tuple[Path, dict]) -> None:
    root, _ = small
    release = load_release(root, "train")
    for task in demo.TASK_IDS.values():
        questions = {record["question"] for record in anno_by_task(release, task)}
        assert questions <= set(demo.QUESTIONS[task])
        assert len(questions) >= 2, task


def test_instrument_answers_agree_across_tasks(small: tuple[Path, dict]) -> None:
    """Recognition, localization and triplets of one frame name the same instruments, in fixed order."""
    root, _ = small
    release = load_release(root, "train")
    by_image: dict[str, dict[int, str]] = {}
    for record in release["annos"]:
        by_image.setdefault(record["images"][0], {})[record["task type"][0]] = record["answer"]
    for image_id, answers in by_image.items():
        if demo.TASK_INSTRUMENT_RECOGNITION not in answers:
            continue  # a clip
        recognised = re.findall(_CATEGORY, answers[demo.TASK_INSTRUMENT_RECOGNITION])
        localised = re.findall(rf"({_INSTRUMENT}) \(", answers[demo.TASK_INSTRUMENT_LOCALIZATION])
        triplets = [t[0] for t in re.findall(_TRIPLET, answers.get(demo.TASK_TRIPLET_RECOGNITION, ""))]
        assert [name.lower() for name in recognised] == localised == triplets, image_id
        assert localised == sorted(localised, key=demo.INSTRUMENTS.index)


def test_localization_boxes_match_the_drawn_instruments(small: tuple[Path, dict]) -> None:
    """Each box is the tight bbox of the pixels carrying that instrument's reserved colours."""
    root, _ = small
    n_boxes = 0
    for split in ("train", "heldout"):
        release = load_release(root, split)
        paths = {image["id"]: image["image path"] for image in release["images"]}
        for record in anno_by_task(release, demo.TASK_INSTRUMENT_LOCALIZATION):
            image_HWC = np.asarray(Image.open(root / "raw_data" / paths[record["images"][0]]).convert("RGB"))
            height, width, _ = image_HWC.shape
            boxes = {
                name: tuple(int(v) for v in coords)
                for name, *coords in re.findall(rf"({_INSTRUMENT}) \((\d+),(\d+)\),\((\d+),(\d+)\)", record["answer"])
            }
            for name in demo.INSTRUMENTS:
                shaft_rgb, tip_rgb = demo.INSTRUMENT_COLOURS_RGB[name]
                carries_colour = np.all(image_HWC == shaft_rgb, -1) | np.all(image_HWC == tip_rgb, -1)
                if name not in boxes:
                    assert not carries_colour.any(), (record["id"], name)
                    continue
                x1, y1, x2, y2 = boxes[name]
                assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
                rows, cols = np.nonzero(carries_colour)
                expected = demo.box_to_1000_grid(cols.min(), rows.min(), cols.max(), rows.max(), width, height)
                assert (x1, y1, x2, y2) == expected, record["id"]
                # A real instrument, not a few stray pixels, and its shaft enters from an image border.
                assert carries_colour.sum() >= 40
                assert cols.min() == 0 or rows.min() == 0 or cols.max() == width - 1 or rows.max() == height - 1
                n_boxes += 1
    assert n_boxes > 50


def test_cvs_only_on_dissection_phase_frames(small: tuple[Path, dict]) -> None:
    root, _ = small
    release = load_release(root, "train")
    phase_of = {
        record["images"][0]: ANSWER_PATTERNS[demo.TASK_PHASE_RECOGNITION].fullmatch(record["answer"]).group(1)
        for record in anno_by_task(release, demo.TASK_PHASE_RECOGNITION)
    }
    cvs = anno_by_task(release, demo.TASK_SAFETY_ASSESSMENT)
    assert {phase_of[record["images"][0]] for record in cvs} == {"Calot Triangle Dissection", "Clipping and Cutting"}
    assert len({record["answer"] for record in cvs}) >= 2
    # Every frame of those phases is assessed.
    assert len(cvs) == sum(p in ("Calot Triangle Dissection", "Clipping and Cutting") for p in phase_of.values())


def test_a_third_of_phase_records_carry_three_level_reasoning(small: tuple[Path, dict]) -> None:
    root, summary = small
    release = load_release(root, "train")
    phase_records = anno_by_task(release, demo.TASK_PHASE_RECOGNITION)
    with_thinking = [record for record in phase_records if "thinking" in record]
    assert all("thinking" not in record for record in release["annos"] if record not in phase_records)
    assert 0.28 <= len(with_thinking) / len(phase_records) <= 0.38
    assert summary["splits"]["train"]["num_thinking"] == len(with_thinking)
    for record in with_thinking:
        match = THINKING_PATTERN.fullmatch(record["thinking"])
        assert match, record["thinking"]
        assert record["answer"] == f"The reflected phase is {match.group(1)}."


def test_phases_in_procedure_order_within_each_video(small: tuple[Path, dict]) -> None:
    root, _ = small
    release = load_release(root, "train")
    per_video: dict[str, list[int]] = {}
    for record in anno_by_task(release, demo.TASK_PHASE_RECOGNITION):
        phase = ANSWER_PATTERNS[demo.TASK_PHASE_RECOGNITION].fullmatch(record["answer"]).group(1)
        per_video.setdefault(video_of(record["id"]), []).append(demo.PHASES.index(phase))
    for video, sequence in per_video.items():
        assert sequence == sorted(sequence) and set(sequence) == set(range(len(demo.PHASES))), video
        assert demo.MIN_FRAMES_PER_VIDEO <= len(sequence) <= demo.MAX_FRAMES_PER_VIDEO


def test_actions_are_balanced_over_the_data_set(small: tuple[Path, dict]) -> None:
    root, _ = small
    actions = Counter()
    for split in ("train", "heldout"):
        for record in anno_by_task(load_release(root, split), demo.TASK_ACTION_RECOGNITION):
            actions[ANSWER_PATTERNS[demo.TASK_ACTION_RECOGNITION].fullmatch(record["answer"]).group(1)] += 1
    assert set(actions) == set(demo.ACTIONS)  # 18 clips cover all 10 actions
    assert max(actions.values()) - min(actions.values()) <= 1


# ---------------------------------------------------------------------------------------------------
# learnability: the pictures really determine the answers
# ---------------------------------------------------------------------------------------------------


def phase_dataset(root: Path, split: str) -> tuple[np.ndarray, list[str]]:
    release = load_release(root, split)
    paths = {image["id"]: image["image path"] for image in release["images"]}
    features, labels = [], []
    for record in anno_by_task(release, demo.TASK_PHASE_RECOGNITION):
        image_HWC = np.asarray(Image.open(root / "raw_data" / paths[record["images"][0]]).convert("RGB"))
        features.append(colour_4x4(image_HWC))
        labels.append(record["answer"])
    return np.stack(features), labels


def action_dataset(root: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    release = load_release(root, split)
    paths = {video["id"]: video["video path"] for video in release["videos"]}
    clips, labels = [], []
    for record in anno_by_task(release, demo.TASK_ACTION_RECOGNITION):
        clips.append(decode_with_pyav(root / "raw_data" / paths[record["images"][0]])[0])
        labels.append(record["answer"])
    return clips, labels


def test_phase_is_learnable_from_4x4_colour_by_nearest_centroid(full: Path) -> None:
    train_X, train_y = phase_dataset(full, "train")
    test_X, test_y = phase_dataset(full, "heldout")
    assert len(set(test_y)) == len(demo.PHASES)
    accuracy = nearest_centroid_accuracy(train_X, train_y, test_X, test_y)
    assert accuracy >= 0.9, accuracy


def test_action_is_learnable_from_motion_alone(full: Path) -> None:
    train_clips, train_y = action_dataset(full, "train")
    test_clips, test_y = action_dataset(full, "heldout")
    train_X = np.stack([motion_features(clip) for clip in train_clips])
    test_X = np.stack([motion_features(clip) for clip in test_clips])
    accuracy = nearest_centroid_accuracy(train_X, train_y, test_X, test_y)
    chance = 1 / len(demo.ACTIONS)
    assert accuracy >= 6 * chance, accuracy
