import json
import pickle
import re

import numpy as np
import pytest
import torch

from surgsigma_train.cli import main
from surgsigma_train.config.schema import DEFAULT_TASK_IDS, DataSource
from surgsigma_train.data.index import MANIFEST, REPORT, ConcatSamples, SampleIndex, build_index
from surgsigma_train.data.readers import read_file, read_source
from surgsigma_train.data.splits import SampleColumns
from surgsigma_train.errors import DataError
from surgsigma_train.training.run import data_fingerprint, read_samples, sample_columns
from tests.data.fixtures_surgsigma import EXPECTED, write_surgsigma_release


def _same_report(index_report, file_report):
    assert index_report.summary() == file_report.summary()
    assert index_report.bad == file_report.bad


def _assert_same_samples(index, samples):
    got = list(index)
    assert len(index) == len(samples) and got == samples  # ids, messages, media, task, source_video, ...
    assert [s.extra for s in got] == [s.extra for s in samples]  # not part of Sample equality
    assert [s.split_key for s in got] == [s.split_key for s in samples]
    assert [index[i] for i in range(len(index))] == samples  # random access agrees with iteration


def _awkward_release(n: int = 40) -> dict:
    """Annotations before their tables, two annotation tables, duplicate ids, clips, non-objects."""
    annos = [{"id": f"a{i}", "images": [f"i{i % 7}"], "task type": [5], "question": f"Phase {i}?",
              "answer": f"The reflected phase is P{i}."} for i in range(n)]
    annos += [
        {"id": "a3", "images": ["i1"], "task type": [5], "question": "q", "answer": "duplicate id"},
        {"images": ["i2"], "task type": [5], "question": "no id", "answer": "kept, named by position"},
        "not an object",
        {"id": "clip", "images": ["v1"], "task type": [8], "question": "Action?", "answer": "clipping"},
        {"id": "gen", "images": ["i1"], "task type": [7], "question": "Desmoke", "answer": "x"},
        {"id": "gone", "images": ["nope"], "task type": [5], "question": "q", "answer": "a"},
    ]
    return {
        "annos": annos,
        "more_annos": [{"id": "late", "images": ["i3", "v1"], "task type": [13], "question": "Both?",
                        "answer": "Frame, then clip.", "reasoning": "Level 1: x."}],
        "images": [{"id": f"i{k}", "image path": f"CholecT50/videos/VID{k:02d}/{k:06d}.png"} for k in range(7)]
        + [{"id": "i3", "image path": "CholecT50/videos/VID33/000003.png"},  # later entry wins
           {"image path": "no/id.png"}],
        "videos": [{"id": "v1", "source dataset": "Cholec80", "clinical specialty": "Hepatobiliary",
                    "surgical type": "Cholecystectomy", "video path": "Cholec80/videos/vid12.mp4",
                    "start": 4, "end": 9.5}],
        "version": "0.1",
    }


@pytest.fixture
def release(tmp_path):
    path = tmp_path / "release.json"
    path.write_text(json.dumps(_awkward_release()))
    return path


def test_index_equals_read_file_on_the_quirk_fixture(tmp_path):
    source = write_surgsigma_release(tmp_path)
    samples, report = read_file(source, "auto", DEFAULT_TASK_IDS, tmp_path / "raw_data", check_media=True)
    assert [s.id for s in samples] == EXPECTED["samples"]  # the fixture's own expectation holds
    manifest = build_index(source, tmp_path / "idx", DEFAULT_TASK_IDS, shard_rows=4, batch_rows=3)
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 1] and manifest["complete"]
    index = SampleIndex(tmp_path / "idx")
    _assert_same_samples(index, samples)
    _same_report(index.report(), report)
    on_disk = json.loads((tmp_path / "idx" / REPORT).read_text())
    assert {b["id"] for b in on_disk["bad"]} == set(EXPECTED["bad"]) and on_disk["repaired"]


def test_index_equals_read_file_on_an_awkward_layout(tmp_path, release):
    samples, report = read_file(release, "auto", DEFAULT_TASK_IDS, tmp_path, check_media=False)
    build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=16, batch_rows=5)
    index = SampleIndex(tmp_path / "idx")
    _assert_same_samples(index, samples)
    _same_report(index.report(), report)
    assert index[-1].id == "late" and index[2].media[0].path == "CholecT50/videos/VID02/000002.png"
    clip = next(s for s in index if s.id == "clip")
    assert (clip.media[0].start_s, clip.media[0].end_s, clip.extra["surgical_type"]) == (4, 9.5, "Cholecystectomy")
    assert {b.reason for b in report.bad} >= {"duplicate id", "record is a str, not an object"}
    with pytest.raises(IndexError):
        index[len(index)]


