"""Shared by the SDK's tests: the cluster under test (`MAOS_TEST_ENDPOINTS`, set by
`node/tests/python_sdk.rs`, which starts a real 3-node cluster) and bounded waits."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import pytest

import maos

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
#: The longest one step of a test waits.
STEP_S = 60.0


@pytest.fixture(scope="session")
def endpoints() -> list[str]:
    value = os.environ.get("MAOS_TEST_ENDPOINTS", "")
    if not value:
        pytest.fail("MAOS_TEST_ENDPOINTS is not set: run these tests through "
                    "`cargo test -p maos-node --test python_sdk`, or set it to a cluster's host:port list")
    return value.split(",")


@pytest.fixture
def client(endpoints: list[str]) -> Iterator[maos.Client]:
    with maos.Client(endpoints, deadline=15) as c:
        yield c


def wait_for(what: str, check: Callable[[], Optional[T]], timeout_s: float = STEP_S, every_s: float = 0.1) -> T:
    """Poll `check` until it returns something other than None, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def free_dead_endpoint() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class WorkerProcess:
    """A worker script run as a real process (so `kill -9` is real), its stdout read by a thread."""

    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue(maxsize=10_000)
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout_s: float = STEP_S) -> str:
        """The next line starting with `prefix` (other lines are kept in `seen`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the worker printed no {prefix!r} line within {timeout_s} s; output: {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        self.process.kill()  # SIGKILL
        self.process.wait(timeout=10)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.kill()
