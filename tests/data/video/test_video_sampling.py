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


# ---- variable frame rate: frames even in time, on a real file ------------------------------------------------------
# 4 s at 25 fps, then 4 s at 12.5 fps (pts in 1/100 s): a camera that halves its rate half way.
STEP_PTS = [4 * i for i in range(100)] + [400 + 8 * i for i in range(50)]
SLOW_INTERVAL_S = 0.08  # the longest source frame interval


@pytest.fixture(scope="module")
def rate_step_video(tmp_path_factory):
    pytest.importorskip("av")
    from fractions import Fraction

    from tests.data.video.video_media import encode_video

    return encode_video(tmp_path_factory.mktemp("vfr_step") / "rate_step.mp4", len(STEP_PTS), pts=STEP_PTS,
                        time_base=Fraction(1, 100), fps=25)


def _gaps(meta: VideoMeta, indices: list[int]) -> list[float]:
    times = [meta.time_of(i) for i in indices]
    return [b - a for a, b in zip(times, times[1:])]


def _even_at(gaps: list[float], period_s: float, tolerance_s: float) -> bool:
    return all(abs(gap - period_s) <= tolerance_s + 1e-9 for gap in gaps)


def test_fps_on_variable_frame_rate_is_even_in_time(rate_step_video, frame_id):
    from surgsigma_train.data.video import load_clip, probe
    from surgsigma_train.data.video.sampling import select_by_index

    meta = probe(rate_step_video)
    assert meta.variable_frame_rate and meta.num_frames == len(STEP_PTS)
    assert meta.frame_times_s == pytest.approx([p / 100 for p in STEP_PTS])
    spec = SamplingSpec(fps=2.0)
    indices = select_frames(meta, spec)
    seconds = meta.duration_s - meta.time_of(0)
    period = seconds / len(indices)  # the count rule is unchanged: round(fps * seconds) frames over the window
    assert len(indices) == round(2.0 * seconds) and period == pytest.approx(0.5, abs=0.01)
    gaps = _gaps(meta, indices)
    # every gap is the requested period, to within one source frame interval (nearest frame on each side)
    assert _even_at(gaps, period, SLOW_INTERVAL_S), gaps
    assert min(gaps) >= 0.4 and max(gaps) <= 0.6
    # the index split this replaces clusters the frames in the 25 fps half: 0.375 s gaps there, 0.75 s after
    by_index = select_by_index(0, meta.num_frames, len(indices), "uniform")
    old_gaps = _gaps(meta, by_index)
    assert not _even_at(old_gaps, period, SLOW_INTERVAL_S)
    assert min(old_gaps) < 0.4 and max(old_gaps) > 0.7
    # decoded: the frames are the chosen ones, at the chosen (real) times
    clip = load_clip(rate_step_video, spec)
    assert list(clip.frame_indices) == indices and [frame_id(f) for f in clip.frames_THWC] == indices
    assert _even_at([b - a for a, b in zip(clip.timestamps_s, clip.timestamps_s[1:])], period, SLOW_INTERVAL_S)


def test_variable_frame_rate_keeps_bounds_cutoff_count_and_seeding(rate_step_video):
    from surgsigma_train.data.video import probe

    meta = probe(rate_step_video)
    # a clip across the rate change, cut at observe_until: never a frame after the cutoff, still even in time
    spec = SamplingSpec(fps=2.0, start_s=2.0, end_s=7.0, observe_until_s=6.3)
    indices = select_frames(meta, spec)
    times = [meta.time_of(i) for i in indices]
    assert len(indices) == round(2.0 * (6.3 - 2.0)) and times[0] >= 2.0 and times[-1] <= 6.3
    assert _even_at(_gaps(meta, indices), 4.3 / len(indices), SLOW_INTERVAL_S)
    # min/max frames and num_frames (what the token planner asks for) are counted as before
    assert len(select_frames(meta, SamplingSpec(fps=2.0, max_frames=6))) == 6
    assert len(select_frames(meta, SamplingSpec(fps=0.1, min_frames=5))) == 5
    assert len(select_frames(meta, SamplingSpec(num_frames=9))) == 9
    # segment_random: one frame near each equal time run, seeded by (sample_key, epoch) only
    spec = SamplingSpec(num_frames=8, mode="segment_random")
    first = select_frames(meta, spec, sample_key="v/1", epoch=0)
    assert first == select_frames(meta, spec, sample_key="v/1", epoch=0)
    assert first != select_frames(meta, spec, sample_key="v/1", epoch=1)
    run = meta.duration_s / 8
    for k, index in enumerate(first):
        assert k * run - SLOW_INTERVAL_S / 2 <= meta.time_of(index) <= (k + 1) * run + SLOW_INTERVAL_S / 2
    assert first == sorted(set(first))


@pytest.mark.parametrize("mode", ["uniform", "segment_random"])
@pytest.mark.parametrize("count", range(1, len(VFR_TIMES)))
def test_variable_frame_rate_with_gaps_gives_distinct_frames(mode, count):
    """Gaps longer than a run: targets share a nearest frame; the picks stay distinct, ascending, inside the window."""
    meta = vfr_meta()
    for epoch in range(3):
        indices = select_frames(meta, SamplingSpec(num_frames=count, mode=mode), sample_key="k", epoch=epoch)
        assert len(indices) == count and indices == sorted(set(indices))
        assert 0 <= indices[0] and indices[-1] < len(VFR_TIMES)
        if mode == "uniform":  # run centres; where no two share a nearest frame, each pick is that nearest frame
            run = meta.duration_s / count
            nearest = [min(range(len(VFR_TIMES)), key=lambda i, t=(k + 0.5) * run: (abs(VFR_TIMES[i] - t), i))
                       for k in range(count)]
            if len(set(nearest)) == count:
                assert indices == nearest
            else:  # a shared frame moves its later picks along by at most one frame per sharing pick
                assert all(abs(a - b) <= count - len(set(nearest)) for a, b in zip(indices, nearest))
        cut = select_frames(meta, SamplingSpec(num_frames=count, mode=mode, observe_until_s=2.2), sample_key="k",
                            epoch=epoch)
        assert len(cut) == min(count, 11) and all(meta.time_of(i) <= 2.2 for i in cut)
