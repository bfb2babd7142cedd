"""The one progress bar: tqdm when it is installed, a quiet stand-in otherwise.

tqdm is optional (the demo and dev extras): the CLI, the MLP's epochs and the
mmseg extraction all report progress through :func:`progress`, which returns
an object with tqdm's small interface (iteration, ``update``,
``set_postfix_str``, ``close``, context manager) either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable


class _NoBar:
    """tqdm's interface, doing nothing but (optionally) a log line every 10%."""

    def __init__(self, iterable=None, total=None, desc=None,
                 log: Callable[[str], None] | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.log = total, desc, log
        self.n, self._next = 0, 0.1

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.log is not None and self.total and self.n / self.total >= self._next:
            self.log(f"{self.desc or 'progress'}: {self.n}/{self.total}")
            self._next = (int(10 * self.n / self.total) + 1) / 10

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    log: Callable[[str], None] | None = None,
):
    """A progress bar over ``iterable`` (or a manual one of ``total`` steps).

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over; ``None`` for a bar driven by ``update``.
    total, desc, unit : as tqdm's.
    enabled : bool, default=True
        ``False`` shows nothing. ``True`` shows a bar on stderr when it is a
        terminal (tqdm's ``disable=None``: nothing in CI logs or pipes).
    log : callable, optional
        Without tqdm, called with one line every 10% (e.g. mmengine's logger);
        without tqdm and without ``log`` nothing is shown.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return _NoBar(iterable, total=total, desc=desc, log=log if enabled else None)
    return tqdm(iterable, total=total, desc=desc, unit=unit,
                disable=None if enabled else True, file=sys.stderr)