def test_index_of_jsonl_with_a_malformed_line(tmp_path):
    path = tmp_path / "l.jsonl"
    rows = [json.dumps({"id": str(i), "image": f"f/VID03/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": f"a{i}"}]}) for i in range(5)]
    path.write_text("\n".join(rows[:2] + ["{broken"] + rows[2:]) + "\n")
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    build_index(path, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=2)
    index = SampleIndex(tmp_path / "idx")
    _assert_same_samples(index, samples)
    _same_report(index.report(), report)
    assert report.bad[0].record == "line 3"


def test_kill_and_resume_equals_one_shot(tmp_path, release):
    one_shot = build_index(release, tmp_path / "once", DEFAULT_TASK_IDS, check_media=False, shard_rows=8,
                           batch_rows=3)

    def kill_after_2(n):
        if n == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        build_index(release, tmp_path / "twice", DEFAULT_TASK_IDS, check_media=False, shard_rows=8, batch_rows=3,
                    after_shard=kill_after_2)
    partial = json.loads((tmp_path / "twice" / MANIFEST).read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    with pytest.raises(DataError, match="incomplete"):
        SampleIndex(tmp_path / "twice")
    (tmp_path / "twice" / "shard-00002.arrow.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    calls = []
    resumed = build_index(release, tmp_path / "twice", DEFAULT_TASK_IDS, check_media=False, shard_rows=8,
                          batch_rows=3, after_shard=calls.append)
    assert calls == list(range(3, len(one_shot["shards"]) + 1))  # shards 1-2 were not rewritten
    assert not list((tmp_path / "twice").glob("*.tmp"))
    a, b = SampleIndex(tmp_path / "once"), SampleIndex(tmp_path / "twice")
    assert list(a) == list(b) and len({s.id for s in b}) == len(b)  # no duplicated rows
    assert a.fingerprint() == b.fingerprint() and resumed["report"] == one_shot["report"]
    # a complete index is left alone
    assert build_index(release, tmp_path / "twice", DEFAULT_TASK_IDS, check_media=False, shard_rows=8,
                       batch_rows=3, after_shard=kill_after_2) == resumed


def test_changed_source_or_parameters_refuse_to_resume(tmp_path, release):
    def kill(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=8, after_shard=kill)
    with pytest.raises(DataError, match="built with"):
        build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=16)
    doc = _awkward_release()
    doc["annos"][0]["answer"] = "The reflected phase is Q."  # same size, different bytes
    release.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="another source"):
        build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=8)


class _Ids(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return {"id": s.id, "answer": s.messages[-1].content, "path": s.media[0].path}


def test_dataloader_workers_read_the_index(tmp_path, release):
    build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=8, batch_rows=3)
    index = SampleIndex(tmp_path / "idx")
    index[0]  # opened in the parent: workers must reopen their own memory map
    assert pickle.loads(pickle.dumps(index))[5] == index[5]
    loader = torch.utils.data.DataLoader(_Ids(index), batch_size=4, num_workers=2, collate_fn=list)
    got = [row for batch in loader for row in batch]
    assert [r["id"] for r in got] == [s.id for s in index]
    assert [(r["answer"], r["path"]) for r in got] == [(s.messages[-1].content, s.media[0].path) for s in index]


def test_recipe_source_reads_an_index(tmp_path, release):
    samples, _ = read_file(release, "auto", DEFAULT_TASK_IDS, tmp_path, check_media=False)
    out = tmp_path / "idx"
    assert main(["data", "index", str(release), str(out), "--no-check-media", "--shard-rows", "8"]) == 0
    source = DataSource(path=str(out), check_media=False, media_root="/media")
    index, reports = read_source(source, DEFAULT_TASK_IDS)
    assert isinstance(index, SampleIndex) and list(index) == [s.__class__(**{**s.__dict__, "media_root": "/media"})
                                                             for s in samples]
    assert reports[0].samples == len(samples)
    assert len(read_source(DataSource(path=str(out), check_media=False, max_samples=5), DEFAULT_TASK_IDS)[0]) == 5
    with pytest.raises(DataError, match="task_ids"):
        read_source(DataSource(path=str(out), check_media=False), {5: "phase_recognition"})
    with pytest.raises(DataError, match="without media checks"):
        read_source(DataSource(path=str(out)), DEFAULT_TASK_IDS)

    # training's view: one index stays an index; split/mixture columns and views agree with a list
    got, _ = read_samples([DataSource(path=str(out), check_media=False)], DEFAULT_TASK_IDS)
    assert isinstance(got, SampleIndex)
    cols, ref = sample_columns(got), SampleColumns.from_samples(samples)
    for name in ("task", "source", "specialty", "split_key"):
        assert list(getattr(cols, name)) == list(getattr(ref, name))
    pick = np.array([7, 0, 3])
    view = got.select(pick)
    assert list(view) == [samples[i] for i in pick] and pickle.loads(pickle.dumps(view))[0] == samples[7]
    assert list(sample_columns(view).task) == list(ref.take(pick).task)
    assert data_fingerprint(got) == got.manifest["fingerprint"] != data_fingerprint(view)
    both, _ = read_samples([DataSource(path=str(out), check_media=False), DataSource(path=str(release),
                            check_media=False)], DEFAULT_TASK_IDS)
    assert isinstance(both, ConcatSamples) and list(both) == samples + samples
    assert len(data_fingerprint(both)) == 16 and list(both.select(np.array([len(samples)]))) == samples[:1]


