"""A process inside a workspace (an ExecStream of any backend) relayed to callbacks:
what an SSH channel and the browser terminal need.

Output goes to ``out`` as it comes, as fast as the consumer takes it (:meth:`pause`
stops reading: what is not read waits in the backend, and the process with it).
Input is queued and written in order; ``on_full`` and ``on_drained`` tell when the
queue backs up past HIGH bytes and drains below LOW, so that the channel stops
reading its client meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from den import tasks
from den.backends.base import ExecStream

HIGH = 1 << 20
LOW = 1 << 18


def _nothing() -> None:
    pass


class StreamRelay:
    def __init__(
        self,
        stream: ExecStream,
        out: Callable[[int, bytes], None],
        on_full: Callable[[], None] = _nothing,
        on_drained: Callable[[], None] = _nothing,
    ) -> None:
        self.stream = stream
        self._out = out
        self._on_full = on_full
        self._on_drained = on_drained
        self._can_read = asyncio.Event()
        self._can_read.set()
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._full = False
        self._eof = False
        self._more = asyncio.Event()
        self.done = asyncio.Event()  # all output was read
        self._tasks = [
            tasks.spawn(self._reading(), name="stream-out"),
            tasks.spawn(self._writing(), name="stream-in"),
        ]

    async def _reading(self) -> None:
        try:
            while True:
                if not self._can_read.is_set():
                    await self._can_read.wait()
                got = await self.stream.read()
                if got is None:
                    return
                self._out(*got)
        finally:
            self.done.set()

    async def _writing(self) -> None:
        while True:
            while not self._queue:
                if self._eof:
                    await self.stream.close_stdin()
                    return
                self._more.clear()
                await self._more.wait()
            data = self._queue.popleft()
            await self.stream.write(data)
            self._queued -= len(data)
            if self._full and self._queued < LOW:
                self._full = False
                self._on_drained()

    def write(self, data: bytes) -> None:
        if self._eof or not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._more.set()
        if not self._full and self._queued > HIGH:
            self._full = True
            self._on_full()

    def close_stdin(self) -> None:
        """End of input, once what was written is."""
        self._eof = True
        self._more.set()

    def pause(self) -> None:
        self._can_read.clear()

    def resume(self) -> None:
        self._can_read.set()

    async def wait(self, drain: float) -> int:
        """The process's status once it ended and its output was read (up to ``drain``
        seconds more): its exit code, or -N when signal N killed it."""
        ended = await self.stream.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), drain)
        return -ended.signal if ended.signal else ended.exit_code

    async def close(self) -> None:
        """Stop relaying and free the process (killed if it still runs)."""
        for t in self._tasks:
            t.cancel()
        if self._full:
            self._full = False
            self._on_drained()
        await self.stream.close()
