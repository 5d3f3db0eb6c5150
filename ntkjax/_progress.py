"""A dependency-free progress bar for long host-side loops (kernel blocks, sweeps, the demo)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def remaining_seconds(elapsed: float, done: int, total: int,
                      first_item: float | None = None) -> float | None:
    """Estimated seconds left after ``done`` of ``total`` items took ``elapsed`` seconds.

    The rate is measured on the items after the first when there are at least two (the first
    item of a JAX loop usually includes compilation, which later items do not pay);
    ``first_item`` is the first item's duration. None while nothing is done (no estimate yet).
    """
    if done <= 0:
        return None
    if done >= 2 and first_item is not None:
        per_item = max(elapsed - first_item, 0.0) / (done - 1)
    else:
        per_item = elapsed / done
    return per_item * max(total - done, 0)


def format_eta(seconds: float | None) -> str:
    """``eta 12.3s`` / ``eta 4m05s``; ``eta ?`` before the first item ends (never ``nan``)."""
    if seconds is None or not math.isfinite(seconds):
        return "eta      ?"
    if seconds < 100:
        return f"eta {seconds:5.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"eta {minutes:2d}m{rest:02d}s"


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    description: str = "",
    enabled: bool = True,
    stream=None,
) -> Iterator[T]:
    """Yields ``items`` while drawing ``description [####....] k/total elapsed eta`` on stderr.

    Draws nothing when ``enabled`` is False. The bar is redrawn after every item (at most ten
    times a second) and is finished with a newline, so log files stay readable. The estimate
    of the time left is the rate of the items after the first (which carries compilation)
    times the items left; it reads ``eta ?`` until the first item is done.
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
    first_item: float | None = None

    def draw(final: bool = False) -> None:
        elapsed = time.perf_counter() - start
        if total:
            width = 24
            filled = int(width * min(done, total) / total)
            eta = format_eta(remaining_seconds(elapsed, done, total, first_item))
            bar = "#" * filled + "." * (width - filled)
            text = f"\r{description} [{bar}] {done}/{total} {elapsed:6.1f}s {eta}"
        else:
            text = f"\r{description} {done} done {elapsed:6.1f}s"
        stream.write(text + ("\n" if final else ""))
        stream.flush()

    draw()
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if first_item is None:
            first_item = now - start
        if now - last > 0.1 and not (total and done >= total):
            draw()
            last = now
    draw(final=True)