def test_split_of_an_index_matches_a_list(tmp_path, release):
    from types import SimpleNamespace

    from surgsigma_train.config.schema import SplitConfig
    from surgsigma_train.training.run import apply_split

    samples, _ = read_file(release, "auto", DEFAULT_TASK_IDS, tmp_path, check_media=False)
    build_index(release, tmp_path / "idx", DEFAULT_TASK_IDS, check_media=False, shard_rows=8)
    index = SampleIndex(tmp_path / "idx")
    cfg = SimpleNamespace(data=SimpleNamespace(split=SplitConfig(eval_ratio=0.3, stratify=False)))
    want_train, want_eval, want_report = apply_split(cfg, samples, [])
    got_train, got_eval, got_report = apply_split(cfg, index, index.select(np.arange(0)))  # eval: an index too
    assert isinstance(got_train, SampleIndex) and want_eval and want_train  # a view, not a list
    assert list(got_train) == want_train and got_eval == want_eval and got_report == want_report


# Eight entries, covering the task types of `_awkward_release` (5, 7, 8, 13) and a few more.
EIGHT_TASK_IDS = {3: "phase_recognition", 5: "phase_recognition", 7: "desmoking", 8: "action_recognition",
                  11: "safety_assessment", 12: "image_captioning", 13: "video_captioning", 15: "next_action_planning"}


def _recipe_reading(index_dir, task_ids):
    from pathlib import Path

    from surgsigma_train.config.loading import load_recipe

    flow = "{" + ", ".join(f"{k}: {v}" for k, v in task_ids.items()) + "}"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    cfg = load_recipe(recipe, [f"data.train=[{{path: {index_dir}, check_media: false}}]", "data.eval=[]",
                               f"data.task_ids={flow}"])
    assert cfg.data.task_ids == task_ids  # the recipe's map is exactly the entries given
    return read_samples(cfg.data.train, cfg.data.task_ids)


def test_the_same_task_ids_on_the_cli_and_in_the_recipe_agree(tmp_path, release):
    out = tmp_path / "idx"
    pairs = [f"{k}={v}" for k, v in EIGHT_TASK_IDS.items()]
    assert main(["data", "index", str(release), str(out), "--no-check-media", "--task-ids", *pairs]) == 0
    assert SampleIndex(out).manifest["params"]["task_ids"] == {str(k): v for k, v in EIGHT_TASK_IDS.items()}
    got, _ = _recipe_reading(out, EIGHT_TASK_IDS)
    expected, _ = read_file(release, "auto", EIGHT_TASK_IDS, tmp_path, check_media=False)
    assert [s.id for s in got] == [s.id for s in expected] and len(got) > 0

    differing = {**EIGHT_TASK_IDS, 3: "step_recognition", 9: "triplet_recognition"}
    del differing[15]
    with pytest.raises(DataError) as err:
        _recipe_reading(out, differing)
    message = str(err.value)
    assert "id 3: index 'phase_recognition' vs recipe 'step_recognition'" in message
    assert "id 9 only in recipe ('triplet_recognition')" in message
    assert "id 15 only in index ('next_action_planning')" in message
    assert {int(i) for i in re.findall(r"\bid (\d+)", message)} == {3, 9, 15}  # the differing entries, no others


def test_task_ids_on_the_cli_must_be_id_equals_name(tmp_path, release, capsys):
    for bad in (["5=phase_recognition", "5=step_recognition"], ["5="], ["x=phase_recognition"]):
        assert main(["data", "index", str(release), str(tmp_path / "idx"), "--no-check-media", "--task-ids", *bad]) == 3
        assert "--task-ids" in capsys.readouterr().err
