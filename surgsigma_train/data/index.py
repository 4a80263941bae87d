"""Arrow sample index: SurgΣ-DB at scale (~6 M conversations) without millions of Python objects.

Building (`build_index`) is a separate, resumable offline step, never done by training ranks while the
others wait. It streams the source with ijson (the release document is never loaded as one Python
object), keeps the media tables (id -> path) in sorted numpy/Arrow arrays instead of millions of dicts,
turns every record into a `Sample` with the very reader `read_file` uses, and writes Arrow IPC shards plus
a manifest. A shard is written to `.tmp`, renamed, then the manifest is replaced atomically, so a rerun
after a kill continues after the last complete shard; the manifest names the source file (size, mtime,
sha256 of its first MiB) and the build parameters, and a different source is refused.

Reading (`SampleIndex`) memory-maps the shards: DataLoader workers share the page cache instead of each
holding (and, after fork, copy-on-read duplicating) a list of millions of samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from surgsigma_train.config.schema import DataSource
from surgsigma_train.data.readers import (
    KNOWN_TABLE_KEYS, BadRecord, MediaCheck, ReadReport, RecordError, SurgSigmaTables, _as_list, _read_llava,
    _read_openai, _read_surgsigma, dataset_specialty, default_media_root, detect_format, no_annotations_reason,
    record_id, table_entry_id,
)
from surgsigma_train.data.sample import MediaRef, Message, Sample
from surgsigma_train.errors import DataError

MANIFEST = "index_manifest.json"  # its presence marks a directory as an index
REPORT = "report.json"  # the bad/excluded records report, next to the shards
INDEX_VERSION = 1
_HEAD_BYTES = 1 << 20
_CHUNK_RECORDS = 4096  # records whose media ids are looked up together (vectorised)

_MEDIA = pa.struct([("kind", pa.string()), ("path", pa.string()), ("start", pa.float64()),
                    ("end", pa.float64()), ("observe_until", pa.float64())])
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("specialty", pa.string()), ("source", pa.string()),
    ("source_video", pa.string()), ("media", pa.list_(_MEDIA)), ("messages", pa.list_(_MESSAGE)),
    ("thinking", pa.string()), ("media_root", pa.string()), ("extra", pa.string()),  # extra: JSON or null
])
_STRING_FIELDS = ("id", "task", "specialty", "source", "source_video", "thinking", "media_root")


# ---------------------------------------------------------------- small helpers
def source_identity(path: Path) -> dict[str, Any]:
    """What makes a resumed build safe: the same bytes (size, mtime, hash of the head)."""
    st = path.stat()
    with path.open("rb") as fh:
        head = hashlib.sha256(fh.read(_HEAD_BYTES)).hexdigest()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sample_digest(s: Sample) -> bytes:
    # the same per-sample content `training.run.data_fingerprint` hashes for in-memory sample lists
    return json.dumps([s.id, s.task, [m.path for m in s.media], [m.content for m in s.messages]]).encode()


_COUNTERS = ("excluded", "unmapped_fields", "repaired", "missing_media")


def _report_to_dict(r: ReadReport) -> dict[str, Any]:
    return {**r.summary(), **{name: dict(getattr(r, name)) for name in _COUNTERS},
            "bad": [{"file": b.file, "id": b.record, "reason": b.reason} for b in r.bad]}


def _report_from_dict(d: dict[str, Any]) -> ReadReport:
    r = ReadReport(d["file"], d["format"], d["records"], d["samples"])
    for name in _COUNTERS:
        getattr(r, name).update(d.get(name, {}))
    r.bad.extend(BadRecord(b["file"], b["id"], b["reason"]) for b in d["bad"])
    return r


def is_index(path: str | Path) -> bool:
    return Path(path, MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    file = Path(path, MANIFEST)
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: cannot read the index manifest ({exc})") from None


# ---------------------------------------------------------------- compact media tables
class _MediaTable:
    """id -> payload for millions of ids: sorted numpy bytes ids + one Arrow string array of payloads.

    A dict of 6 M Python dicts costs several GB; this costs the bytes of the ids and paths. Later
    entries with the same id win, as in `readers._surgsigma_tables` (dict.update).
    """

    def __init__(self) -> None:
        self._id_chunks: list[np.ndarray] = []
        self._payload_chunks: list[pa.Array] = []
        self.ids = np.array([], dtype="S1")
        self.pos = np.array([], dtype=np.int64)
        self.payloads = pa.array([], pa.large_string())

    def add(self, ids: list[str], payloads: list[str | None]) -> None:
        if ids:
            self._id_chunks.append(np.array([i.encode() for i in ids], dtype=bytes))
            self._payload_chunks.append(pa.array(payloads, pa.large_string()))

    def finish(self) -> None:
        if not self._id_chunks:
            return
        ids = np.concatenate(self._id_chunks)
        self.payloads = pa.concat_arrays(self._payload_chunks)
        self._id_chunks, self._payload_chunks = [], []
        order = np.argsort(ids, kind="stable")  # stable: the last of equal ids is the latest entry
        ids = ids[order]
        last = np.ones(len(ids), dtype=bool)
        last[:-1] = ids[:-1] != ids[1:]
        self.ids, self.pos = ids[last], order[last]

    def lookup(self, keys: list[str]) -> dict[str, str | None]:
        if not keys or not len(self.ids):
            return {}
        query = np.array([k.encode() for k in keys], dtype=bytes)
        at = np.searchsorted(self.ids, query)
        clipped = np.minimum(at, len(self.ids) - 1)
        hit = (at < len(self.ids)) & (self.ids[clipped] == query)
        found = self.payloads.take(pa.array(self.pos[clipped[hit]])).to_pylist()
        return dict(zip(itertools.compress(keys, hit), found))


# ---------------------------------------------------------------- streaming the source
def _scan_top_level(path: Path) -> list[tuple[str, bool, frozenset | None, frozenset | None]] | None:
    """(key, is a list, keys of its first object entry, keys of entry 0 if an object) per top-level key,
    in document order, from one event pass; None if the document is not a JSON object."""
    tops: list[list] = []
    names: set[str] = set()
    cur: list | None = None
    item_prefix, collecting, keys, n_items = "", False, set(), 0
    with path.open("rb") as fh:
        for prefix, event, value in ijson.parse(fh, use_float=True):
            if prefix == "":
                if event == "map_key":
                    if value in names:
                        raise DataError(f"{path}: top-level key {value!r} appears twice")
                    if "." in value:  # ijson joins paths with '.', so such a table could not be streamed
                        raise DataError(f"{path}: top-level key {value!r} contains '.', which cannot be streamed")
                    names.add(value)
                    cur = [value, None, None, None]
                    tops.append(cur)
                    item_prefix, collecting, n_items = f"{value}.item", False, 0
                elif event not in ("start_map", "end_map"):
                    return None
                continue
            if cur is None or cur[2] is not None:
                continue  # this table is classified already: nothing more to learn from it
            if cur[1] is None:
                cur[1] = event == "start_array"
            elif prefix == item_prefix:
                if event == "map_key":
                    if collecting:
                        keys.add(value)
                elif event == "end_map":
                    if collecting:
                        cur[2] = frozenset(keys)
                        collecting = False
                elif event != "end_array":  # an entry starts
                    if event == "start_map":
                        collecting, keys = True, set()
                        if n_items == 0:
                            cur[3] = True
                    n_items += 1
    return [(k, bool(is_list), first, first if elem0 else None) for k, is_list, first, elem0 in tops]


def _stream_items(path: Path, prefix: str) -> Iterator[Any]:
    with path.open("rb") as fh:
        yield from ijson.items(fh, prefix, use_float=True)


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _stream_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"line {lineno}", _Malformed(f"malformed JSON ({exc.msg})")


class _Plan:
    """How to stream one source: its records in order, and the reader context for a chunk of them."""

    def __init__(self, fmt: str, records: Callable[[], Iterator[tuple[str, Any]]],
                 context: Callable[[list[tuple[str, Any]]], dict[str, Any]], unmapped: dict[str, int]):
        self.fmt, self.records, self.context, self.unmapped = fmt, records, context, unmapped


def _plan_release_document(path: Path, tops: list, task_ids: dict[int, str]) -> _Plan:
    """Mirror `readers._surgsigma_tables` with streaming passes and compact tables."""
    unmapped: dict[str, int] = {}
    anno_keys, images, videos = [], _MediaTable(), _MediaTable()
    by_dataset: dict[str, set[str]] = {}
    for key, is_list, first, _ in tops:
        if not is_list or first is None:
            unmapped[f"top-level {key!r}"] = 1
        elif "task type" in first or "answer" in first:
            anno_keys.append(key)
        elif "video path" in first or "image path" in first:
            is_video = "video path" in first
            ids: list[str] = []
            payloads: list[str | None] = []
            for entry in _stream_items(path, f"{key}.item"):
                entry_id = table_entry_id(entry)
                if entry_id is None:  # counted as readers._surgsigma_tables does
                    unmapped[f"{key!r} entry without an id"] = unmapped.get(f"{key!r} entry without an id", 0) + 1
                    continue
                for name in entry.keys() - KNOWN_TABLE_KEYS:
                    unmapped[f"{key!r} entry field {name!r}"] = unmapped.get(f"{key!r} entry field {name!r}", 0) + 1
                ids.append(entry_id)
                if is_video:
                    payloads.append(json.dumps(entry))
                    if pair := dataset_specialty(entry):
                        by_dataset.setdefault(pair[0], set()).add(pair[1])
                else:  # the path as JSON: the reader reports a missing or non-string one as it does for a list
                    payloads.append(json.dumps(entry.get("image path")))
                if len(ids) >= 1_000_000:
                    (videos if is_video else images).add(ids, payloads)
                    ids, payloads = [], []
            (videos if is_video else images).add(ids, payloads)
        else:
            unmapped[f"top-level {key!r}"] = 1
    images.finish()
    videos.finish()
    specialty = {ds: next(iter(s)) for ds, s in by_dataset.items() if len(s) == 1}

    def records() -> Iterator[tuple[str, Any]]:
        if not anno_keys:  # as readers.read_records: a document with nothing to read is one bad record
            yield "#document", _Malformed(no_annotations_reason(unmapped))
        counter = itertools.count()
        for key in anno_keys:
            for record in _stream_items(path, f"{key}.item"):
                yield f"annos#{next(counter)}", record

    def context(chunk: list[tuple[str, Any]]) -> dict[str, Any]:
        wanted = sorted({str(m) for _, r in chunk if isinstance(r, dict)
                         for field in ("images", "image path", "video path") for m in _as_list(r.get(field))})
        found_images = {k: {"image path": json.loads(p)} for k, p in images.lookup(wanted).items()}
        found_videos = {k: json.loads(p) for k, p in videos.lookup(wanted).items()}
        return {"tables": SurgSigmaTables(found_videos, found_images, specialty), "task_ids": task_ids}

    return _Plan("surgsigma", records, context, unmapped)


def _plan(path: Path, fmt: str, task_ids: dict[int, str]) -> _Plan:
    try:
        if path.suffix == ".jsonl":
            first = next((r for _, r in _stream_jsonl(path) if not isinstance(r, _Malformed)), None)
            records: Callable[[], Iterator[tuple[str, Any]]] = lambda: _stream_jsonl(path)  # noqa: E731
        else:
            tops = _scan_top_level(path)
            if tops is not None:
                keys = {k: first0 for k, _, _, first0 in tops}
                surgsigma = any(k == "task type" for k in keys) or any(
                    f0 is not None and ("task type" in f0 or "image path" in f0) for f0 in keys.values())
                if fmt in ("auto", "surgsigma") and surgsigma and "task type" not in keys:
                    return _plan_release_document(path, tops, task_ids)
                raise DataError(f"{path}: a single JSON object that is not a SurgΣ-DB release document (tables with "
                                "'task type'/'image path' entries); index JSONL, a JSON list or a release document")
            first = next(_stream_items(path, "item"), None)
            records = lambda: ((f"#{i}", r) for i, r in enumerate(_stream_items(path, "item")))  # noqa: E731
    except (OSError, UnicodeDecodeError, ijson.JSONError) as exc:
        raise DataError(f"{path}: cannot read as JSON/JSONL ({exc})") from None
    fmt = detect_format(first) if fmt == "auto" else fmt
    if fmt == "unknown":
        raise DataError(f"{path}: cannot tell the format (no 'conversations', 'messages' or SurgΣ-DB "
                        "'task type'/'image path' fields)")
    ctx = {"tables": SurgSigmaTables({}, {}, {}), "task_ids": task_ids} if fmt == "surgsigma" else {}
    return _Plan(fmt, records, lambda chunk: ctx, {})


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _row(s: Sample) -> dict[str, Any]:
    for name in _STRING_FIELDS:
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"{name} is a {type(value).__name__}, not a string")
    return {
        "id": s.id, "task": s.task, "specialty": s.specialty, "source": s.source, "source_video": s.source_video,
        "media": [{"kind": m.kind, "path": m.path, "start": m.start_s, "end": m.end_s,
                   "observe_until": m.observe_until_s} for m in s.media],
        "messages": [{"role": m.role, "content": m.content} for m in s.messages],
        "thinking": s.thinking, "media_root": s.media_root,
        "extra": json.dumps(s.extra) if s.extra else None,
    }


# ---------------------------------------------------------------- building
def build_index(source: str | Path, out_dir: str | Path, task_ids: dict[int, str], *, fmt: str = "auto",
                media_root: str | Path | None = None, check_media: bool = True, shard_rows: int = 262_144,
                batch_rows: int = 16_384, after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write (or finish) the Arrow index of `source` in `out_dir`; returns the manifest.

    Samples are exactly those `readers.read_file(source, fmt, task_ids, media_root, check_media=...)`
    returns, in order; the bad and excluded records go to `report.json`. `after_shard(n)` is called after shard n is
    committed (a test hook: raising there simulates a kill).
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_file():
        raise DataError(f"index source {source} is not a file")
    root = Path(media_root) if media_root else default_media_root(source)
    identity = source_identity(source)
    params = {"format": fmt, "task_ids": {str(k): v for k, v in sorted(task_ids.items())},
              "media_root": str(root), "check_media": check_media, "shard_rows": shard_rows, "batch_rows": batch_rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"version": INDEX_VERSION, "source": identity, "params": params, "shards": [],
                                "records_done": 0, "report": None, "complete": False}
    if is_index(out_dir):
        old = read_manifest(out_dir)
        same_source = all(old["source"].get(k) == identity[k] for k in ("size", "mtime_ns", "head_sha256"))
        if not same_source:
            raise DataError(f"{out_dir} holds an index of another source ({old['source']}); {source} is "
                            f"{identity}: use a new directory, or delete this one to rebuild")
        if old["params"] != params:
            raise DataError(f"{out_dir} was built with {old['params']}, not {params}: use a new directory")
        if old["complete"]:
            return old
        manifest = old
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()

    plan = _plan(source, fmt, task_ids)
    if manifest["report"] is not None:
        report = _report_from_dict(manifest["report"])
    else:
        report = ReadReport(str(source), plan.fmt)
        report.unmapped_fields.update(plan.unmapped)
    reader = {"llava": _read_llava, "openai": _read_openai, "surgsigma": _read_surgsigma}[plan.fmt]
    media_check = MediaCheck(root) if check_media else None
    skip = manifest["records_done"]
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {"writer": None, "rows": 0, "hash": hashlib.sha256()}

    def flush() -> None:
        if not rows:
            return
        if state["writer"] is None:
            name = f"shard-{len(manifest['shards']):05d}.arrow"
            state["name"], state["tmp"] = name, out_dir / f"{name}.tmp"
            state["writer"] = pa.ipc.new_file(str(state["tmp"]), SCHEMA)
        state["writer"].write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
        state["rows"] += len(rows)
        rows.clear()

    def commit(records_done: int) -> None:
        flush()
        if state["writer"] is None:
            return
        state["writer"].close()
        os.replace(state["tmp"], out_dir / state["name"])
        manifest["shards"].append({"file": state["name"], "rows": state["rows"],
                                   "fingerprint": state["hash"].hexdigest()[:16]})
        manifest["records_done"] = records_done
        manifest["report"] = _report_to_dict(report)
        _write_json_atomic(out_dir / MANIFEST, manifest)
        state.update(writer=None, rows=0, hash=hashlib.sha256())
        if after_shard is not None:
            after_shard(len(manifest["shards"]))

    done = 0
    try:
        for chunk in _chunks(plan.records(), _CHUNK_RECORDS):
            if done + len(chunk) <= skip:  # already in a committed shard: only the duplicate-id memory is rebuilt
                seen.update(str(r.get("id", f"{source.name}:{p}")) for p, r in chunk if isinstance(r, dict))
                done += len(chunk)
                continue
            context = {**plan.context(chunk), "report": report} if plan.fmt == "surgsigma" else {}
            for position, record in chunk:
                done += 1
                if done <= skip:
                    if isinstance(record, dict):
                        try:
                            seen.add(record_id(record, f"{source.name}:{position}"))
                        except RecordError:
                            pass
                    continue
                report.records += 1
                if isinstance(record, _Malformed):
                    report.bad.append(BadRecord(str(source), position, record.reason))
                    continue
                if not isinstance(record, dict):
                    report.bad.append(BadRecord(str(source), position,
                                                f"record is a {type(record).__name__}, not an object"))
                    continue
                try:
                    sample_id = record_id(record, f"{source.name}:{position}")
                except RecordError as exc:
                    report.bad.append(BadRecord(str(source), position, str(exc)))
                    continue
                if sample_id in seen:
                    report.bad.append(BadRecord(str(source), sample_id, "duplicate id"))
                    continue
                seen.add(sample_id)
                try:
                    sample = reader(record, sample_id, **context)
                    if sample is None:
                        continue
                    if media_check is not None:
                        sample = media_check.check(sample, report)
                    sample = replace(sample, media_root=str(root))
                    row = _row(sample)
                except RecordError as exc:
                    report.bad.append(BadRecord(str(source), sample_id, str(exc)))
                    continue
                rows.append(row)
                state["hash"].update(_sample_digest(sample))
                report.samples += 1
                if len(rows) >= batch_rows:
                    flush()
                if state["rows"] + len(rows) >= shard_rows:
                    commit(done)
    except ijson.JSONError as exc:
        raise DataError(f"{source}: invalid JSON after record {done} ({exc})") from None
    commit(done)
    manifest["records_done"] = done
    manifest["report"] = _report_to_dict(report)
    manifest["fingerprint"] = hashlib.sha256(
        "".join(s["fingerprint"] for s in manifest["shards"]).encode()).hexdigest()[:16]
    manifest["complete"] = True
    _write_json_atomic(out_dir / REPORT, manifest["report"])
    _write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- reading
class _RowView(Sequence[Sample]):
    """Index arithmetic shared by the two sequences below: an optional selection of rows (a split)."""

    _rows: np.ndarray | None
    _len: int

    def __len__(self) -> int:
        return self._len

    def _physical(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        return i if self._rows is None else int(self._rows[i])

    def _selected(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self._len):
            raise IndexError(f"selection out of range for {self._len} samples")
        return indices if self._rows is None else self._rows[indices]

    def _fingerprint_of_selection(self, base: str) -> str:
        if self._rows is None:
            return base
        return hashlib.sha256(base.encode() + np.ascontiguousarray(self._rows).tobytes()).hexdigest()[:16]


class SampleIndex(_RowView):
    """A built index as a read-only sequence of `Sample`s, memory-mapped.

    Pickling carries only the directory and options (and a selection's row numbers); a DataLoader worker
    reopens the memory map, so workers share the page cache and copy nothing. `column`, `codes` and
    `sample_columns` give whole columns (task, source_video, ...) for splits and mixtures without building
    samples; `select(indices)` is a view (a split) that stays memory-mapped.
    """

    def __init__(self, path: str | Path, *, media_root: str | None = None, sampling: dict | None = None,
                 limit: int | None = None, rows: np.ndarray | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise DataError(f"index {self.path} is incomplete (its build was interrupted): rerun "
                            f"`surgsigma-train data index {self.manifest['source']['path']} {self.path}`")
        self.media_root, self.sampling, self.limit = media_root, sampling, limit
        self._total = sum(s["rows"] for s in self.manifest["shards"])
        if limit is not None:
            self._total = min(limit, self._total)
        self._rows = rows
        self._len = self._total if rows is None else len(rows)
        self._batches: list[pa.RecordBatch] | None = None  # opened lazily, once per process
        self._starts = np.zeros(1, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "media_root": self.media_root, "sampling": self.sampling, "limit": self.limit,
                "rows": self._rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("path"), **state)

    def _open(self) -> list[pa.RecordBatch]:
        if self._batches is None:
            batches = []
            for shard in self.manifest["shards"]:
                file = self.path / shard["file"]
                reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
                got = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                if sum(b.num_rows for b in got) != shard["rows"] or reader.schema != SCHEMA:
                    raise DataError(f"{file}: does not hold the {shard['rows']} rows its manifest says")
                batches.extend(got)
            self._starts = np.cumsum([0] + [b.num_rows for b in batches])
            self._batches = batches
        return self._batches

    def _sample(self, row: dict[str, Any]) -> Sample:
        return Sample(
            id=row["id"], task=row["task"], specialty=row["specialty"], source=row["source"],
            source_video=row["source_video"], thinking=row["thinking"],
            messages=tuple(Message(m["role"], m["content"]) for m in row["messages"]),
            media=tuple(MediaRef(m["kind"], m["path"], m["start"], m["end"], m["observe_until"])
                        for m in row["media"]),
            media_root=self.media_root if self.media_root is not None else row["media_root"],
            sampling=self.sampling, extra=json.loads(row["extra"]) if row["extra"] else {},
        )

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        i = self._physical(index)
        batches = self._open()
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._sample(batches[b].slice(i - int(self._starts[b]), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Sample]:
        if self._rows is not None:
            yield from (self[i] for i in range(self._len))
            return
        left = self._len
        for batch in self._open():
            if not left:
                return
            for row in batch.slice(0, left).to_pylist():
                yield self._sample(row)
            left -= min(left, batch.num_rows)

    def select(self, indices: np.ndarray) -> "SampleIndex":
        """The samples at `indices` (positions in this sequence), as a memory-mapped view."""
        return SampleIndex(self.path, media_root=self.media_root, sampling=self.sampling, limit=self.limit,
                           rows=self._selected(indices))

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of this sequence; zero-copy from the memory map unless this is a selection."""
        col = pa.chunked_array([b.column(name) for b in self._open()], SCHEMA.field(name).type).slice(0, self._total)
        return col if self._rows is None else col.take(pa.array(self._rows))

    def codes(self, name: str) -> tuple[np.ndarray, list[str | None]]:
        """A string column as int32 codes into its distinct values (-1 = null): 4 bytes a row."""
        col = pa.chunked_array([b.column(name) for b in self._open()], SCHEMA.field(name).type).slice(0, self._total)
        values = pc.unique(col).drop_null()
        codes = pc.fill_null(pc.index_in(col, value_set=values), -1).to_numpy().astype(np.int32)
        return (codes if self._rows is None else codes[self._rows]), values.to_pylist()

    def sample_columns(self) -> Any:
        """`splits.SampleColumns` from the Arrow columns: no sample is built; equal values share one str."""
        from surgsigma_train.data.splits import SampleColumns

        def column(name: str) -> np.ndarray:
            codes, values = self.codes(name)
            return np.array(values + ["unknown"], dtype=object)[codes]  # code -1 (null) -> "unknown"

        split_key = column("source_video")
        no_video = np.flatnonzero(split_key == "unknown")
        if len(no_video):  # Sample.split_key falls back to the id
            split_key[no_video] = np.array(self.column("id").take(pa.array(no_video)).to_pylist(), dtype=object)
        return SampleColumns(column("task"), column("source"), column("specialty"), split_key)

    def fingerprint(self) -> str:
        """From the manifest, which hashed every sample when it was built: nothing is reread."""
        fp = self.manifest["fingerprint"]
        if self._total != sum(s["rows"] for s in self.manifest["shards"]):
            fp = hashlib.sha256(f"{fp}:{self._total}".encode()).hexdigest()[:16]
        return self._fingerprint_of_selection(fp)

    def report(self) -> ReadReport:
        return _report_from_dict(self.manifest["report"])


class ConcatSamples(_RowView):
    """Several sources (lists and indexes) as one sequence, without copying an index into a list."""

    def __init__(self, parts: list[Sequence[Sample]], rows: np.ndarray | None = None):
        self.parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self._rows = rows
        self._len = int(self._starts[-1]) if rows is None else len(rows)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        i = self._physical(index)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k][i - int(self._starts[k])]

    def __iter__(self) -> Iterator[Sample]:
        if self._rows is not None:
            yield from (self[i] for i in range(self._len))
            return
        for part in self.parts:
            yield from part

    def select(self, indices: np.ndarray) -> "ConcatSamples":
        return ConcatSamples(self.parts, self._selected(indices))

    def sample_columns(self) -> Any:
        from surgsigma_train.data.splits import SampleColumns

        cols = [p.sample_columns() if hasattr(p, "sample_columns") else SampleColumns.from_samples(p)
                for p in self.parts]
        merged = SampleColumns(*(np.concatenate([getattr(c, f) for c in cols])
                                 for f in ("task", "source", "specialty", "split_key")))
        return merged if self._rows is None else merged.take(self._rows)

    def fingerprint(self, list_fingerprint: Callable[[Sequence[Sample]], str]) -> str:
        """Each index part contributes its manifest fingerprint, each list part `list_fingerprint`."""
        parts = [p.fingerprint() if isinstance(p, SampleIndex) else list_fingerprint(p) for p in self.parts]
        return self._fingerprint_of_selection(hashlib.sha256("".join(parts).encode()).hexdigest()[:16])


