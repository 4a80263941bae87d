"""Decoding in a child process: a real native crash or a hang costs one request, names the file, and the next
request works; frames come back through shared memory exactly as decoded in-process."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from surgsigma_train.data.video import (
    DecoderCrashedError,
    DecoderTimeoutError,
    IsolatedDecoder,
    SamplingSpec,
    VideoError,
    load_clip,
    probe,
    probe_in_subprocess,
)
from surgsigma_train.data.video.isolation import _SHM_PREFIX, _shm_dir

HERE = Path(__file__).resolve().parent


@pytest.fixture
def faulty_decoder():
    decoder = IsolatedDecoder(timeout_s=30, initializer="video_faults:install", sys_path=[str(HERE)])
    yield decoder
    decoder.close()


def _copy(videos, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(videos["cfr"], target)
    return target


def _leftover_shm(pid: int | None) -> list[str]:
    return [n for n in os.listdir(_shm_dir()) if n.startswith(f"{_SHM_PREFIX}-{pid}-")]


def test_isolated_load_equals_in_process(videos, frame_id):
    decoder = IsolatedDecoder(timeout_s=30)
    try:
        spec = SamplingSpec(num_frames=5, start_s=1.0)
        isolated = load_clip(videos["cfr"], spec, isolate=decoder)
        local = load_clip(videos["cfr"], spec)
        assert isolated.extra["isolated"] and not local.extra["isolated"]
        assert np.array_equal(isolated.frames_THWC, local.frames_THWC)
        assert (isolated.frame_indices, isolated.timestamps_s) == (local.frame_indices, local.timestamps_s)
        assert [frame_id(f) for f in isolated.frames_THWC] == list(isolated.frame_indices)
        isolated.frames_THWC[0, 0, 0, 0] = 7  # a normal writable array, backed by the (unlinked) mapping
        chosen = load_clip(videos["cfr"], spec, isolate=decoder, frame_indices=[40, 3])  # e.g. a token planner's
        assert chosen.frame_indices == (40, 3) and [frame_id(f) for f in chosen.frames_THWC] == [40, 3]
        assert decoder.probe(videos["vfr"]) == probe(videos["vfr"])
        assert not _leftover_shm(decoder.pid)
    finally:
        decoder.close()


@pytest.mark.parametrize("name,signal_text", [("segv.mp4", "signal 11 (SIGSEGV)"), ("abort.mp4", "signal 6 (SIGABRT)")])
def test_native_crash_costs_one_request(videos, tmp_path, faulty_decoder, name, signal_text):
    good = _copy(videos, tmp_path, "good.mp4")
    bad = _copy(videos, tmp_path, name)
    assert faulty_decoder.probe(good).num_frames == 60
    first_pid = faulty_decoder.pid
    with pytest.raises(DecoderCrashedError) as caught:
        load_clip(bad, SamplingSpec(num_frames=4), isolate=faulty_decoder)
    assert caught.value.path == str(bad)
    assert caught.value.reason == f"decoder crashed with {signal_text}"
    assert isinstance(caught.value, VideoError)  # the dataset drops the sample and names the file
    # the next request works, in a fresh child
    clip = load_clip(good, SamplingSpec(num_frames=4), isolate=faulty_decoder)
    assert len(clip.frame_indices) == 4 and faulty_decoder.pid != first_pid
    assert not _leftover_shm(first_pid)


def test_hang_is_killed_after_the_timeout(videos, tmp_path, faulty_decoder):
    hang = _copy(videos, tmp_path, "hang.mp4")
    good = _copy(videos, tmp_path, "good.mp4")
    faulty_decoder.probe(good)  # child started and warm, so the timeout measures the hang only
    started = time.monotonic()
    with pytest.raises(DecoderTimeoutError) as caught:
        faulty_decoder.probe(hang, timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert caught.value.path == str(hang) and caught.value.reason.startswith("timed out after 1.5 s")
    assert 1.4 <= elapsed < 10
    assert faulty_decoder.probe(good).num_frames == 60


def test_bad_files_are_plain_video_errors_and_keep_the_child(videos, faulty_decoder):
    faulty_decoder.probe(videos["cfr"])
    pid = faulty_decoder.pid
    for name in ("audio", "zero", "text"):
        with pytest.raises(VideoError) as caught:
            faulty_decoder.probe(videos[name])
        assert not isinstance(caught.value, (DecoderCrashedError, DecoderTimeoutError))
    with pytest.raises(VideoError, match="starts at or after the end"):
        load_clip(videos["cfr"], SamplingSpec(start_s=100.0), isolate=faulty_decoder)
    with pytest.raises(ValueError, match="fps or num_frames"):  # a spec error stays a configuration error
        load_clip(videos["cfr"], SamplingSpec(fps=None), isolate=faulty_decoder)
    assert faulty_decoder.pid == pid  # no restart for ordinary errors


def test_probe_in_subprocess(videos):
    meta = probe_in_subprocess(videos["vfr"], timeout_s=30)
    assert meta.variable_frame_rate and meta.num_frames == 20
    with pytest.raises(VideoError, match="no video stream"):
        probe_in_subprocess(videos["audio"], timeout_s=30)


def test_recycled_after_max_requests(videos):
    decoder = IsolatedDecoder(timeout_s=30, max_requests=2)
    try:
        pids = []
        for _ in range(3):
            decoder.probe(videos["cfr"])
            pids.append(decoder.pid)
        assert decoder.starts == 2 and pids[2] is not None
    finally:
        decoder.close()


def test_works_in_a_forked_daemonic_worker(videos):
    """DataLoader workers are daemonic forks: multiprocessing would refuse to start a child there, and the
    parent's decoder child must not be shared. The worker starts its own child and gets the right frames."""
    import multiprocessing

    decoder = IsolatedDecoder(timeout_s=30)
    try:
        decoder.probe(videos["cfr"])  # the parent's child is running when the worker forks
        parent_child = decoder.pid
        results = multiprocessing.get_context("fork").SimpleQueue()

        def worker():
            clip = load_clip(videos["cfr"], SamplingSpec(num_frames=3), isolate=decoder)
            results.put((decoder.pid, clip.frame_indices))

        process = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
        process.start()
        process.join(60)
        assert process.exitcode == 0
        worker_child, indices = results.get()
        assert indices == (10, 30, 50) and worker_child not in (None, parent_child)
        assert decoder.probe(videos["cfr"]).num_frames == 60 and decoder.pid == parent_child  # parent unaffected
    finally:
        decoder.close()


