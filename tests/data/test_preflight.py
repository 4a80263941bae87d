"""Preflight (`surgsigma-train validate`) over the bad-input corpus: every case reported with its reason, no crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgsigma_train.cli import main
from surgsigma_train.config.loading import load_recipe
from surgsigma_train.data import preflight
from surgsigma_train.data.preflight import format_preflight, run_preflight
from surgsigma_train.training.run import data_fingerprint
from tests.data.bad_corpus import FAULTS_INITIALIZER, FAULTS_SYS_PATH, write_bad_corpus

pytest.importorskip("av")
REPO = Path(__file__).resolve().parents[2]


def corpus_overrides(corpus: Path, run_dir: Path) -> list[str]:
    return [f"data.train.0.path={corpus}", "data.eval=[]", f"output.dir={run_dir}"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list]:
    return write_bad_corpus(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def checked(corpus, tmp_path_factory):
    """One preflight over the corpus, with a decoder that really segfaults / hangs on two files."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", corpus_overrides(corpus[0], run_dir))
    result = run_preflight(cfg, workers=2, timeout_s=3.0, decoder_initializer=FAULTS_INITIALIZER,
                           decoder_sys_path=[FAULTS_SYS_PATH])
    return result, run_dir


def test_every_corpus_case_is_reported_with_its_reason(corpus, checked):
    result, _ = checked
    _, cases = corpus
    assert len({c.kind for c in cases}) >= 30
    clean = {(s.id) for _, s, _ in result.clean}
    table, wrong = [], []
    for case in cases:
        in_file = lambda findings: [f for f in findings if f.id == case.id and Path(f.file).name == case.file]  # noqa: E731
        if case.outcome == "bad":
            got = [f.reason for f in in_file(result.bad)]
        elif case.outcome == "warn":
            got = [f.reason for f in in_file(result.warnings)] if case.id in clean else ["not clean"]
        elif case.outcome == "excluded":
            got = [r for r in result.excluded if case.id not in clean]
        else:
            got = [""] if case.id in clean else [f.reason for f in in_file(result.bad)] or ["missing"]
        hit = any(case.reason in g for g in got)
        table.append(f"{case.kind:<40} {case.outcome:<8} {case.stage:<9} {'ok' if hit else 'WRONG'}  {got[:1]}")
        if not hit:
            wrong.append(table[-1])
    print("\n".join(table))
    assert not wrong, "\n".join(wrong)
    # Nothing bad that the corpus did not plant (the good records are clean, the counts add up).
    expected_bad = sum(c.outcome == "bad" for c in cases)
    assert len(result.bad) == expected_bad, [f.reason for f in result.bad]
    assert result.records == len(result.clean) + len(result.bad) + sum(result.excluded.values())


def test_a_native_crash_or_hang_costs_one_file(checked):
    result, _ = checked
    reasons = {f.id: f.reason for f in result.bad}
    assert "SIGSEGV" in reasons["decoder-segfault"] and "timed out" in reasons["decoder-hang"]
    assert "good-video" in {s.id for _, s, _ in result.clean}  # the same pool kept serving the other files


def test_files_written_into_the_run_folder(checked):
    result, run_dir = checked
    out = run_dir / "preflight"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == [s.id for _, s, _ in result.clean]
    assert all(m["tokens"] <= 512 for m in manifest)
    bad = [json.loads(line) for line in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert len(bad) == len(result.bad) and all({"id", "file", "reason"} <= row.keys() for row in bad)
    media_rows = [row for row in bad if row["id"] == "corrupt-png"]
    assert media_rows[0]["media"] == "img/corrupt.png" and media_rows[0]["file"].endswith("records.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad"] == len(result.bad) and summary["videos_probed"] == result.videos_probed
    assert summary["train_fingerprint"] == data_fingerprint([s for _, s, _ in result.clean])
    text = format_preflight(result, out)
    assert "FAIL" in text and "videos probed" in text and "bad_samples.jsonl" in text


def test_each_video_is_probed_once(tmp_path, monkeypatch):
    from tests.data.video.video_media import encode_video

    root = tmp_path / "data"
    (root / "v").mkdir(parents=True)
    for name in ("a", "b"):
        encode_video(root / "v" / f"{name}.mp4", 20)
    records = [{"id": f"s{i}", "task": "action_recognition", "videos": [{"path": f"v/{'ab'[i % 2]}.mp4",
                                                                         "start": 0.1 * (i % 5), "end": 1.5}],
                "conversations": [{"from": "human", "value": "<video>\nAction?"}, {"from": "gpt", "value": "clipping"}]}
               for i in range(40)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    calls = []
    real = preflight.check_video
    monkeypatch.setattr(preflight, "check_video", lambda path, *a: calls.append(path) or real(path, *a))
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", corpus_overrides(root / "train.jsonl", tmp_path / "run"))
    result = run_preflight(cfg, workers=2, write=False)
    assert sorted(p.name for p in calls) == ["a.mp4", "b.mp4"]
    assert len(result.clean) == 40 and result.videos_probed == 2 and result.ok


def test_validate_exit_code_follows_the_threshold(corpus, checked, tmp_path, capsys):
    result, _ = checked
    recipe = str(REPO / "recipes" / "demo.yaml")
    # Without the fault injection the segfault/hang files are good videos: two fewer bad records.
    fraction = (len(result.bad) - 2) / result.records
    over = corpus_overrides(corpus[0], tmp_path / "run")
    assert main(["validate", recipe, *over, f"data.max_bad_fraction={fraction + 0.001:.4f}"]) == 0
    out = capsys.readouterr().out
    assert "validate: ok" in out and "x cannot decode image" in out
    assert main(["validate", recipe, *over, f"data.max_bad_fraction={fraction - 0.001:.4f}", "--workers", "1"]) == 3
    out = capsys.readouterr().out
    assert f"{len(result.bad) - 2} bad" in out and "FAIL" in out
    assert (tmp_path / "run" / "preflight" / "bad_samples.jsonl").is_file()
