"""select_frames on probed metadata (no decoding): counts, placement, seeding, clip bounds, the cutoff."""

from __future__ import annotations

from dataclasses import replace

import pytest

from surgsigma_train.data.video.decoders import VideoError
from surgsigma_train.data.video.sampling import END_TOLERANCE_S, select_frames
from surgsigma_train.data.video.types import SamplingSpec, VideoMeta


def cfr_meta(num_frames: int = 250, fps: float = 25.0) -> VideoMeta:
    return VideoMeta(path="clip.mp4", num_frames=num_frames, fps=fps, duration_s=num_frames / fps, width=64,
                     height=64, frame_times_s=tuple(i / fps for i in range(num_frames)))


VFR_TIMES = (0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 1.2, 1.3, 2.0, 2.1, 2.2, 2.3, 3.0, 3.1, 3.2, 4.0)


def vfr_meta() -> VideoMeta:
    return VideoMeta(path="vfr.mp4", num_frames=len(VFR_TIMES), fps=3.75, duration_s=4.1, width=64, height=64,
                     variable_frame_rate=True, frame_times_s=VFR_TIMES)


def test_fps_target_clamped():
    meta = cfr_meta()  # 10 s at 25 fps
    assert len(select_frames(meta, SamplingSpec(fps=2.0, max_frames=32))) == 20
    assert len(select_frames(meta, SamplingSpec(fps=10.0, max_frames=32))) == 32  # clamped to max
    assert len(select_frames(meta, SamplingSpec(fps=0.1, min_frames=4))) == 4  # clamped to min


def test_uniform_is_segment_centres():
    meta = cfr_meta(100)
    assert select_frames(meta, SamplingSpec(num_frames=4)) == [12, 37, 62, 87]
    assert select_frames(meta, SamplingSpec(num_frames=4, start_s=2.0, end_s=3.0)) == [53, 59, 65, 71]


def test_exact_num_frames_ignores_fps():
    indices = select_frames(cfr_meta(), SamplingSpec(fps=100.0, num_frames=7, max_frames=3))
    assert len(indices) == 7 and indices == sorted(set(indices))


def test_short_video_gives_each_frame_once():
    meta = cfr_meta(5)
    assert select_frames(meta, SamplingSpec(num_frames=16)) == [0, 1, 2, 3, 4]
    assert select_frames(meta, SamplingSpec(fps=30.0, min_frames=8)) == [0, 1, 2, 3, 4]
    one = cfr_meta(1)
    assert select_frames(one, SamplingSpec(num_frames=8, mode="segment_random"), sample_key="k") == [0]


def test_segment_random_is_seeded_by_key_and_epoch_only():
    meta = cfr_meta()
    spec = SamplingSpec(num_frames=8, mode="segment_random")
    first = select_frames(meta, spec, sample_key="video7/clip3", epoch=0)
    assert first == select_frames(meta, spec, sample_key="video7/clip3", epoch=0)  # deterministic, resumable
    assert first != select_frames(meta, spec, sample_key="video7/clip3", epoch=1)
    assert first != select_frames(meta, spec, sample_key="video7/clip4", epoch=0)
    # one frame per segment: frame k lies in [k * 250 // 8, (k + 1) * 250 // 8)
    for k, index in enumerate(first):
        assert k * 250 // 8 <= index < (k + 1) * 250 // 8
    # over epochs the jitter covers the segments
    seen = {select_frames(meta, spec, sample_key="s", epoch=e)[0] for e in range(200)}
    assert len(seen) > 20


def test_clip_bounds_by_time():
    meta = cfr_meta()
    indices = select_frames(meta, SamplingSpec(fps=25.0, max_frames=1000, start_s=2.0, end_s=4.0))
    assert indices == list(range(50, 100))  # [2.0, 4.0): 4.0 s itself excluded


@pytest.mark.parametrize("cutoff", [0.0, 0.65, 2.25, 3.99, 100.0])
def test_observe_until_never_exceeded_vfr(cutoff):
    meta = vfr_meta()
    for mode in ("uniform", "segment_random"):
        for spec in (SamplingSpec(num_frames=4, mode=mode, observe_until_s=cutoff),
                     SamplingSpec(fps=8.0, mode=mode, observe_until_s=cutoff)):
            for epoch in range(5):
                indices = select_frames(meta, spec, sample_key="x", epoch=epoch)
                assert indices and all(meta.time_of(i) <= cutoff for i in indices)
    # all frames up to the cutoff are candidates, the one after is never taken
    visible = [i for i, t in enumerate(VFR_TIMES) if t <= cutoff]
    assert select_frames(meta, SamplingSpec(num_frames=100, observe_until_s=cutoff)) == visible


def test_observe_until_shrinks_the_fps_count():
    meta = cfr_meta()  # 10 s
    assert len(select_frames(meta, SamplingSpec(fps=2.0, observe_until_s=4.0))) == 8


def test_clip_slightly_past_the_end_is_clamped():
    meta = cfr_meta()  # 10.0 s
    indices = select_frames(meta, SamplingSpec(num_frames=100, start_s=9.0, end_s=10.0 + END_TOLERANCE_S / 2))
    assert indices == list(range(225, 250))


@pytest.mark.parametrize("spec,reason", [
    (SamplingSpec(start_s=10.0), "starts at or after the end"),
    (SamplingSpec(start_s=12.0, end_s=14.0), "starts at or after the end"),
    (SamplingSpec(start_s=8.0, end_s=10.0 + END_TOLERANCE_S + 0.5), "after the end of the 10.000 s video"),
    (SamplingSpec(start_s=3.0, end_s=3.0), r"is empty \(end <= start\)"),
    (SamplingSpec(start_s=3.0, end_s=2.0), r"is empty \(end <= start\)"),
    (SamplingSpec(end_s=-1.0), "ends at or before the first frame"),
    (SamplingSpec(start_s=5.0, observe_until_s=4.0), "holds no frame"),
    (SamplingSpec(start_s=1.001, end_s=1.02), "holds no frame"),  # between two frames
])
def test_empty_or_impossible_clips_raise(spec, reason):
    with pytest.raises(VideoError, match=reason) as caught:
        select_frames(cfr_meta(), spec)
    assert caught.value.path == "clip.mp4"


@pytest.mark.parametrize("spec", [
    SamplingSpec(fps=None, num_frames=None),
    SamplingSpec(fps=-1.0),
    SamplingSpec(num_frames=0),
    SamplingSpec(min_frames=5, max_frames=4),
    replace(SamplingSpec(), mode="random"),  # type: ignore[arg-type]
])
def test_bad_spec_is_a_config_error(spec):
    with pytest.raises(ValueError):
        select_frames(cfr_meta(), spec)


def test_meta_without_frame_times_uses_fps():
    meta = VideoMeta(path="a.mp4", num_frames=50, fps=10.0, duration_s=5.0, width=8, height=8)
    assert select_frames(meta, SamplingSpec(num_frames=5, start_s=1.0, end_s=2.0)) == [11, 13, 15, 17, 19]
