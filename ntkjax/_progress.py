"""A dependency-free progress bar for long host-side loops (kernel blocks, sweeps, the demo)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    description: str = "",
    enabled: bool = True,
    stream=None,
) -> Iterator[T]:
    """Yields ``items`` while drawing ``description [####....] k/total eta`` on stderr.

    Draws nothing when ``enabled`` is False. The bar is redrawn at most ten times a second
    and is finished with a newline, so log files stay readable.
    """
    if not enabled:
        yield from items
        return
    stream = sys.stderr if stream is None else stream
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    start = last = time.perf_counter()
    done = 0

    def draw(final: bool = False) -> None:
        elapsed = time.perf_counter() - start
        if total:
            width = 24
            filled = int(width * done / total)
            eta = elapsed / done * (total - done) if done else float("nan")
            bar = "#" * filled + "." * (width - filled)
            text = f"\r{description} [{bar}] {done}/{total} {elapsed:6.1f}s eta {eta:6.1f}s"
        else:
            text = f"\r{description} {done} done {elapsed:6.1f}s"
        stream.write(text + ("\n" if final else ""))
        stream.flush()

    draw()
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last > 0.1:
            draw()
            last = now
    draw(final=True)
