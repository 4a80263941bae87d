import json

import pytest

from surgsigma_train.config.schema import DEFAULT_TASK_IDS, DataSource
from surgsigma_train.data.readers import read_file, read_source
from surgsigma_train.data.sample import MediaRef


def _write(tmp_path, name, doc):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in doc) + "\n")
    else:
        path.write_text(json.dumps(doc))
    return path


def test_llava_records(tmp_path):
    path = _write(tmp_path, "l.json", [
        {"id": "a", "image": "f/VID03/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat phase?"}, {"from": "gpt", "value": "Preparation."}]},
        {"id": "b", "images": ["x.png", "y.png"], "conversations": [  # no placeholders: prepended
            {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]},
        {"id": "c", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "no"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "e", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    ])
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert report.format == "llava" and [s.id for s in samples] == ["a", "b"]
    assert samples[0].source_video == "f/VID03" and samples[0].media == (MediaRef("image", "f/VID03/1.png"),)
    assert samples[1].messages[0].content == "<image><image>\nCompare."
    reasons = {b.record: b.reason for b in report.bad}
    assert "do not match the media" in reasons["c"]
    assert reasons["d"] == "no assistant turn"
    assert "unknown speaker" in reasons["e"]


def test_openai_messages_jsonl_with_bad_line(tmp_path):
    path = _write(tmp_path, "o.jsonl", [
        {"id": "v1", "task": "action_recognition", "messages": [
            {"role": "user", "content": [{"type": "video", "video": "clips/vid7.mp4", "start": 1.5, "end": 3.0},
                                         {"type": "text", "text": "Which action?"}]},
            {"role": "assistant", "content": "The action is clipping."}]},
        "{not json",
        {"id": "v2", "images": ["a.png"], "messages": [
            {"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Tissue."}]},
    ])
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert report.format == "openai" and [s.id for s in samples] == ["v1", "v2"]
    assert samples[0].media == (MediaRef("video", "clips/vid7.mp4", 1.5, 3.0),)
    assert samples[0].messages[0].content == "<video>Which action?" and samples[0].source_video == "clips/VID07"
    assert report.records == 3 and [(b.record, b.reason.split(" (")[0]) for b in report.bad] == \
        [("line 2", "malformed JSON")]


def test_surgsigma_release_layout(tmp_path):
    doc = {
        "video_list": [{"id": "v1", "source dataset": "Cholec80", "source url": "u", "clinical specialty":
                        "Hepatobiliary", "surgical type": "Cholecystectomy", "video path": "Cholec80/videos/vid92.mp4"}],
        "images": [{"id": "i1", "image path": "Cholec80/frames/VID2/000509.png"}],
        "annos": [
            {"id": "a1", "images": ["i1"], "task type": [5], "question": "Phase?", "answer": "The reflected phase is P.",
             "thinking": "Level 1: x. Level 2: y. Level 3: z.", "difficulty": "easy"},
            {"id": "a2", "images": ["v1"], "task type": [8], "question": "Action?", "answer": "clipping"},
            {"id": "a3", "images": ["i1"], "task type": [7], "question": "Desmoke", "answer": "<img>"},
            {"id": "a4", "images": ["nope"], "task type": [5], "question": "q", "answer": "a"},
            {"id": "a5", "images": ["i1"], "task type": [99], "question": "q", "answer": "a"},
            {"id": "a6", "images": ["i1"], "task type": [5], "answer": "a"},
        ],
        "version": "0.1",
    }
    path = _write(tmp_path, "s.json", doc)
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert report.format == "surgsigma" and [s.id for s in samples] == ["a1", "a2"]
    phase, action = samples
    assert phase.task == "phase_recognition" and phase.thinking.startswith("Level 1")
    assert phase.source_video == "Cholec80/VID02" and phase.specialty == "Hepatobiliary"
    assert phase.messages[0].content == "<image>\nPhase?"
    assert action.task == "action_recognition" and action.media[0].kind == "video"
    assert action.source_video == "Cholec80/VID92" and action.source == "Cholec80"
    assert sum(report.excluded.values()) == 1 and "desmoking" in next(iter(report.excluded))
    reasons = {b.record: b.reason for b in report.bad}
    assert "unknown media id 'nope'" in reasons["a4"] and "unknown task id 99" in reasons["a5"]
    assert "no question field" in reasons["a6"]
    assert report.unmapped_fields["difficulty"] == 1 and report.unmapped_fields["top-level 'version'"] == 1
    # every record is accounted for: samples + excluded + bad
    assert report.samples + sum(report.excluded.values()) + len(report.bad) == report.records == 6


def test_read_source_media_root_and_limit(tmp_path):
    (tmp_path / "raw_data").mkdir()
    _write(tmp_path, "d.json", [{"id": str(i), "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]} for i in range(5)])
    samples, _ = read_source(DataSource(path=str(tmp_path / "d.json"), max_samples=3), DEFAULT_TASK_IDS)
    assert len(samples) == 3 and samples[0].media_root == str(tmp_path / "raw_data")


def test_unknown_format_is_reported(tmp_path):
    path = _write(tmp_path, "u.json", [{"foo": 1}])
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert samples == [] and "cannot tell the format" in report.bad[0].reason
