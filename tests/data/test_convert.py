"""Converters from Cholec80 / CholecT50 / Endoscapes label files (written here in their published formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgsigma_train.cli import main
from surgsigma_train.config.schema import DEFAULT_TASK_IDS, DataSource
from surgsigma_train.data.convert import convert_dataset, parse_video_selection
from surgsigma_train.data.demo import QUESTIONS
from surgsigma_train.data.readers import read_file, read_source
from surgsigma_train.errors import ConfigError, DataError

PHASE, INSTRUMENTS, TRIPLETS, CVS = 5, 2, 9, 11
HEPATOBILIARY = {"source url": None, "clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy"}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def conversations(release: dict) -> list[tuple[str, list[str], list[int], str]]:
    """(id, images, task type, answer) of every record; questions are checked separately."""
    for anno in release["annos"]:
        assert anno["question"] in QUESTIONS[anno["task type"][0]], anno
    return [(a["id"], a["images"], a["task type"], a["answer"]) for a in release["annos"]]


def video_table(release: dict) -> list[dict]:
    return [{**v, "source url": None} for v in release["videos"]]


# ------------------------------------------------------------------------------------------ Cholec80
@pytest.fixture
def cholec80(tmp_path: Path) -> Path:
    root = tmp_path / "cholec80"
    phases = ["Frame\tPhase"] + [f"{f}\t{'Preparation' if f < 30 else 'CalotTriangleDissection'}" for f in range(60)]
    phases += ["60\tWashing", "x61\tPreparation"]
    write(root / "phase_annotations/video01-phase.txt", "\n".join(phases) + "\n")
    write(root / "tool_annotations/video01-tool.txt",
          "Frame\tGrasper\tBipolar\tHook\tScissors\tClipper\tIrrigator\tSpecimenBag\n"
          "0\t1\t0\t1\t0\t0\t0\t0\n25\t0\t0\t0\t0\t0\t0\t0\n50\t1\t0\t0\t0\t0\t0\t1\n75\t1\t0\n100\t2\t0\t0\t0\t0\t0\t0\n")
    write(root / "phase_annotations/video12-phase.txt",
          "Frame\tPhase\n" + "".join(f"{f}\tGallbladderRetraction\n" for f in range(26)))
    write(root / "phase_annotations/readme.txt", "not a label file\n")
    return root


def test_cholec80_phase_and_tools_at_1_fps(cholec80: Path, tmp_path: Path) -> None:
    out = tmp_path / "c80.json"
    summary, bad = convert_dataset("cholec80", cholec80, out)
    release = json.loads(out.read_text(encoding="utf-8"))
    assert list(release) == ["videos", "images", "annos"]
    assert conversations(release) == [
        ("Cholec80_VID01_000000_phase", ["Cholec80_VID01_000000"], [PHASE], "The reflected phase is Preparation."),
        ("Cholec80_VID01_000025_phase", ["Cholec80_VID01_000025"], [PHASE], "The reflected phase is Preparation."),
        ("Cholec80_VID01_000050_phase", ["Cholec80_VID01_000050"], [PHASE],
         "The reflected phase is Calot Triangle Dissection."),
        ("Cholec80_VID01_000000_instruments", ["Cholec80_VID01_000000"], [INSTRUMENTS],
         "They belong to the categories Grasper, Hook."),
        ("Cholec80_VID01_000025_instruments", ["Cholec80_VID01_000025"], [INSTRUMENTS], "No tools detected."),
        ("Cholec80_VID01_000050_instruments", ["Cholec80_VID01_000050"], [INSTRUMENTS],
         "They belong to the categories Grasper, SpecimenBag."),
        ("Cholec80_VID12_000000_phase", ["Cholec80_VID12_000000"], [PHASE],
         "The reflected phase is Gallbladder Retraction."),
        ("Cholec80_VID12_000025_phase", ["Cholec80_VID12_000025"], [PHASE],
         "The reflected phase is Gallbladder Retraction."),
    ]
    assert release["images"][:3] == [
        {"id": "Cholec80_VID01_000000", "image path": "Cholec80/frames/video01/000000.png"},
        {"id": "Cholec80_VID01_000025", "image path": "Cholec80/frames/video01/000001.png"},
        {"id": "Cholec80_VID01_000050", "image path": "Cholec80/frames/video01/000002.png"},
    ]
    assert video_table(release) == [
        {"id": "Cholec80_VID01", "source dataset": "Cholec80", **HEPATOBILIARY, "video path": "Cholec80/videos/video01.mp4"},
        {"id": "Cholec80_VID12", "source dataset": "Cholec80", **HEPATOBILIARY, "video path": "Cholec80/videos/video12.mp4"},
    ]
    found = {(Path(b.file).name, b.record): b.reason for b in bad}
    assert found == {
        ("readme.txt", "#file"): "not named video<NN>-phase.txt",
        ("video01-phase.txt", "line 62"): "unknown phase 'Washing' (known: Preparation, CalotTriangleDissection, "
        "ClippingCutting, GallbladderDissection, GallbladderPackaging, CleaningCoagulation, GallbladderRetraction)",
        ("video01-phase.txt", "line 63"): "frame 'x61' is not a non-negative integer",
        ("video01-tool.txt", "line 5"): "3 columns, the header has 8",
        ("video01-tool.txt", "line 6"): "tool flags ['2', '0', '0', '0', '0', '0', '0'] are not all 0 or 1",
    }
    assert summary["conversations"] == 8 and summary["bad"] == 5 and summary["label rows"] == 62 + 5 + 26
    assert summary["excluded"] == {"phase rows between the frames sampled at 1 fps": 57 + 24}
    # same input, same bytes (questions are picked by a hash of the record id, not at random)
    convert_dataset("cholec80", cholec80, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == out.read_bytes()


def test_cholec80_fps_pattern_and_video_selection(cholec80: Path, tmp_path: Path) -> None:
    out = tmp_path / "c80.json"
    convert_dataset("cholec80", cholec80, out, fps=5, videos={12},
                    frame_pattern="Cholec80/frames/VID{video:02d}/{frame:06d}.png")
    release = json.loads(out.read_text(encoding="utf-8"))
    assert [i["image path"] for i in release["images"]] == [
        f"Cholec80/frames/VID12/{f:06d}.png" for f in (0, 5, 10, 15, 20, 25)]
    assert [v["id"] for v in release["videos"]] == ["Cholec80_VID12"]
    with pytest.raises(ConfigError, match="whole number of source frames"):
        convert_dataset("cholec80", cholec80, out, fps=0.3)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['second'\]"):
        convert_dataset("cholec80", cholec80, out, frame_pattern="Cholec80/{video}/{second}.png")
    with pytest.raises(ConfigError, match="starting with 'Cholec80/'"):
        convert_dataset("cholec80", cholec80, out, frame_pattern="frames/{video}/{index}.png")
    with pytest.raises(ConfigError, match="--split do not apply"):
        convert_dataset("cholec80", cholec80, out, split="train")


# ------------------------------------------------------------------------------------------ CholecT50
CATEGORIES = {
    "instrument": {"0": "grasper", "1": "bipolar", "2": "hook", "3": "scissors", "4": "clipper", "5": "irrigator"},
    "verb": {"0": "grasp", "1": "retract", "2": "dissect", "9": "null_verb"},
    "target": {"0": "gallbladder", "1": "cystic_plate", "14": "null_target"},
    "triplet": {"1": "grasper,dissect,cystic_plate", "12": "grasper,retract,gallbladder",
                "29": "hook,dissect,gallbladder", "94": "grasper,null_verb,null_target"},
    "phase": {"0": "preparation", "1": "carlot-triangle-dissection"},
}


def instance(triplet: int, instrument: int, verb: int, target: int, phase: int = 1) -> list:
    """A 15-value CholecT50 instance: [triplet, instrument, score, x, y, w, h, verb, target, score, x, y, w, h, phase]."""
    box = [0.1, 0.2, 0.3, 0.25] if instrument != -1 else [-1, -1, -1, -1]
    return [triplet, instrument, 1 if instrument != -1 else -1, *box, verb, target, -1, -1, -1, -1, -1, phase]


@pytest.fixture
def cholect50(tmp_path: Path) -> Path:
    root = tmp_path / "CholecT50"
    doc = {
        "video": 2, "fps": 1, "num_frames": 8, "categories": CATEGORIES,
        "annotations": {
            "0": [instance(29, 2, 2, 0), instance(12, 0, 1, 0)],
            "1": [instance(12, 0, 1, 0), instance(12, 0, 1, 0)],
            "2": [],
            "3": [instance(-1, -1, -1, -1)],
            "4": [instance(94, 0, 9, 14)],
            "10": [instance(12, 0, 1, 0)[:14]],
            "11": [instance(12, 0, 2, 0)],
            "12": [instance(55, 0, 1, 0)],
            "13": [instance(-1, 2, -1, -1)],
        },
    }
    write(root / "labels/VID02.json", json.dumps(doc))
    write(root / "labels/VID03.json", '{"categories": ')
    write(root / "labels/VID04.json", json.dumps({**doc, "annotations": {}})[:-2] + '"0": [], "0": []}}')
    write(root / "labels/label_mapping.json", "{}")
    return root


def test_cholect50_triplets_and_instruments(cholect50: Path, tmp_path: Path) -> None:
    out = tmp_path / "t50.json"
    summary, bad = convert_dataset("cholect50", cholect50, out)
    release = json.loads(out.read_text(encoding="utf-8"))
    img = "CholecT50_VID02_{:06d}".format
    assert conversations(release) == [
        (img(0) + "_instruments", [img(0)], [INSTRUMENTS], "They belong to the categories Grasper, Hook."),
        (img(0) + "_triplets", [img(0)], [TRIPLETS],
         "The action triplets are <grasper, retract, gallbladder>, <hook, dissect, gallbladder>."),
        (img(1) + "_instruments", [img(1)], [INSTRUMENTS], "They belong to the categories Grasper."),
        (img(1) + "_triplets", [img(1)], [TRIPLETS], "The action triplets are <grasper, retract, gallbladder>."),
        (img(2) + "_instruments", [img(2)], [INSTRUMENTS], "No tools detected."),
        (img(3) + "_instruments", [img(3)], [INSTRUMENTS], "No tools detected."),
        (img(4) + "_instruments", [img(4)], [INSTRUMENTS], "They belong to the categories Grasper."),
        (img(4) + "_triplets", [img(4)], [TRIPLETS], "The action triplets are <grasper, null_verb, null_target>."),
    ]
    assert [i["image path"] for i in release["images"]] == [f"CholecT50/videos/VID02/{f:06d}.png" for f in range(5)]
    assert video_table(release) == [{"id": "CholecT50_VID02", "source dataset": "CholecT50", **HEPATOBILIARY,
                                     "video path": "CholecT50/videos/VID02"}]
    found = {(Path(b.file).name, b.record): b.reason for b in bad}
    assert found.pop(("VID03.json", "#file")).startswith("cannot use (")
    assert found.pop(("VID04.json", "#file")) == "cannot use (key(s) ['0'] appear twice in one object)"
    assert found == {
        ("label_mapping.json", "#file"): "not named VID<NN>.json",
        ("VID02.json", "frame 10"): "instance 0: not a list of 15 values",
        ("VID02.json", "frame 11"): "instance 0: verb 'dissect' disagrees with triplet 'grasper,retract,gallbladder'",
        ("VID02.json", "frame 12"): "instance 0: triplet id 55 is not -1 or an id of categories.triplet",
        ("VID02.json", "frame 13"): "instance 0: instrument hook without a triplet id",
    }
    assert summary["tasks"] == {"instrument_recognition": 5, "triplet_recognition": 3} and summary["label rows"] == 9


def test_nothing_usable_is_a_data_error_naming_the_rows(cholect50: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no usable conversation.*VID03.json #file: cannot use"):
        convert_dataset("cholect50", cholect50, tmp_path / "none.json", videos={3})
    assert not (tmp_path / "none.json").exists()
    assert main(["data", "convert", "--from", "cholect50", "--input", str(cholect50), "--out",
                 str(tmp_path / "none.json"), "--videos", "3"]) == DataError.exit_code


# ------------------------------------------------------------------------------------------ Endoscapes
METADATA = """vid,frame,avg_cvs,C1,C2,C3,is_ds_keyframe,cvs_annotator_1,cvs_annotator_2,cvs_annotator_3,mask_path,label_path
8.0,14775,"[0.333, 0.667, 1.0]",0.3333333333333333,0.6666666666666666,1.0,True,"[0.0, 1.0, 1.0]","[1.0, 1.0, 1.0]","[0.0, 0.0, 1.0]",,
8.0,14800,"[0.5, 0.5, 1.0]",0.5,0.5,1.0,False,,,,,
12.0,300,"[1.0, 1.0, 1.0]",1.0,1.0,1.0,True,"[1.0, 1.0, 1.0]","[1.0, 1.0, 1.0]","[1.0, 1.0, 1.0]",,
12.0,325,,0.0,abc,0.0,True,"[0.0, 0.0, 0.0]","[0.0, 0.0, 0.0]","[0.0, 0.0, 0.0]",,
x,1,,0.0,0.0,0.0,True,"[0.0, 0.0, 0.0]",,,,
12.0,300,"[1.0, 1.0, 1.0]",1.0,1.0,1.0,True,"[1.0, 1.0, 1.0]","[1.0, 1.0, 1.0]","[1.0, 1.0, 1.0]",,
20.0,50,"[0.0, 0.0, 0.0]",0.0,0.0,0.0,True,"[0.0, 0.0, 0.0]","[0.0, 0.0, 0.0]","[0.0, 0.0, 0.0]",,
"""


@pytest.fixture
def endoscapes(tmp_path: Path) -> Path:
    root = tmp_path / "endoscapes"
    write(root / "all_metadata.csv", METADATA)
    write(root / "train_vids.txt", "8.0\n12.0\n")
    write(root / "test_vids.txt", "20.0\nnine\n")
    return root


def test_endoscapes_cvs_majority_of_raters(endoscapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "endo.json"
    summary, bad = convert_dataset("endoscapes", endoscapes, out, split="train")
    release = json.loads(out.read_text(encoding="utf-8"))
    assert conversations(release) == [
        ("Endoscapes_VID08_014775_cvs", ["Endoscapes_VID08_014775"], [CVS],
         "Two structures: no. Hepatocystic triangle cleared: yes. Lower third of gallbladder dissected: yes."),
        ("Endoscapes_VID12_000300_cvs", ["Endoscapes_VID12_000300"], [CVS],
         "Two structures: yes. Hepatocystic triangle cleared: yes. Lower third of gallbladder dissected: yes."),
    ]
    assert [i["image path"] for i in release["images"]] == [
        "Endoscapes/frames/vid8/8_14775.jpg", "Endoscapes/frames/vid12/12_300.jpg"]
    assert [(b.record, b.reason) for b in bad] == [
        ("line 5", "C1..C3 ['0.0', 'abc', '0.0'] are not numbers in [0, 1]"),
        ("line 6", "vid 'x' / frame '1' are not ids"),
        ("line 7", "vid 12 frame 300 already on line 4"),
    ]
    assert summary["excluded"] == {"interpolated between rater-annotated frames (no cvs_annotator_* value)": 1,
                                   "video not selected (--videos / --split)": 1}
    # interpolated rows on request; a test split's bad id line is reported too
    _, bad = convert_dataset("endoscapes", endoscapes, out, include_interpolated=True, videos={8})
    answers = [a["answer"] for a in json.loads(out.read_text(encoding="utf-8"))["annos"]]
    assert answers[1] == "Two structures: yes. Hepatocystic triangle cleared: yes. Lower third of gallbladder dissected: yes."
    _, bad = convert_dataset("endoscapes", endoscapes, out, split="test")
    assert [(Path(b.file).name, b.record) for b in bad][0] == ("test_vids.txt", "line 2")


def test_frame_pattern_must_keep_videos_apart(endoscapes: Path, tmp_path: Path) -> None:
    # the zip's flat split folders: every frame of a split would look like one patient video
    with pytest.raises(ConfigError, match="get the same source-video key 'Endoscapes/train'"):
        convert_dataset("endoscapes", endoscapes, tmp_path / "e.json", frame_pattern="Endoscapes/train/{video}_{frame}.jpg")


# ------------------------------------------------------------------------------------------ end to end
def test_converted_files_load_through_the_readers(cholec80: Path, cholect50: Path, endoscapes: Path,
                                                  tmp_path: Path) -> None:
    data = tmp_path / "converted"
    for name, root in (("cholec80", cholec80), ("cholect50", cholect50), ("endoscapes", endoscapes)):
        convert_dataset(name, root, data / f"{name}.json")
    samples, report = read_file(data / "cholect50.json", "auto", DEFAULT_TASK_IDS, tmp_path)
    assert report.format == "surgsigma" and report.bad == [] and len(samples) == 8
    first = samples[1]
    assert (first.task, first.source, first.specialty, first.source_video) == (
        "triplet_recognition", "CholecT50", "Hepatobiliary", "CholecT50/VID02")
    assert first.messages[0].content.startswith("<image>\n") and first.media[0].path == "CholecT50/videos/VID02/000000.png"

    for file in data.glob("*.json"):  # the frames, where the data root's raw_data/ is expected to hold them
        for image in json.loads(file.read_text(encoding="utf-8"))["images"]:
            write(data / "raw_data" / image["image path"], "")
    samples, reports = read_source(DataSource(path=str(data)), DEFAULT_TASK_IDS)
    assert [r.bad for r in reports] == [[], [], []] and all(not r.excluded for r in reports)
    by_source: dict[str, set] = {}
    for s in samples:
        by_source.setdefault(s.source, set()).add((s.task, s.source_video))
        assert s.specialty == "Hepatobiliary"
    assert by_source == {
        "Cholec80": {("phase_recognition", "Cholec80/VID01"), ("phase_recognition", "Cholec80/VID12"),
                     ("instrument_recognition", "Cholec80/VID01")},
        "CholecT50": {("instrument_recognition", "CholecT50/VID02"), ("triplet_recognition", "CholecT50/VID02")},
        "Endoscapes": {("safety_assessment", "Endoscapes/VID08"), ("safety_assessment", "Endoscapes/VID12"),
                       ("safety_assessment", "Endoscapes/VID20")},
    }


def test_cli_writes_the_file_and_lists_unusable_rows(cholec80: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "c80.json"
    assert main(["data", "convert", "--from", "cholec80", "--input", str(cholec80), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["conversations"] == 8
    assert len(json.loads(out.read_text(encoding="utf-8"))["annos"]) == 8
    assert "video01-phase.txt line 62: unknown phase 'Washing'" in captured.err
    assert captured.err.count("unusable: ") == 5
    assert main(["data", "convert", "--from", "cholec80", "--input", str(cholec80), "--out", str(out),
                 "--frame-pattern", "Cholec80/{nope}.png"]) == ConfigError.exit_code


def test_video_selection_parsing() -> None:
    assert parse_video_selection("1-3, 7") == {1, 2, 3, 7} and parse_video_selection(None) is None
    with pytest.raises(ConfigError, match="'a-b' is not a number"):
        parse_video_selection("a-b")
