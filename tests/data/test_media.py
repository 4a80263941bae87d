import os

import av
import numpy as np
import pytest
from PIL import Image

from surgsigma_train.data.media import MediaError, load_image, resolve_media_path


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
