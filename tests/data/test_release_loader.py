"""The SurgΣ-DB release loader on a written fixture with every known quirk, through every input kind."""

import json
from collections import Counter

import pytest

from surgsigma_train.cli import main
from surgsigma_train.config.schema import DEFAULT_TASK_IDS, DataSource
from surgsigma_train.data.readers import REPAIR_VID_PADDING, read_source
from surgsigma_train.errors import DataError

from tests.data.fixtures_surgsigma import EXPECTED, RELEASE, write_surgsigma_release


@pytest.fixture
def release(tmp_path):
    return write_surgsigma_release(tmp_path)


def check_expected(samples, reports):
    """Every record of the fixture ends where EXPECTED says, with exact counts."""
    (report,) = reports
    assert report.format == "surgsigma" and report.records == len(RELEASE["annos"]) == 17
    assert [s.id for s in samples] == EXPECTED["samples"] and report.samples == 9
    assert {reason.split()[2]: n for reason, n in report.excluded.items()} == EXPECTED["excluded"]
    reasons = {b.record: b.reason for b in report.bad}
    assert reasons.keys() == EXPECTED["bad"].keys()
    for record, phrase in EXPECTED["bad"].items():
        assert phrase in reasons[record], (record, reasons[record])
    assert report.repaired == Counter({REPAIR_VID_PADDING: EXPECTED["repaired"]})
    assert report.missing_media == Counter(EXPECTED["missing_media"])
    assert report.unmapped_fields == Counter(EXPECTED["unmapped"])
    assert report.samples + sum(report.excluded.values()) + len(report.bad) == report.records


def test_release_json_counts_and_repairs(release):
    samples, reports = read_source(DataSource(path=str(release)), DEFAULT_TASK_IDS)
    check_expected(samples, reports)
    by_id = {s.id: s for s in samples}
    # repaired only where the padded file exists and the unpadded one does not
    assert by_id["phase"].media[0].path == "CholecT50/videos/VID02/000509.png"
    assert by_id["loc_none"].media[0].path == "CholecT50/videos/VID4/000001.png"  # both exist: left alone
    assert by_id["phase"].source_video == by_id["instruments"].source_video == "CholecT50/VID02"
    assert by_id["phase"].media_root == str(release.parent / "raw_data")
    assert by_id["phase"].thinking.startswith("Level 1") and by_id["loc_grid"].task == "instrument_localization"
    action = by_id["action"]
    assert action.media[0].kind == "video" and action.source == "Cholec80" and action.specialty == "Hepatobiliary"
    assert action.extra["surgical_type"] == "Cholecystectomy"


def test_corrupted_box_answer_is_quarantined_with_its_reason(release):
    _, (report,) = read_source(DataSource(path=str(release)), DEFAULT_TASK_IDS)
    reason = next(b.reason for b in report.bad if b.record == "tokens_corrupt")
    assert reason.startswith("quarantined:") and "'3gallbladder69' is not an integer coordinate" in reason


def test_check_media_off_keeps_paths_as_written(release):
    """Without the read-time media check (annotation statistics without raw media) nothing is repaired;
    validate then reports the missing files itself."""
    samples, (report,) = read_source(DataSource(path=str(release), check_media=False), DEFAULT_TASK_IDS)
    assert len(samples) == 11 and not report.repaired and not report.missing_media
    assert next(s for s in samples if s.id == "phase").media[0].path == "CholecT50/videos/VID2/000509.png"


def _recipe(tmp_path, data_lines):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  family: qwen2_5_vl\n  source: tiny\ndata:\n" + data_lines
                      + f"output:\n  dir: {tmp_path / 'run'}\n")
    return str(recipe)


def test_validate_prints_the_release_report(release, tmp_path, capsys):
    rc = main(["validate", _recipe(tmp_path, f"  train:\n    - path: {release}\n")])
    out = capsys.readouterr().out
    assert rc == 3  # bad records are problems: exit code "bad data"
    for line in (f"{release}: format surgsigma, 17 records -> 9 samples, 5 bad",
                 "excluded 1: generation task desmoking",
                 "unmapped field 'difficulty' in 1 records",
                 f"repaired 1: {REPAIR_VID_PADDING}",
                 "missing media: 2 files, 2 records (bad): Cholec80/videos/vid92.mp4, "
                 "CholecT50/videos/VID6/000001.png",
                 "bad tokens_corrupt: quarantined:",
                 "bad caption_not_public: media not found under",
                 "train: 9 samples from 3 source videos; 0 media problems",
                 "validate: 5 problems found"):
        assert line in out, line
    # with the read-time check off nothing is repaired: validate's own existence check finds the two missing
    # files and the unrepaired VID2 path
    rc = main(["validate", _recipe(tmp_path, f"  train:\n    - path: {release}\n      check_media: false\n")])
    out = capsys.readouterr().out
    assert rc == 3 and "11 samples" in out and "3 media problems" in out
    assert "sample phase: media CholecT50/videos/VID2/000509.png: file not found" in out
    assert "sample caption_not_public: media Cholec80/videos/vid92.mp4: file not found" in out


