"""Probe and decode in a child process, so a native crash or hang costs one request, not the run.

A decoder is native code fed untrusted bytes: a segfault or an abort inside it kills the process that called
it, and a deadlock hangs it; neither can be caught in-process. ``IsolatedDecoder`` keeps one long-lived child
(``python -c "...isolation._worker_main(...)"``) per process and sends it requests over a pipe:

* the child opens, probes, selects and decodes (``decoders`` and ``sampling``, exactly as in-process) and hands
  the frames back through a file in ``/dev/shm`` that the parent maps and unlinks: no pickling, no copy of the
  pixels in the parent (the child writes them once);
* the parent waits at most ``timeout_s``; a child that died (signal or exit) or did not answer in time is
  killed and reaped, its shared-memory files are removed, and the request raises ``DecoderCrashedError`` /
  ``DecoderTimeoutError`` (both ``VideoError``s, so the dataset drops the sample and names the file); the next
  request starts a fresh child;
* the child is recycled every ``max_requests`` requests, which also bounds what decoder leaks can accumulate.

A subprocess (not ``multiprocessing``) because DataLoader workers are daemonic processes, which
``multiprocessing`` forbids to have children; a child inherited through ``fork`` is never reused (the pid is
checked), each process starts its own.

Cost: the child starts once (Python + numpy + decoder imports, ~0.3-0.5 s); per request the overhead is the
pipe round trip plus one copy of the frames in the child (measured numbers in ``tests/data/video`` and the
pipeline's report).

``initializer="module:function"`` runs in the child before any request (with ``sys_path`` prepended); tests use
it to install decoders that really segfault, abort or hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from surgsigma_train.data.video import decoders, sampling
from surgsigma_train.data.video.cache import meta_from_json, meta_to_json
from surgsigma_train.data.video.decoders import BackendUnavailableError, VideoError
from surgsigma_train.data.video.types import SamplingSpec, VideoMeta

DEFAULT_TIMEOUT_S = 60.0
_HEADER = struct.Struct("!I")
_SHM_PREFIX = "surgsigma-frames"


class DecoderCrashedError(VideoError):
    """The decoder process died (signal or exit) while handling this file."""


class DecoderTimeoutError(VideoError):
    """The decoder process did not answer in time for this file and was killed."""


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


# ---- framing: 4-byte length + JSON ---------------------------------------------------------------------------------
def _write_message(fd: int, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    data = _HEADER.pack(len(payload)) + payload
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes | None:
    """``size`` bytes from ``fd``; None at EOF; TimeoutError past ``deadline`` (time.monotonic)."""
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_message(fd: int, deadline: float | None = None) -> dict[str, Any] | None:
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    payload = _read_exact(fd, _HEADER.unpack(header)[0], deadline)
    return None if payload is None else json.loads(payload)


# ---- child ---------------------------------------------------------------------------------------------------------
_frame_counter = itertools.count()


def _frames_to_shm(frames_THWC: np.ndarray) -> dict[str, Any]:
    path = os.path.join(_shm_dir(), f"{_SHM_PREFIX}-{os.getpid()}-{next(_frame_counter)}")
    nbytes = max(1, frames_THWC.nbytes)  # mmap refuses length 0
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as mapped:
            np.frombuffer(mapped, np.uint8, count=frames_THWC.nbytes).reshape(frames_THWC.shape)[...] = frames_THWC
    finally:
        os.close(fd)
    return {"path": path, "shape": list(frames_THWC.shape)}


def _handle(request: dict[str, Any]) -> dict[str, Any]:
    path, backend = request["path"], request["backend"]
    # Through the module attribute, so an initializer can replace open_video (test-only fault injection).
    with decoders.open_video(path, backend, threads=request.get("threads", 1)) as reader:
        meta = reader.meta
        if request["op"] == "probe":
            return {"meta": meta_to_json(meta)}
        if request.get("frame_indices") is not None:  # chosen by the caller (a token planner) from this file's meta
            indices = [int(i) for i in request["frame_indices"]]
        else:
            spec = SamplingSpec(**request["spec"])
            indices = sampling.select_frames(meta, spec, sample_key=request["sample_key"], epoch=request["epoch"])
        frames_THWC, times_s = reader.get_frames(indices)
    return {"meta": meta_to_json(meta), "indices": indices, "times_s": times_s, "frames": _frames_to_shm(frames_THWC)}


def _worker_main(in_fd: int, out_fd: int, initializer: str | None) -> None:
    if initializer:
        module_name, _, function = initializer.partition(":")
        getattr(__import__(module_name, fromlist=[function]), function)()
    while True:
        request = _read_message(in_fd)
        if request is None:  # the parent closed the pipe or died
            return
        try:
            if request["op"] == "load":
                sampling.check_spec(SamplingSpec(**request["spec"]))
        except (TypeError, ValueError) as exc:  # a bad SamplingSpec: a configuration error, re-raised as such
            _write_message(out_fd, {"ok": False, "kind": "value", "reason": str(exc)})
            continue
        try:
            response = {"ok": True, **_handle(request)}
        except VideoError as exc:
            response = {"ok": False, "kind": "video", "reason": exc.reason}
        except BackendUnavailableError as exc:
            response = {"ok": False, "kind": "backend", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any other Python error in a decoder library: report, keep serving
            response = {"ok": False, "kind": "video", "reason": f"{type(exc).__name__}: {exc}"}
        _write_message(out_fd, response)


# ---- parent --------------------------------------------------------------------------------------------------------
def _frames_from_shm(handle: dict[str, Any]) -> np.ndarray:
    """Map the child's frames without copying; the file is unlinked at once (the mapping keeps the pages)."""
    path, shape = handle["path"], tuple(handle["shape"])
    fd = os.open(path, os.O_RDWR)
    try:
        nbytes = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
        os.unlink(path)
    count = int(np.prod(shape))
    return np.frombuffer(mapped, np.uint8, count=count).reshape(shape)  # the array keeps the mapping alive


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class IsolatedDecoder:
    """A decoder child process owned by this process; see the module docstring. Thread-safe."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_requests: int = 1000,
                 initializer: str | None = None, sys_path: Sequence[str] = ()):
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.initializer = initializer
        self.sys_path = list(sys_path)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._to_child = self._from_child = -1
        self._served = 0
        self.starts = 0  # children started so far (first start, then after a crash, timeout or recycling)

    # ---- public -------------------------------------------------------------------------------------------------
    def probe(self, path: str | os.PathLike[str], backend: str = "auto", *, timeout_s: float | None = None) -> VideoMeta:
        response = self._request({"op": "probe", "path": os.fspath(path), "backend": backend}, timeout_s)
        return meta_from_json(response["meta"])

    def load(self, path: str | os.PathLike[str], spec: SamplingSpec, *, backend: str = "auto", sample_key: str = "",
             epoch: int = 0, threads: int = 1, timeout_s: float | None = None,
             frame_indices: Sequence[int] | None = None) -> tuple[VideoMeta, list[int], np.ndarray, list[float]]:
        """Probe, select (or take ``frame_indices``) and decode in the child: ``(meta, indices, frames_THWC,
        times_s)``."""
        response = self._request({
            "op": "load", "path": os.fspath(path), "backend": backend, "spec": dataclasses.asdict(spec),
            "sample_key": sample_key, "epoch": epoch, "threads": threads,
            "frame_indices": None if frame_indices is None else [int(i) for i in frame_indices],
        }, timeout_s)
        frames_THWC = _frames_from_shm(response["frames"])
        return meta_from_json(response["meta"]), list(response["indices"]), frames_THWC, list(response["times_s"])

    def close(self) -> None:
        with self._lock:
            self._stop(kill=False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and os.getpid() == self._owner_pid else None

    # ---- internals ----------------------------------------------------------------------------------------------
    def _request(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        path = request["path"]
        with self._lock:
            self._ensure_child()
            try:
                _write_message(self._to_child, request)
                response = _read_message(self._from_child, time.monotonic() + timeout)
            except TimeoutError:
                self._stop(kill=True)
                raise DecoderTimeoutError(path, f"timed out after {timeout:g} s (decoder process killed)") from None
            except BrokenPipeError:
                response = None
            if response is None:
                raise DecoderCrashedError(path, self._death_reason())
            self._served += 1
            if self._served >= self.max_requests:
                self._stop(kill=False)
        if response["ok"]:
            return response
        if response["kind"] == "backend":
            raise BackendUnavailableError(response["reason"])
        if response["kind"] == "value":
            raise ValueError(response["reason"])
        raise VideoError(path, response["reason"])

    def _ensure_child(self) -> None:
        if os.getpid() != self._owner_pid:
            # Inherited through fork: the child belongs to the parent process. Drop our copies, start our own.
            for fd in (self._to_child, self._from_child):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._proc, self._to_child, self._from_child = None, -1, -1
            self._owner_pid = os.getpid()
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:  # died between requests
            self._stop(kill=True)
        request_read, request_write = os.pipe()
        response_read, response_write = os.pipe()
        env = dict(os.environ)
        if self.sys_path:
            env["PYTHONPATH"] = os.pathsep.join([*self.sys_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # -c rather than -m: running the module as __main__ would import it twice (the package imports it too).
        entry = ("import sys; from surgsigma_train.data.video.isolation import _worker_main; "
                 "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None)")
        command = [sys.executable, "-c", entry, str(request_read), str(response_write), self.initializer or ""]
        try:
            self._proc = subprocess.Popen(command, pass_fds=(request_read, response_write), stdin=subprocess.DEVNULL,
                                          env=env, close_fds=True)
        finally:
            os.close(request_read)
            os.close(response_write)
        self._to_child, self._from_child = request_write, response_read
        self._served = 0
        self.starts += 1

    def _death_reason(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._stop(kill=True)
        if code is None:
            return "decoder process closed its pipe and did not exit"
        if code < 0:
            return f"decoder crashed with signal {-code} ({_signal_name(-code)})"
        return f"decoder process exited with status {code}"

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        for fd in (self._to_child, self._from_child):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_child = self._from_child = -1
        if proc is None:
            return
        if kill and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)  # closing its request pipe makes a healthy child exit by itself
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for leftover in glob.glob(os.path.join(_shm_dir(), f"{_SHM_PREFIX}-{proc.pid}-*")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None and os.getpid() == self._owner_pid:
            self._stop(kill=True)


_default: IsolatedDecoder | None = None
_default_lock = threading.Lock()


def default_isolated_decoder() -> IsolatedDecoder:
    """This process's shared decoder child (started on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = IsolatedDecoder()
        return _default


def probe_in_subprocess(path: str | os.PathLike[str], timeout_s: float = 30.0, backend: str = "auto") -> VideoMeta:
    """``VideoMeta`` of ``path`` probed in the shared child process; a crash or hang raises a ``VideoError``."""
    return default_isolated_decoder().probe(path, backend, timeout_s=timeout_s)

