"""A throwaway den daemon for benchmarks: its own socket, data dir, accounts."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEN = str(Path(sys.executable).parent / "den")


class BenchDaemon:
    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.base = Path(tempfile.mkdtemp(prefix="den-bench-"))
        self.base.chmod(0o755)
        self.prefix = f"db{tag}-"
        self.group = f"db{tag}"
        self.socket = self.base / "den.sock"
        self.env = {
            **os.environ,
            "DEN_CONFIG": str(self.base / "den.toml"),
            "DEN_SOCKET": str(self.socket),
            "DEN_DATA_DIR": str(self.base / "data"),
            "DEN_HTTP_PORT": "0",
            "DEN_SSH_PORT": "0",
            "DEN_ACCOUNT_PREFIX": self.prefix,
            "DEN_SOCKET_GROUP": self.group,
            "DEN_LOG_LEVEL": "warning",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        state = self.base / "data" / "serve.json"
        self.proc = subprocess.Popen([DEN, "serve"], env=self.env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (state.exists() and self.socket.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("den serve did not start")
            time.sleep(0.05)
        self.info = json.loads(state.read_text())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pw in pwd.getpwall():
            if pw.pw_name.startswith(self.prefix):
                subprocess.run(["userdel", pw.pw_name], capture_output=True, check=False)
        try:
            grp.getgrnam(self.group)
            subprocess.run(["groupdel", self.group], capture_output=True, check=False)
        except KeyError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)