def task_id_differences(index_ids: dict[int, str], recipe_ids: dict[int, str]) -> list[str]:
    """The entries in which two task-id maps differ, by id, e.g. "id 9 only in recipe ('triplet_recognition')"."""
    out = []
    for tid in sorted(index_ids.keys() | recipe_ids.keys()):
        if tid not in recipe_ids:
            out.append(f"id {tid} only in index ({index_ids[tid]!r})")
        elif tid not in index_ids:
            out.append(f"id {tid} only in recipe ({recipe_ids[tid]!r})")
        elif index_ids[tid] != recipe_ids[tid]:
            out.append(f"id {tid}: index {index_ids[tid]!r} vs recipe {recipe_ids[tid]!r}")
    return out


def open_index_source(path: Path, task_ids: dict[int, str],
                      source: DataSource) -> tuple[SampleIndex, list[ReadReport]]:
    """A recipe data source whose path is an index directory (see `readers.read_source`)."""
    index = SampleIndex(path, media_root=source.media_root, limit=source.max_samples,
                        sampling=source.video.model_dump() if source.video is not None else None)
    params = index.manifest["params"]
    if differences := task_id_differences({int(k): v for k, v in params["task_ids"].items()}, task_ids):
        raise DataError(f"index {path} was built with other task_ids than the recipe's data.task_ids: "
                        f"{'; '.join(differences)}. Rebuild it with --task-ids listing the recipe's map (both "
                        "replace the default map whole), or set data.task_ids to the index's map")
    if source.check_media and not params["check_media"]:
        raise DataError(f"index {path} was built without media checks (--no-check-media) but its data source "
                        "asks for them: rebuild it with media checks, or set `check_media: false` on the source")
    return index, [index.report()]
