"""FrameCache: hits and misses, invalidation when the source changes, LRU eviction to a byte budget, two
processes writing the same keys, damaged entries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from surgsigma_train.data.video import FileIdentity, FrameCache, Resize, SamplingSpec, load_clip
from surgsigma_train.data.video import pipeline

from tests.data.video.video_media import encode_video


def _frames(seed: int, count: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)


def _entry_dirs(cache: FrameCache, prefix: str = "f-") -> list[Path]:
    return sorted(p for p in cache.directory.iterdir() if p.name.startswith(prefix))


def test_put_get_round_trip(tmp_path):
    source = tmp_path / "a.mp4"
    source.write_bytes(b"x" * 10)
    cache = FrameCache(tmp_path / "cache", max_bytes=10**6)
    identity = FileIdentity.of(source)
    key = FrameCache.frames_key(identity, "pyav", [1, 2, 3, 4], None)
    assert cache.get_frames(key) is None
    cache.put_frames(key, identity, _frames(0), [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], "pyav")
    hit = cache.get_frames(key)
    assert hit is not None and np.array_equal(hit.frames_THWC, _frames(0))
    assert hit.frame_indices == (1, 2, 3, 4) and hit.timestamps_s == (0.1, 0.2, 0.3, 0.4)
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 1
    # keys differ by indices, backend and resize
    others = {FrameCache.frames_key(identity, "pyav", [1, 2, 3], None),
              FrameCache.frames_key(identity, "decord", [1, 2, 3, 4], None),
              FrameCache.frames_key(identity, "pyav", [1, 2, 3, 4], Resize((4, 4), lambda f, s: f, "r1")),
              FrameCache.frames_key(identity, "pyav", [1, 2, 3, 4], Resize((4, 4), lambda f, s: f, "r2"))}
    assert key not in others and len(others) == 4


def test_load_clip_hit_opens_no_video(tmp_path, videos, monkeypatch):
    cache = FrameCache(tmp_path / "cache", max_bytes=10**7)
    spec = SamplingSpec(num_frames=6, start_s=1.0, end_s=4.0)
    first = load_clip(videos["cfr"], spec, cache=cache)
    assert first.extra["cache"] == "miss"

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit must not open the video")

    monkeypatch.setattr(pipeline, "open_video", no_decoding)
    second = load_clip(videos["cfr"], spec, cache=cache)
    assert second.extra["cache"] == "hit"
    assert np.array_equal(first.frames_THWC, second.frames_THWC)
    assert (first.frame_indices, first.timestamps_s, first.backend) == (second.frame_indices, second.timestamps_s,
                                                                         second.backend)
    # another spec: meta from the cache, frames not: decodes (and here that is refused)
    with pytest.raises(AssertionError, match="must not open"):
        load_clip(videos["cfr"], SamplingSpec(num_frames=3), cache=cache)


def test_resized_frames_are_cached_under_the_resize(tmp_path, videos):
    cache = FrameCache(tmp_path / "cache", max_bytes=10**7)
    calls = []

    def halve(frames_THWC, size_HW):
        calls.append(size_HW)
        return np.ascontiguousarray(frames_THWC[:, ::2, ::2])

    resize = Resize((32, 64), halve, "stride2-v1")
    spec = SamplingSpec(num_frames=4)
    a = load_clip(videos["cfr"], spec, cache=cache, resize=resize)
    b = load_clip(videos["cfr"], spec, cache=cache, resize=resize)
    assert a.frames_THWC.shape == (4, 32, 64, 3) and b.extra["cache"] == "hit" and calls == [(32, 64)]
    full = load_clip(videos["cfr"], spec, cache=cache)  # no resize: another entry
    assert full.frames_THWC.shape == (4, 64, 128, 3) and full.extra["cache"] == "miss"


def test_changed_source_is_a_miss_and_stale_entries_are_purged(tmp_path, frame_id):
    video = encode_video(tmp_path / "v.mp4", 30)
    cache = FrameCache(tmp_path / "cache", max_bytes=10**7)
    spec = SamplingSpec(num_frames=3)
    before = load_clip(video, spec, cache=cache)
    assert load_clip(video, spec, cache=cache).extra["cache"] == "hit"
    # new content under the same name (45 frames instead of 30), written in place, as an editor would
    video.write_bytes(encode_video(tmp_path / "longer.mp4", 45).read_bytes())
    after = load_clip(video, spec, cache=cache)
    assert after.extra["cache"] == "miss"
    assert after.source_num_frames == 45 and before.source_num_frames == 30
    assert [frame_id(f) for f in after.frames_THWC] == list(after.frame_indices)
    removed = cache.purge_stale()
    assert removed == 2  # the old frames entry and the old meta entry
    assert load_clip(video, spec, cache=cache).extra["cache"] == "hit"


def test_eviction_keeps_the_budget_lru(tmp_path):
    source = tmp_path / "a.mp4"
    source.write_bytes(b"x")
    identity = FileIdentity.of(source)
    entry_bytes = 4 * 32 * 32 * 3
    cache = FrameCache(tmp_path / "cache", max_bytes=6 * entry_bytes, low_water=0.5, rescan_every=1)
    keys = []
    for k in range(5):
        key = FrameCache.frames_key(identity, "pyav", [k], None)
        frames = np.full((4, 32, 32, 3), k, np.uint8)
        cache.put_frames(key, identity, frames, [k] * 4, [0.0] * 4, "pyav")
        keys.append(key)
        past = time.time() - 100 + k  # distinct, increasing last-use times
        os.utime(cache.directory / f"f-{key}", (past, past))
    assert cache.get_frames(keys[0]) is not None  # touch the oldest: now the most recent
    for k in range(5, 9):
        key = FrameCache.frames_key(identity, "pyav", [k], None)
        cache.put_frames(key, identity, np.full((4, 32, 32, 3), k, np.uint8), [k] * 4, [0.0] * 4, "pyav")
        keys.append(key)
    assert cache.total_bytes() <= cache.max_bytes
    assert cache.stats["evicted"] > 0
    assert cache.get_frames(keys[1]) is None  # least recently used: gone
    assert cache.get_frames(keys[0]) is not None  # used recently: kept
    assert cache.get_frames(keys[-1]) is not None  # just written: kept
    assert not [p for p in cache.directory.iterdir() if p.name.startswith(("tmp-", "trash-"))]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_info", "pickle"])
def test_corrupt_entry_is_a_miss_and_removed(tmp_path, damage):
    source = tmp_path / "a.mp4"
    source.write_bytes(b"x")
    identity = FileIdentity.of(source)
    cache = FrameCache(tmp_path / "cache", max_bytes=10**6)
    key = FrameCache.frames_key(identity, "pyav", [0], None)
    cache.put_frames(key, identity, _frames(1), [0, 1, 2, 3], [0.0, 0.1, 0.2, 0.3], "pyav")
    entry = cache.directory / f"f-{key}"
    npy = entry / "frames.npy"
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:100])
    elif damage == "garbage":
        npy.write_bytes(b"\x93NUMPY garbage" * 20)
    elif damage == "drop_info":
        (entry / "info.json").write_text("{not json")
    else:  # an object array saved with pickle: must not be unpickled
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert cache.get_frames(key) is None
    assert not entry.exists() and cache.stats["corrupt"] == 1
    cache.put_frames(key, identity, _frames(1), [0, 1, 2, 3], [0.0, 0.1, 0.2, 0.3], "pyav")
    assert cache.get_frames(key) is not None


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from surgsigma_train.data.video.cache import FileIdentity, FrameCache
    cache_dir, source, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = FrameCache(cache_dir, max_bytes=600_000, rescan_every=4)  # room for 6 of the 10 entries
    identity = FileIdentity.of(source)
    for round in range(25):
        for k in range(10):  # both processes write and evict the same 10 keys, with the same content per key
            key = FrameCache.frames_key(identity, "pyav", [k], None)
            frames = np.random.default_rng(k).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
            hit = cache.get_frames(key)
            if hit is None:
                cache.put_frames(key, identity, frames, [k] * 8, [k / 10] * 8, "pyav")
            elif not np.array_equal(hit.frames_THWC, frames):
                sys.exit(f"worker {worker}: key {k} read back wrong pixels")
    print(cache.stats["evicted"])
""")


def test_two_processes_writing_the_same_keys(tmp_path):
    source = tmp_path / "a.mp4"
    source.write_bytes(b"x")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache_dir), str(source), str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert sum(int(out.strip()) for out, _ in outputs) > 0  # the budget forced evictions while both were busy
    cache = FrameCache(cache_dir, max_bytes=600_000)
    identity = FileIdentity.of(source)
    entry_bytes = 8 * 64 * 64 * 3 + 1000
    # each process re-lists every 4 writes, so the other's last few writes may overshoot the budget a little
    assert cache.total_bytes() <= cache.max_bytes + 2 * 4 * entry_bytes
    present = 0
    for k in range(10):
        hit = cache.get_frames(FrameCache.frames_key(identity, "pyav", [k], None))
        if hit is not None:  # whatever survived is intact
            present += 1
            assert np.array_equal(hit.frames_THWC,
                                  np.random.default_rng(k).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    assert present > 0 and cache.stats["corrupt"] == 0
    assert not [p for p in cache_dir.iterdir() if p.name.startswith("tmp-")]
