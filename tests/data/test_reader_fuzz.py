"""Readers never raise on malformed fields: every field of every reader's records, given every wrong type.

Cases are generated in code (deterministic): for each reader a few well-formed base records, every field in
them (walked recursively: nested objects and list items too) replaced by each value of `WRONG_VALUES`, and every
object field also deleted. Each case must end as either
* a valid sample: well-typed throughout (the index can store it), and not the base sample unchanged (a wrong
  value that changed nothing was silently ignored), or
* a bad record whose reason names the field,
and never as an exception.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from surgsigma_train.config.schema import DEFAULT_TASK_IDS
from surgsigma_train.data.index import SampleIndex, _row, build_index
from surgsigma_train.data.readers import ReadReport, read_file, read_records
from surgsigma_train.data.sample import Sample

REPO = Path(__file__).resolve().parents[2]
MARK = "surprise"  # every wrong value that holds anything holds this (or the number), so a drop is detectable
WRONG_VALUES: dict[str, Any] = {
    "string": MARK, "dict": {MARK: 1}, "list": [MARK], "nested list": [[MARK]], "null": None, "number": 7357,
    "float": -2.5, "bool": True, "empty string": "", "empty list": [], "empty dict": {},
}
DELETED = object()
COMPANION = "companion"

# Base records: well-formed, and between them using every field each reader reads.
LLAVA = [
    {"id": "l1", "task": "phase_recognition", "specialty": "Hepatobiliary", "source": "Cholec80",
     "source_video": "VID01", "thinking": "Because.", "images": ["img/a.png"],
     "videos": [{"path": "vid/a.mp4", "start": 1, "end": 3, "observe_until": 2}],
     "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image><video>\nWhat?"},
                       {"from": "gpt", "value": "Preparation."}]},
    {"id": "l2", "image": "img/b.png", "video": "vid/b.mp4", "clinical specialty": "Urology",
     "source dataset": "RARP", "conversations": [{"from": "user", "value": "Which phase?"},
                                                 {"from": "assistant", "value": "Dissection."}]},
]
OPENAI = [
    {"id": "o1", "task": "phase_recognition", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": "img/a.png"}},
            {"type": "image_url", "image_url": "img/b.png"},  # the plain-string form (ms-swift's docs)
            {"type": "image", "image": "img/c.png"},
            {"type": "image", "path": "img/d.png"},
            {"type": "video", "video": "vid/a.mp4", "start": 1, "end": 3, "observe_until": 2},
            {"type": "video_url", "video_url": {"url": "vid/b.mp4"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Preparation."}]}]},
    {"id": "o2", "images": ["img/a.png"], "videos": ["vid/a.mp4"], "messages": [
        {"role": "user", "content": "<image><video>What?"}, {"role": "assistant", "content": "Dissection."}]},
]
SURGSIGMA_RECORDS = [
    {"id": "s1", "task type": [5], "question": "Which phase?", "answer": "Preparation.", "thinking": "Level 1.",
     "image path": "CholecT50/VID01/000001.png"},
    {"id": "s2", "task type": 8, "query": "Which action?", "answer": "clipping", "reasoning": "Level 2.",
     "images": ["CholecT50/VID01/000002.png"], "video path": "Cholec80/vid01.mp4"},
]
SURGSIGMA_RELEASE = {
    "annos": [{"id": "a1", "images": ["i1", "v1"], "task type": [13], "question": "Describe.",
               "answer": "Frame, then clip.", "reasoning": "Level 1."}],
    "images": [{"id": "i1", "image path": "CholecT50/videos/VID01/000001.png"}],
    "videos": [{"id": "v1", "video path": "Cholec80/videos/vid01.mp4", "source dataset": "Cholec80",
                "clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy",
                "source url": "https://example.org/cholec80", "start": 4, "end": 9.5}],
}


@dataclass
class Outcome:
    reader: str
    path: tuple
    kind: str
    result: str  # sample | bad | excluded | exception | wrong: ...
    detail: str


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every field position in a record: object keys and list items, at every depth."""
    out = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _mutated(base: Any, path: tuple, value: Any) -> Any:
    record = copy.deepcopy(base)
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return record


def _field_name(path: tuple) -> str:
    """The name a reason must use: the innermost object key on the path."""
    return next(str(k) for k in reversed(path) if isinstance(k, str))


