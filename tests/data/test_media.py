import os

import av
import numpy as np
import pytest
from PIL import Image

from surgsigma_train.data.media import (MediaError, available_backends, load_image, load_video,
                                        resolve_media_path, uniform_frame_indices)
from surgsigma_train.data.sample import MediaRef


def write_counter_video(path, num_frames=24, fps=8, size=(64, 48)):
    """Each frame's mean brightness encodes its index, so decoded frames can be identified."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = np.full((size[1], size[0], 3), 8 + i * 9, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_uniform_indices():
    assert uniform_frame_indices(100, 10, 4) == [12, 37, 62, 87]
    assert uniform_frame_indices(3, 10, 8) == [0, 1, 2]  # short clip: every frame once, no duplicates
    assert uniform_frame_indices(100, 10, 2, start_s=2.0, end_s=4.0) == [25, 35]
    with pytest.raises(ValueError):
        uniform_frame_indices(10, 10, 2, start_s=5.0)


def test_path_confinement(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    assert resolve_media_path(root, "a.png") == (root / "a.png").resolve()
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "link.png", ""):
        with pytest.raises(MediaError):
            resolve_media_path(root, bad)


def test_load_image_errors(tmp_path):
    good = tmp_path / "g.png"
    Image.new("P", (8, 8)).save(good)
    assert load_image(good).mode == "RGB"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(MediaError, match="bad.png: cannot decode image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="file not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("backend", available_backends())
def test_video_frames_exact(tmp_path, backend):
    path = tmp_path / "v.mp4"
    write_counter_video(path)
    clip = load_video(path, MediaRef("video", "v.mp4"), 4, backend)
    assert clip.backend == backend and clip.frames_THWC.shape == (4, 48, 64, 3)
    assert list(clip.frame_indices) == [3, 9, 15, 21]
    decoded_index = np.round((clip.frames_THWC.reshape(4, -1).mean(1) - 8) / 9).astype(int)
    assert decoded_index.tolist() == [3, 9, 15, 21]
    assert clip.timestamps_s == pytest.approx([i / 8 for i in (3, 9, 15, 21)], abs=1e-3)


def test_video_clip_window_and_corrupt_file(tmp_path):
    path = tmp_path / "v.mp4"
    write_counter_video(path)
    clip = load_video(path, MediaRef("video", "v.mp4", start_s=1.0, end_s=2.0), 2)
    assert all(8 <= i < 16 for i in clip.frame_indices)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MediaError, match="broken.mp4: cannot decode video"):
        load_video(broken, MediaRef("video", "broken.mp4"), 4)
