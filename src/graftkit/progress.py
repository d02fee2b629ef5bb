"""A transient progress bar for loops over tensors (graft inspect --deltas, task-vector similarity)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def counting_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``, which moves a bar of ``total`` steps by one; a no-op when not ``enabled``.
    The bar is removed when the loop ends, however it ends."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    try:
        yield lambda: bar.update(task, advance=1)
    finally:
        bar.stop()