def test_encoder_probe_is_isolated_with_the_timeout(videos, tmp_path, faulty_decoder, monkeypatch):
    """video.isolate: the metadata probe of encoding runs in the decoder child too, bounded by decode_timeout_s.
    The fault injection lives only in the child: the parent's decoders are replaced by ones that refuse, so a probe
    in this process fails the test instead of crashing it."""
    from surgsigma_train.config.schema import DataConfig, VideoConfig
    from surgsigma_train.data import encode as encode_module
    from surgsigma_train.data.encode import DroppedSample, EncodedSample, SampleEncoder
    from surgsigma_train.data.loader import SFTDataset
    from surgsigma_train.data.sample import MediaRef, Message, Sample
    from surgsigma_train.data.video import decoders, isolation
    from surgsigma_train.models.registry import get_family

    def in_this_process(*args, **kwargs):
        raise AssertionError(f"a video was opened in the test process: {args}")

    monkeypatch.setattr(encode_module, "probe", in_this_process)
    monkeypatch.setattr(decoders, "open_video", in_this_process)
    monkeypatch.setattr(isolation, "_default", faulty_decoder)  # video.isolate=true uses this process's decoder

    root = tmp_path / "media"
    root.mkdir()
    for name in ("good.mp4", "segv.mp4", "hang.mp4"):
        _copy(videos, root, name)
    family = get_family("qwen2_5_vl")
    small = dict(image_min_pixels=28 * 28, image_max_pixels=56 * 56, video_min_pixels=28 * 28, video_max_pixels=56 * 56)
    encoder = SampleEncoder(family.build_processor("tiny", **small), family, DataConfig(train=[{"path": "x"}]),
                            VideoConfig(sampling={"num_frames": 4}, isolate=True, decode_timeout_s=1.5, **small))

    def sample(name: str) -> Sample:
        return Sample(id=f"s-{name}", task="phase_recognition", media_root=str(root), media=(MediaRef("video", name),),
                      messages=(Message("user", "<video>What phase?"), Message("assistant", "Preparation.")))

    # the probe alone, as planning does it: a crash or a hang of the probe is a VideoError naming the file
    with pytest.raises(DecoderCrashedError) as crashed:
        encoder._probe(root / "segv.mp4")
    assert crashed.value.path == str(root / "segv.mp4") and "SIGSEGV" in crashed.value.reason
    encoder._probe(root / "good.mp4")  # a warm child, so the timeout below measures the hang only
    started = time.monotonic()
    with pytest.raises(DecoderTimeoutError) as hung:
        encoder._probe(root / "hang.mp4")
    assert hung.value.path == str(root / "hang.mp4") and hung.value.reason.startswith("timed out after 1.5 s")
    assert 1.4 <= time.monotonic() - started < 10

    # in the dataset: each bad file costs its own sample, with the reason; the others encode
    encoder._metas.clear()
    dataset = SFTDataset([sample("segv.mp4"), sample("good.mp4"), sample("hang.mp4"), sample("good.mp4")], encoder)
    started = time.monotonic()
    got = [dataset[i] for i in range(4)]
    assert time.monotonic() - started < 30
    assert isinstance(got[0], DroppedSample) and got[0].id == "s-segv.mp4"
    assert got[0].reason == f"{root / 'segv.mp4'}: decoder crashed with signal 11 (SIGSEGV)"
    assert isinstance(got[2], DroppedSample) and got[2].id == "s-hang.mp4"
    assert got[2].reason.startswith(f"{root / 'hang.mp4'}: timed out after 1.5 s")
    assert isinstance(got[1], EncodedSample) and isinstance(got[3], EncodedSample)
    assert got[1].vision["video_grid_thw"][0, 0] == 2  # 4 frames, temporal patches of 2
