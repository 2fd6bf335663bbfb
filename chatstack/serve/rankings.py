"""The rankings file the /rank page appends to, written off the event loop.

    writer = RankingsWriter("runs/rankings.jsonl")
    count = await writer.append({"prompt": [...], "responses": [...]})   # on disk (fsync) when it returns
    await writer.count_async()                                           # lines so far

One worker thread does every write: each record is one `os.write` of a whole line to a file opened with O_APPEND,
then `fsync`, before `append` returns, so an acknowledged ranking survives kill -9 and lines never interleave (one
writer). A line cut short by an earlier crash is closed with a newline before the first new record, so it can't
swallow it. The lines are counted once (the first time the count is needed), then the count is kept up to date: a
submit never re-reads the file. The handlers await the worker, so a slow disk (an fsync, a first count of a large
file) never stalls the event loop and the other requests (/health, streams).
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional


class RankingsWriter:
    def __init__(self, path: str):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstack-rankings")
        self._count: Optional[int] = None  # only the worker thread touches it
        self._tail_checked = False

    def _count_lines(self) -> int:
        if self._count is None:
            n = 0
            if self.path.exists():
                with open(self.path, "rb") as f:
                    for line in f:
                        n += bool(line.strip())
            self._count = n
        return self._count

    def _append(self, line: bytes) -> int:
        n = self._count_lines()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and not self._tail_checked:  # a torn last line (a crash mid-write): close it first
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            self._tail_checked = True
            view = memoryview(line)
            while view:  # one write in practice; the loop covers a partial one
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._count = n + 1
        return self._count

    async def append(self, record: dict) -> int:
        """Append one record as a JSON line; returns the number of lines once it is on disk."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._append, line)

    async def count_async(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._count_lines)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
