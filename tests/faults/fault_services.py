"""Private Redis and PostgreSQL servers that a fault test may kill and restart without touching the
machine's shared ones (other tests use those). Both listen on 127.0.0.1 on a free port.

A server that cannot be started fails the test with the reason (it is part of the test's setup),
never skips it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{what} not listening on port {port} after {START_TIMEOUT_S} s")


class PrivateRedis:
    """A `redis-server` that keeps nothing on disk: killed, it loses every key, as a restarted
    production Redis without persistence does."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; the Redis fault test needs it (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_listening(self.port, "redis-server", self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; every queued message is gone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.kill()


class PrivatePostgres:
    """A PostgreSQL cluster of its own in a temporary folder, run as the `postgres` OS user when
    this process is root (initdb refuses root). Trust authentication, user `postgres`."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        self.bin_dir = Path(binaries[-1]).parent if binaries else None
        if self.bin_dir is None:
            initdb = shutil.which("initdb")
            if initdb is None:
                pytest.fail("no initdb (PostgreSQL server binaries) found; the database fault test needs them")
            self.bin_dir = Path(initdb).resolve().parent
        # Not under pytest's tmp_path: that folder is private to root and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-fault-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(self.bin_dir / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        # fsync off: a test cluster that is thrown away need not survive a power cut.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", str(int(START_TIMEOUT_S)), "start")
        _wait_listening(self.port, "postgres")

    def stop(self, mode: str = "fast") -> None:
        """`fast` terminates every session (clients see their connections dropped) and shuts down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