def _type_problems(s: Sample) -> list[str]:
    problems = []
    if not isinstance(s.id, str) or not s.id:
        problems.append(f"id {s.id!r}")
    for name in ("task", "specialty", "source", "source_video", "thinking"):
        value = getattr(s, name)
        if not (isinstance(value, str) or (value is None and name != "task")):
            problems.append(f"{name} {value!r}")
    for m in s.messages:
        if m.role not in ("system", "user", "assistant") or not isinstance(m.content, str):
            problems.append(f"message {m!r}")
    for ref in s.media:
        if ref.kind not in ("image", "video") or not isinstance(ref.path, str) or not ref.path:
            problems.append(f"media {ref!r}")
        for bound in (ref.start_s, ref.end_s, ref.observe_until_s):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                problems.append(f"media bound {bound!r}")
    if not all(isinstance(v, str) for v in s.extra.values()):
        problems.append(f"extra {s.extra!r}")
    try:
        _row(s)
    except Exception as exc:  # noqa: BLE001 - the index must be able to store every sample
        problems.append(f"index row: {exc}")
    return problems


def _run(reader: str, fmt: str, record: Any) -> tuple[list[Sample], ReadReport]:
    """Read one record (or release document): its samples, and a report of its bad/excluded records only."""
    records = [("#document" if reader == "surgsigma release" else "#0", record)]
    if reader == "surgsigma records":  # with a second record, as in a JSONL file (one alone may be a document)
        records.append(("#1", dict(SURGSIGMA_RECORDS[0], id=COMPANION)))
    samples, report = read_records(records, ReadReport("fuzz.json"), fmt, DEFAULT_TASK_IDS, Path("media"))
    report.bad = [b for b in report.bad if b.record != COMPANION]
    return [s for s in samples if s.id != COMPANION], report


# Reasons about the whole conversation, fair for a value of the right type that is empty.
CONVERSATION_REASONS = ("empty assistant turn", "no assistant turn", "does not end with an assistant turn",
                        "placeholders")


def _names_field(reason: str, path: tuple, kind: str, value: Any, report: ReadReport) -> bool:
    """Whether a reason tells the user which field is wrong."""
    if _field_name(path) in reason:
        return True
    if MARK in reason or (isinstance(value, (int, float)) and str(value) in reason):
        return True  # a value of the right type that means nothing (unknown task id 7357): the value is named
    if kind.startswith("empty") and any(r in reason for r in CONVERSATION_REASONS):
        return True
    # a release document's table made unrecognisable (tables are found by content): the report names it unmapped
    return any(key.startswith(f"top-level {path[0]!r}") for key in report.unmapped_fields)


def _classify(reader: str, fmt: str, base: Any, path: tuple, kind: str, value: Any) -> Outcome:
    base_samples, _ = _run(reader, fmt, base)
    assert len(base_samples) == 1, f"{reader} base record is not a valid sample"
    record = _mutated(base, path, value)
    try:
        samples, report = _run(reader, fmt, record)
    except Exception as exc:  # noqa: BLE001 - what the fuzzer counts
        return Outcome(reader, path, kind, "exception", f"{type(exc).__name__}: {exc}")
    if report.bad:
        reasons = "; ".join(b.reason for b in report.bad)
        if "malformed record (" in reasons:  # readers.py's last-resort guard: a field without its own check
            return Outcome(reader, path, kind, "wrong: caught only by the guard", reasons)
        named = all(_names_field(b.reason, path, kind, value, report) for b in report.bad)
        return Outcome(reader, path, kind, "bad" if named else "wrong: reason does not name the field", reasons)
    if report.excluded:
        return Outcome(reader, path, kind, "excluded", str(dict(report.excluded)))
    if len(samples) != 1:
        return Outcome(reader, path, kind, "wrong: neither a sample nor a bad record", str(report.summary()))
    sample, base_sample = samples[0], base_samples[0]
    if problems := _type_problems(sample):
        return Outcome(reader, path, kind, "wrong: ill-typed sample", "; ".join(problems))
    if value not in (None, DELETED, "", [], {}):  # a value that holds something must show in the sample
        unchanged = [base_sample]
        if isinstance(path[-1], str):
            unchanged += _run(reader, fmt, _mutated(base, path, DELETED))[0]
        if any((sample, sample.extra) == (u, u.extra) for u in unchanged):
            return Outcome(reader, path, kind, "wrong: value silently ignored", repr(value))
    return Outcome(reader, path, kind, "sample", "")


