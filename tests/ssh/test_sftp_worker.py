"""The sftp worker joins a workspace only through the very process den checked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from den.ssh.sftp_worker import open_process


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_a_reused_pid_is_refused() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        started = _start_time(p.pid)
        fd = open_process(p.pid, started)
        try:
            assert os.path.exists(f"/proc/self/fd/{fd}")
            # Opened through the fd: this process's namespaces, whatever reuses its pid later.
            os.close(os.open("ns/mnt", os.O_RDONLY, dir_fd=fd))
            p.kill()
            p.wait()
            with pytest.raises(OSError):
                os.open("ns/mnt", os.O_RDONLY, dir_fd=fd)  # gone: nothing else behind it
        finally:
            os.close(fd)
        # Another start time under the same pid number is another process.
        with pytest.raises(OSError):
            open_process(os.getpid(), _start_time(os.getpid()) + 1)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
