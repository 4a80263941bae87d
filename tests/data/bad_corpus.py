"""A bad-input corpus written by the tests: every kind of broken record and media file, one record each.

Each `Case` says what must happen to it: `outcome` "bad" (with a `reason` substring), "warn" (trains, with a
warning), "excluded" (counted, not trained on) or "ok"; and `stage`, where it is caught:
* "read": the readers refuse it (it never reaches a data loader);
* "load": it is read, reaches the loader, and encoding it fails: dropped and counted at train time;
* "preflight": only the preflight refuses it (a policy: unknown task name, answer without the shape its
  task needs, duplicate id across files) or only the preflight's fault-injected decoder crashes on it;
* "ok": trains (clean samples and warnings).
Videos reuse tests/data/video/video_media.py (deterministic PyAV encodes).
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data.video.video_media import VFR_PTS, encode_audio_only, encode_video, truncate

# Loaded into the preflight's decoder children: files named segv*/hang* really crash / hang there.
FAULTS_INITIALIZER = "video_faults:install"
FAULTS_SYS_PATH = str(Path(__file__).parent / "video")


@dataclass(frozen=True)
class Case:
    kind: str
    id: str  # the record id a report names ("line N" for unparseable lines, "#file" for whole files)
    outcome: str  # bad | warn | excluded | ok
    reason: str  # expected substring of the reported reason ("" for ok)
    stage: str  # read | load | preflight | ok
    file: str = "records.jsonl"  # the data file the record is in


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, side: int = 40_000) -> None:
    """A few hundred bytes claiming side x side pixels: Pillow's bomb check fires at open, nothing is allocated."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _media(raw: Path, outside: Path) -> None:
    (raw / "img").mkdir(parents=True)
    (raw / "vid").mkdir()
    (raw / "links").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(raw / "img/ok.png")
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(raw / "img/ok.jpg", quality=90)
    good_png, good_jpg = (raw / "img/ok.png").read_bytes(), (raw / "img/ok.jpg").read_bytes()
    (raw / "img/corrupt.png").write_bytes(good_png[:8] + b"this is not a PNG chunk stream" * 4)
    (raw / "img/truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (raw / "img/truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 3])
    (raw / "img/zero.png").write_bytes(b"")
    Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 7).astype(np.uint16)).save(raw / "img/sixteen_bit.png")
    Image.new("CMYK", (96, 64), (10, 200, 30, 0)).save(raw / "img/cmyk.jpg")
    Image.new("RGB", (96, 64), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(raw / "img/palette.png")
    _bomb_png(raw / "img/bomb.png")
    Image.new("RGB", (32, 32)).save(outside)  # a real file outside the data root
    (raw / "links/escape.png").symlink_to(Path("..") / ".." / outside.name)

    ok = encode_video(raw / "vid/ok.mp4", 30)
    encode_video(raw / "vid/one_frame.mp4", 1)
    encode_video(raw / "vid/vfr.mp4", len(VFR_PTS), pts=VFR_PTS, time_base=Fraction(1, 100))
    encode_audio_only(raw / "vid/audio_only.mp4")
    truncate(ok, raw / "vid/truncated.mp4", 0.6)  # the moov atom (at the end) is cut off
    (raw / "vid/zero.mp4").write_bytes(b"")
    (raw / "vid/text.mp4").write_text("this is not a video\n" * 40)
    shutil.copy(raw / "img/ok.png", raw / "vid/png_named.mp4")
    shutil.copy(ok, raw / "img/video_named.png")
    shutil.copy(ok, raw / "vid/segv_on_open.mp4")  # a good file; the fault-injected decoder segfaults on it
    shutil.copy(ok, raw / "vid/hang_on_open.mp4")  # a good file; the fault-injected decoder hangs on it


def _image_rec(rid: str, path: str, task: str = "phase_recognition", answer: str = "The phase is Preparation.",
               **extra: object) -> dict:
    return {"id": rid, "task": task, "images": [path],
            "conversations": [{"from": "human", "value": "<image>\nWhich phase is this?"},
                              {"from": "gpt", "value": answer}], **extra}


def _video_rec(rid: str, video: object, task: str = "action_recognition", answer: str = "dissection") -> dict:
    return {"id": rid, "task": task, "videos": [video],
            "conversations": [{"from": "human", "value": "<video>\nWhich action is shown?"},
                              {"from": "gpt", "value": answer}]}


def _anno(rid: str, task: object, answer: str, image: str = "img/ok.png", **extra: object) -> dict:
    return {"id": rid, "task type": task, "answer": answer, "image path": image,
            "question": "What is shown?", **extra}


def write_bad_corpus(root: Path) -> tuple[Path, list[Case]]:
    """Writes `root/corpus/` (data files, media under its raw_data/) and returns (the source folder, the cases)."""
    corpus = root / "corpus"
    raw = corpus / "raw_data"
    raw.mkdir(parents=True)
    outside = corpus / "outside.png"  # inside the corpus folder, outside the media root raw_data/
    _media(raw, outside)
    cases: list[Case] = []
    lines: list[str] = []

    def add(record: object, case: Case | None) -> None:
        lines.append(record if isinstance(record, str) else json.dumps(record))
        if case is not None:
            cases.append(case)

    def rec(kind: str, record: dict, outcome: str, reason: str, stage: str) -> None:
        add(record, Case(kind, str(record["id"]), outcome, reason, stage))

    # ---- records.jsonl (LLaVA/ShareGPT): the first line fixes the format
    rec("good image", _image_rec("good-image", "img/ok.png"), "ok", "", "ok")
    rec("good video", _video_rec("good-video", "vid/ok.mp4"), "ok", "", "ok")
    # videos
    rec("truncated mp4", _video_rec("truncated-mp4", "vid/truncated.mp4"), "bad", "no video stream", "load")
    rec("zero-byte video", _video_rec("zero-byte-video", "vid/zero.mp4"), "bad", "empty file (0 bytes)", "load")
    rec("text file as video", _video_rec("text-as-video", "vid/text.mp4"), "bad", "not a readable media file", "load")
    rec("audio-only file", _video_rec("audio-only", "vid/audio_only.mp4"), "bad", "only audio", "load")
    rec("one-frame video", _video_rec("one-frame-video", "vid/one_frame.mp4"), "warn", "holds 1 frame(s), 4 requested", "ok")
    rec("variable frame rate", _video_rec("vfr-video", "vid/vfr.mp4"), "warn", "variable frame rate", "ok")
    rec("image with a video extension", _video_rec("png-named-mp4", "vid/png_named.mp4"), "warn",
        "not a video (wrong file extension", "ok")
    rec("video with an image extension", _image_rec("mp4-named-png", "img/video_named.png"), "bad",
        "cannot decode image", "load")
    rec("clip after the end of its video", _video_rec("clip-after-end", {"path": "vid/ok.mp4", "start": 100, "end": 110}),
        "bad", "starts at or after the end", "load")
    rec("decoder segfault", _video_rec("decoder-segfault", "vid/segv_on_open.mp4"), "bad",
        "decoder crashed with signal 11 (SIGSEGV)", "preflight")
    rec("decoder hang", _video_rec("decoder-hang", "vid/hang_on_open.mp4"), "bad", "timed out after", "preflight")
    rec("missing video", _video_rec("missing-video", "vid/nowhere.mp4"), "bad", "media not found", "read")
    # images
    rec("corrupt PNG", _image_rec("corrupt-png", "img/corrupt.png"), "bad", "cannot decode image", "load")
    rec("truncated PNG", _image_rec("truncated-png", "img/truncated.png"), "bad", "truncated", "load")
    rec("truncated JPEG", _image_rec("truncated-jpeg", "img/truncated.jpg"), "bad", "cannot decode image", "load")
    rec("zero-byte image", _image_rec("zero-byte-image", "img/zero.png"), "bad", "cannot identify image file", "load")
    rec("16-bit image", _image_rec("sixteen-bit", "img/sixteen_bit.png"), "bad", "more than 8 bits per channel", "load")
    rec("CMYK image", _image_rec("cmyk-image", "img/cmyk.jpg"), "warn", "CMYK image", "ok")
    rec("palette image", _image_rec("palette-image", "img/palette.png"), "warn", "image mode P converted", "ok")
    rec("huge dimensions (decompression bomb)", _image_rec("bomb-image", "img/bomb.png"), "bad",
        "decompression", "load")
    rec("missing image", _image_rec("missing-image", "img/nowhere.png"), "bad", "media not found", "read")
    rec("symlink leaving the root", _image_rec("symlink-escape", "links/escape.png"), "bad",
        "resolves outside the data root", "load")
    rec("../ path", _image_rec("dotdot-path", "../outside.png"), "bad", "resolves outside the data root", "read")
    rec("absolute path", _image_rec("absolute-path", str(outside.resolve())), "bad", "absolute media path", "read")
    # records
    add('{"id": "malformed-line", "conversations": [', None)
    cases.append(Case("malformed JSONL line", f"line {len(lines)}", "bad", "malformed JSON", "read"))
    add("42", None)
    cases.append(Case("record that is not an object", f"line {len(lines)}", "bad", "record is a int", "read"))
    rec("conversations not a list", {"id": "conv-not-list", "conversations": "hello"}, "bad",
        "'conversations' must be a list", "read")
    rec("turn value not a string", {"id": "value-not-str", "conversations": [{"from": "human", "value": 3},
                                                                           {"from": "gpt", "value": "x"}]},
        "bad", "needs a string 'value'", "read")
    rec("media entry not a path", _image_rec("media-not-path", 17), "bad", "entries must be paths", "read")
    rec("empty conversation", {"id": "empty-conv", "conversations": []}, "bad", "empty conversation", "read")
    rec("no assistant turn", {"id": "no-assistant", "conversations": [{"from": "human", "value": "hi"}]}, "bad",
        "no assistant turn", "read")
    rec("empty answer", _image_rec("empty-answer", "img/ok.png", answer="  "), "bad", "empty assistant turn", "read")
    rec("unknown speaker", {"id": "unknown-speaker", "conversations": [{"from": "alien", "value": "hi"},
                                                                      {"from": "gpt", "value": "x"}]},
        "bad", "unknown speaker", "read")
    mismatch = _image_rec("placeholder-mismatch", "img/ok.png")
    mismatch["conversations"][0]["value"] = "<image><image>\nCompare."
    rec("placeholder count mismatch", mismatch, "bad", "placeholders 2 <image>", "read")
    in_answer = _image_rec("placeholder-in-answer", "img/ok.png", answer="<image> is Preparation")
    rec("placeholder in the answer", in_answer, "bad", "media placeholder in an assistant turn", "read")
    rec("negative clip start", _video_rec("negative-start", {"path": "vid/ok.mp4", "start": -2}), "bad",
        "non-negative number of seconds", "read")
    rec("unknown task name", _image_rec("unknown-task", "img/ok.png", task="teleportation"), "bad",
        "unknown task 'teleportation'", "preflight")
    rec("localization answer without boxes", _image_rec("no-boxes", "img/ok.png", task="instrument_localization",
                                                        answer="somewhere on the left"),
        "bad", "answer not parseable as boxes", "preflight")
    rec("remaining time without a number", _video_rec("no-seconds", "vid/ok.mp4", task="action_remaining_time",
                                                      answer="soon"), "bad", "no number of seconds", "preflight")
    rec("over-long sample", _image_rec("over-long", "img/ok.png", answer="dissection " * 2000), "bad",
        "> data.max_seq_len", "load")
    rec("duplicate id in a file", _image_rec("good-image", "img/ok.jpg"), "bad", "duplicate id", "read")
    (corpus / "records.jsonl").write_text("\n".join(lines) + "\n")

    # ---- other files
    dupes = [_image_rec("dupe-first", "img/ok.png"), _image_rec("good-video", "img/ok.png")]
    (corpus / "z_dupes.jsonl").write_text("\n".join(json.dumps(r) for r in dupes) + "\n")
    cases.append(Case("good record in a second file", "dupe-first", "ok", "", "ok", "z_dupes.jsonl"))
    cases.append(Case("duplicate id across files", "good-video", "bad", "duplicate id (first in", "preflight",
                      "z_dupes.jsonl"))
    annos = [
        (_anno("surg-good", [5], "The phase is Preparation."), "ok", "", "ok"),
        (_anno("unknown-task-id", [99], "x"), "bad", "unknown task id 99", "read"),
        (_anno("task-not-int", ["abc"], "x"), "bad", "is not an integer", "read"),
        (_anno("corrupted-boxes", [1], "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(36the9,0),"
                                        "(877,567)<|box_end|>"), "bad", "quarantined", "read"),
        (_anno("generation-task", [7], "a desmoked image"), "excluded", "generation task desmoking", "read"),
        ({"id": "no-question", "task type": [5], "answer": "x", "image path": "img/ok.png"}, "bad",
         "no question field", "read"),
    ]
    (corpus / "surgsigma.jsonl").write_text("\n".join(json.dumps(a) for a, *_ in annos) + "\n")
    cases += [Case(f"SurgΣ-DB record: {a['id']}", a["id"], o, r, s, "surgsigma.jsonl") for a, o, r, s in annos]
    (corpus / "broken.json").write_text('[{"id": "x", "conversations": [}]')
    cases.append(Case("malformed JSON file", "#file", "bad", "cannot read as JSON/JSONL", "read", "broken.json"))
    good = json.dumps(_image_rec("latin1", "img/ok.png", answer="Präparation"), ensure_ascii=False).encode("utf-8")
    (corpus / "latin1.jsonl").write_bytes(good.replace("ä".encode("utf-8"), "ä".encode("latin-1")) + b"\n")
    cases.append(Case("invalid UTF-8", "#file", "bad", "'utf-8' codec can't decode", "read", "latin1.jsonl"))
    return corpus, cases
