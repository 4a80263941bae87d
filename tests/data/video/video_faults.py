"""Loaded into the decoder child process by ``IsolatedDecoder(initializer="video_faults:install")``: makes
``open_video`` really crash (SIGSEGV, SIGABRT) or hang for files whose name says so; other files decode normally.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from surgsigma_train.data.video import decoders


def install() -> None:
    real_open_video = decoders.open_video

    def faulty_open_video(path, backend="auto", **kwargs):
        name = Path(path).name
        if name.startswith("segv"):
            ctypes.string_at(0)  # reads address 0: a real segmentation fault in native code
        if name.startswith("abort"):
            os.abort()
        if name.startswith("hang"):
            time.sleep(3600)
        return real_open_video(path, backend, **kwargs)

    decoders.open_video = faulty_open_video