def fuzz_cases() -> list[tuple[str, str, Any, tuple, str, Any]]:
    bases = [("llava", "llava", r) for r in LLAVA] + [("openai", "openai", r) for r in OPENAI]
    bases += [("surgsigma records", "surgsigma", r) for r in SURGSIGMA_RECORDS]
    bases += [("surgsigma release", "surgsigma", SURGSIGMA_RELEASE)]
    cases = []
    for reader, fmt, base in bases:
        for path in _paths(base):
            # Deleting an object field, not a list item; release tables are found by content, not by name, so
            # a deleted table has no name a reason could give.
            deletable = isinstance(path[-1], str) and not (reader == "surgsigma release" and len(path) == 1)
            values = dict(WRONG_VALUES, **({"deleted": DELETED} if deletable else {}))
            cases += [(reader, fmt, base, path, kind, value) for kind, value in values.items()]
    return cases


def test_every_fuzzed_field_is_a_sample_or_a_bad_record_naming_it():
    outcomes = [_classify(*case) for case in fuzz_cases()]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result.split(":")[0]] = counts.get(o.result.split(":")[0], 0) + 1
    print(f"\nreader fuzz: {len(outcomes)} cases: {json.dumps(counts)}")  # shown with pytest -s
    failures = [o for o in outcomes if o.result not in ("sample", "bad", "excluded")]
    assert not failures, f"{len(failures)} of {len(outcomes)} cases:\n" + "\n".join(
        f"{o.reader} {o.path} = {o.kind}: {o.result} ({o.detail})" for o in failures[:60])
    assert len(outcomes) > 500 and counts["bad"] > counts["sample"] > 0  # the generator really covered fields


def test_openai_image_url_as_a_plain_string_is_an_image():
    record = {"id": "x", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "img/a.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "Preparation."}]}
    samples, report = _run("openai", "openai", record)
    assert not report.bad and [(m.kind, m.path) for m in samples[0].media] == [("image", "img/a.png")]
    assert samples[0].messages[0].content == "<image>?"


def _fuzzed_records() -> list[dict]:
    """A handful of malformed OpenAI records (first: a good one), as in the fuzzer."""
    good = {"id": "good", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "img/ok.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "Preparation."}]}
    bad = [_mutated(good, ("messages", 0, "content", 0, "image_url"), ["img/ok.png"]),
           _mutated(good, ("messages", 0, "content", 1, "text"), {MARK: 1}),
           _mutated(good, ("messages", 0, "content", 0), "img/ok.png"),
           _mutated(good, ("messages", 1), None),
           _mutated(good, ("messages", 0, "role"), [[MARK]])]
    return [good] + [dict(r, id=f"fuzzed-{i}") for i, r in enumerate(bad)]


def test_validate_on_fuzzed_records_exits_with_the_bad_data_code(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "ok.png")
    records = _fuzzed_records()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run(
        [sys.executable, "-m", "surgsigma_train.cli", "validate", str(REPO / "recipes" / "demo.yaml"),
         f"data.train.0.path={tmp_path / 'data.jsonl'}", "data.eval=[]", f"output.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr.replace("DataError", "")
    bad = [json.loads(line) for line in (tmp_path / "run" / "preflight" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(b["id"] for b in bad) == sorted(r["id"] for r in records[1:])
    assert all(re.search(r"messages\[\d\]", b["reason"]) for b in bad), bad


def test_the_index_agrees_with_the_reader_on_fuzzed_release_documents(tmp_path):
    """`data index` streams release documents with its own table code: same samples, same bad records."""
    cases = [c for c in fuzz_cases() if c[0] == "surgsigma release"]
    for n, (_, fmt, base, path, kind, value) in enumerate(cases):
        source = tmp_path / f"{n}.json"
        source.write_text(json.dumps(_mutated(base, path, value)))
        samples, report = read_file(source, fmt, DEFAULT_TASK_IDS, tmp_path, check_media=False)
        build_index(source, tmp_path / f"idx{n}", DEFAULT_TASK_IDS, fmt=fmt, check_media=False)
        index = SampleIndex(tmp_path / f"idx{n}")
        assert (list(index), index.report().bad) == (samples, report.bad), (path, kind)
    assert len(cases) > 200


def test_an_unforeseen_error_in_a_reader_makes_a_bad_record(monkeypatch):
    """The last-resort guard: a bug or an unchecked field costs one record, with the error as its reason."""
    import surgsigma_train.data.readers as readers

    def broken(*args, **kwargs):
        raise TypeError("unforeseen")

    monkeypatch.setattr(readers, "_finish", broken)
    samples, report = _run("llava", "llava", LLAVA[0])
    assert samples == [] and [(b.record, b.reason) for b in report.bad] == [
        ("l1", "malformed record (TypeError: unforeseen)")]
