"""load_clip end to end on real files: the right frames, their real times, clip bounds, the cutoff."""

from __future__ import annotations

import pytest

from surgsigma_train.data.video import SamplingSpec, VideoError, load_clip
from surgsigma_train.data.video.types import VideoClip

from tests.data.video.video_media import FPS, VFR_PTS


def _assert_exact(clip: VideoClip, frame_id, times):
    assert [frame_id(f) for f in clip.frames_THWC] == list(clip.frame_indices)
    assert clip.timestamps_s == pytest.approx([times[i] for i in clip.frame_indices], abs=1e-6)


def test_uniform_clip(videos, backend, frame_id):
    clip = load_clip(videos["cfr"], SamplingSpec(fps=2.0, start_s=1.0, end_s=4.0), backend=backend)
    assert clip.frame_indices == (12, 17, 22, 27, 32, 37)  # 6 frames = 2 fps x 3 s, segment centres
    assert (clip.backend, clip.source_fps, clip.source_num_frames) == (backend, FPS, 60)
    assert clip.frames_THWC.shape == (6, 64, 128, 3)
    _assert_exact(clip, frame_id, [i / FPS for i in range(60)])


def test_segment_random_is_reproducible(videos, frame_id):
    spec = SamplingSpec(num_frames=5, mode="segment_random")
    a = load_clip(videos["cfr"], spec, sample_key="s1", epoch=3)
    b = load_clip(videos["cfr"], spec, sample_key="s1", epoch=3)
    c = load_clip(videos["cfr"], spec, sample_key="s1", epoch=4)
    assert a.frame_indices == b.frame_indices != c.frame_indices
    _assert_exact(c, frame_id, [i / FPS for i in range(60)])


def test_vfr_clip_times_are_real(videos, backend, frame_id):
    clip = load_clip(videos["vfr"], SamplingSpec(num_frames=6, observe_until_s=3.1), backend=backend)
    times = [p / 100 for p in VFR_PTS]
    _assert_exact(clip, frame_id, times)
    assert max(clip.timestamps_s) <= 3.1
    assert any("variable frame rate" in note for note in clip.extra["notes"])


def test_observe_until(videos, backend, frame_id):
    clip = load_clip(videos["cfr"], SamplingSpec(fps=10.0, max_frames=100, observe_until_s=2.35), backend=backend)
    assert clip.frame_indices == tuple(range(24))  # 0.0 ... 2.3 s
    _assert_exact(clip, frame_id, [i / FPS for i in range(60)])


def test_shorter_than_requested(videos, backend, frame_id):
    clip = load_clip(videos["short"], SamplingSpec(num_frames=16), backend=backend)
    assert clip.frame_indices == (0, 1, 2)  # each frame once, no padding by repetition
    _assert_exact(clip, frame_id, [0.0, 0.1, 0.2])
    one = load_clip(videos["one"], SamplingSpec(fps=2.0, min_frames=4), backend=backend)
    assert one.frame_indices == (0,) and one.frames_THWC.shape[0] == 1


def test_clip_beyond_the_duration(videos, backend):
    # ends 0.5 s after the 6.0 s video: clamped (within the 1 s tolerance)
    clamped = load_clip(videos["cfr"], SamplingSpec(fps=10.0, start_s=5.0, end_s=6.5), backend=backend)
    assert clamped.frame_indices == tuple(range(50, 60))
    with pytest.raises(VideoError, match="after the end of the 6.000 s video"):
        load_clip(videos["cfr"], SamplingSpec(start_s=5.0, end_s=30.0), backend=backend)
    with pytest.raises(VideoError, match="starts at or after the end"):
        load_clip(videos["cfr"], SamplingSpec(start_s=6.0, end_s=7.0), backend=backend)


@pytest.mark.parametrize("name", ["zero", "text", "audio", "truncated"])
def test_bad_files(videos, name):
    with pytest.raises(VideoError) as caught:
        load_clip(videos[name], SamplingSpec())
    assert caught.value.path == str(videos[name])
