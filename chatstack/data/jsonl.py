"""Reading JSONL files line by line with errors that name the file and line.

from chatstack.data.jsonl import iter_jsonl
for lineno, obj in iter_jsonl("prompts.jsonl"): ...
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line. A line that is not JSON, or bytes that are not
    UTF-8, raise `error("PATH:LINE: bad JSON (...)")` before anything after that line is read."""
    with open(path, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: bad JSON ({e.msg}, column {e.colno})") from None
                yield lineno, obj
        except UnicodeDecodeError as e:
            raise error(f"{path}:{lineno + 1}: not valid UTF-8 (byte {e.start} of the line's chunk)") from None