def test_directory_with_annotation_records(release):
    """A folder of release files and standalone annotation records (JSONL) naming their media by path."""
    lines = [
        {"id": "r1", "image path": "CholecT50/videos/VID2/000509.png", "task type": [5], "question": "Phase?",
         "answer": "The reflected phase is Preparation."},
        {"id": "r2", "images": ["Cholec80/videos/vid12.mp4"], "task type": [8], "query": "Action?",
         "answer": "dissection", "surgeon": "x"},
        {"id": "r3", "images": ["img_vid02"], "task type": [5], "question": "Phase?", "answer": "x"},
    ]
    (release.parent / "more.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    samples, reports = read_source(DataSource(path=str(release.parent)), DEFAULT_TASK_IDS)
    assert [r.file for r in reports] == [str(release), str(release.parent / "more.jsonl")]
    check_expected(samples[:9], reports[:1])
    extra = reports[1]
    assert [s.id for s in samples[9:]] == ["r1", "r2"] and extra.repaired[REPAIR_VID_PADDING] == 1
    assert samples[10].media[0].kind == "video" and extra.unmapped_fields == Counter({"surgeon": 1})
    assert [(b.record, b.reason) for b in extra.bad] == [("r3", "references unknown media id 'img_vid02'")]


def test_media_outside_the_root_is_bad(tmp_path):
    (tmp_path / "raw_data").mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "x", "image path": "../outside.png", "task type": [5], "question": "q",
                                "answer": "a"}) + "\n")
    samples, (report,) = read_source(DataSource(path=str(path)), DEFAULT_TASK_IDS)
    assert samples == [] and "resolves outside the data root" in report.bad[0].reason


# ---------------------------------------------------------------- Hugging Face datasets
datasets = pytest.importorskip("datasets")


def test_hf_save_to_disk_document_row_equals_json(release, tmp_path):
    """The release document as one datasets row (what load_dataset makes of the JSON file) reads the same."""
    folder = tmp_path / "hf_saved"
    datasets.Dataset.from_list([RELEASE]).save_to_disk(str(folder))
    samples, reports = read_source(DataSource(path=str(folder), media_root=str(release.parent / "raw_data")),
                                   DEFAULT_TASK_IDS)
    assert reports[0].file == str(folder)
    check_expected(samples, reports)


def test_hf_data_folder_and_split_selection(release, tmp_path):
    folder = tmp_path / "hf_parquet"
    folder.mkdir()
    rows = [{"id": f"p{i}", "image path": "CholecT50/videos/VID02/000510.png", "task type": [5],
             "question": "Phase?", "answer": "The reflected phase is Preparation."} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(folder / "test.parquet"))
    root = str(release.parent / "raw_data")
    with pytest.raises(DataError, match=r"several splits; set `hf_split` to one of \['test', 'train'\]"):
        read_source(DataSource(path=str(folder), media_root=root), DEFAULT_TASK_IDS)
    samples, (report,) = read_source(DataSource(path=str(folder), media_root=root, hf_split="train"), DEFAULT_TASK_IDS)
    assert [s.id for s in samples] == ["p0", "p1", "p2"] and report.file == f"{folder}[train]"
    assert report.format == "surgsigma" and not report.unmapped_fields and not report.bad


def test_hf_hub_id(release, monkeypatch):
    """The hub cannot be reached here: the call to datasets.load_dataset is replaced, the rest is real."""
    calls = []

    def fake_load_dataset(path, split=None, **kw):
        calls.append((path, split))
        return datasets.Dataset.from_list([RELEASE])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = "SurgSigma/SurgSigma-DB"
    with pytest.raises(DataError, match="a hub dataset needs `media_root`"):
        read_source(DataSource(path=hub, format="hf"), DEFAULT_TASK_IDS)
    samples, reports = read_source(DataSource(path=hub, format="hf", hf_split="train",
                                              media_root=str(release.parent / "raw_data")), DEFAULT_TASK_IDS)
    assert calls == [(hub, "train")] and reports[0].file == f"{hub}[train]"
    check_expected(samples, reports)


def test_hf_load_failure_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="the datasets library cannot load it"):
        read_source(DataSource(path=str(tmp_path / "nope"), format="hf", media_root=str(tmp_path)), DEFAULT_TASK_IDS)


# ---------------------------------------------------------------- reasoning targets from a release record
@pytest.mark.parametrize("mode", ["plain", "reasoning"])
def test_thinking_field_becomes_the_reasoning_target(release, mode):
    from surgsigma_train.data.encode import extract_answer
    from surgsigma_train.data.tasks import VOCABULARIES, mentioned_labels

    from tests.data.test_encode import encoder, supervised_text

    samples, _ = read_source(DataSource(path=str(release)), DEFAULT_TASK_IDS)
    phase = next(s for s in samples if s.id == "phase")
    enc = encoder("qwen2_5_vl", reasoning=mode)
    answer = "The reflected phase is Gallbladder Dissection."
    (trained,) = supervised_text(enc, enc.encode(phase))
    if mode == "plain":
        assert trained == answer + "<|im_end|>"
    else:
        assert trained == (f"<think> {phase.thinking} </think><answer> {answer} </answer><|im_end|>")
        assert trained.startswith("<think> Level 1:") and "Level 2:" in trained and "Level 3:" in trained
    # evaluation scores only the answer: the thinking also names ClippingCutting, the answer does not
    target = enc.final_answer(phase)
    assert extract_answer(target) == answer
    phases = VOCABULARIES["cholec80_phases"]
    assert mentioned_labels(extract_answer(target), phases) == ["GallbladderDissection"]
    if mode == "reasoning":
        assert mentioned_labels(target, phases) == ["ClippingCutting", "GallbladderDissection"]
