"""Progress and library chatter that suit where the output goes: a terminal, or a log file.

    bar = progress(total=240, desc="stream", unit="edit")   # tqdm on a terminal, `LineProgress` in a log
    bar.n = 16; bar.refresh(); bar.update(8); bar.close()   # the same calls either way
    install_quiet_logs()                                      # once, at a job's entry (jobs/common.py)
    quiet_ray_data()                                          # where the code builds a Ray Dataset

Under `ray job logs` (a file, not a terminal) every redraw of a progress bar is a line of its own: 817 of a
1,120-line demo job log were bar redraws. So when the output stream is not a TTY:

* `progress(...)` returns a `LineProgress`, which prints one plain line when the work crosses the next
  `every_pct` percent, or when `every_s` seconds passed with progress since the last line, and a last line at
  `close()`; on a terminal it returns a tqdm bar as before.
* `install_quiet_logs()` shows each repeated warning once: a `warnings` message (same category and text, from
  any line of code) and a WARNING-or-above log record (same logger, level and text) of the handlers installed
  so far (`quiet_ray_data()` repeats it after Ray configured its own). It also sets, unless the environment
  already sets them, the switches that turn third-party bars into nothing or into rare redraws:
  `RAY_DATA_DISABLE_PROGRESS_BARS=1` (Ray Data's bars, and its every-few-seconds "logging progress" blocks),
  `HF_HUB_DISABLE_PROGRESS_BARS=1` and `HF_DATASETS_DISABLE_PROGRESS_BARS=1` (transformers' "Loading weights",
  `datasets`' bars), and `TQDM_MININTERVAL=30` (any other tqdm bar redraws at most every 30 s). The variables
  reach the Ray workers of a cluster this process starts (they inherit its environment); the workers of a
  cluster it joins keep their own environment.
* `quiet_ray_data()` switches Ray Data's progress bars off in the current `DataContext` (the one a Dataset
  built now carries to its tasks), whatever the environment said when Ray Data was imported.

On a terminal none of this changes anything: bars draw as before and warnings show as Python and the
libraries decide.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import IO, Any

# Environment defaults set by `install_quiet_logs()` when the output is not a terminal (a user's value wins).
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_MININTERVAL": "30",
}
# Loggers whose handlers get the repeated-record filter (besides the root's): they keep handlers of their own.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "datasets", "deepspeed", "mlflow")


def interactive(stream: IO | None = None) -> bool:
    """Whether `stream` (default: stderr, where bars draw) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """A tqdm stand-in for logs: `n`, `total`, `update()`, `refresh()`, `set_postfix_str()`, `close()`,
    printing one line per `every_pct` percent crossed or per `every_s` seconds with progress (see the module
    docstring), never a carriage return."""

    def __init__(
        self,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        file: IO | None = None,
        every_s: float = 30.0,
        every_pct: float = 10.0,
        disable: bool = False,
        initial: float = 0,
        clock: Any = time.monotonic,
        **_tqdm_only: Any,  # bar_format, leave, ncols, ...: drawing options with no meaning in a log line
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.postfix = ""
        self.disable = disable
        self.every_s = every_s
        self.every_pct = every_pct
        self._file = file
        self._clock = clock
        self._start = clock()
        self._last_time = self._start
        self._last_n: float | None = None  # n when the last line was printed (None: no line yet)
        self._last_step = 0  # the highest every_pct step printed
        self._closed = False

    # -- the tqdm calls the project makes
    def update(self, k: float = 1) -> None:
        self.n += k
        self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """Print a line when one is due (a new `every_pct` step, or `every_s` seconds with progress)."""
        if self.disable or self._closed or self.n == self._last_n:
            return
        step = self._step()
        if step > self._last_step or self._clock() - self._last_time >= self.every_s:
            self._print(step)

    def close(self) -> None:
        """The last line (unless the last printed line already says the same), once."""
        if self.disable or self._closed:
            return
        if self.n != self._last_n:
            self._print(self._step())
        self._closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals
    def _step(self) -> int:
        if not self.total or self.every_pct <= 0:
            return 0
        return int(min(100.0, 100.0 * self.n / self.total) // self.every_pct)

    def format(self) -> str:
        """The line as it would print now: `desc: n/total unit (pct%) elapsed, rate, eta [postfix]`."""
        elapsed = self._clock() - self._start
        done = f"{_num(self.n)}/{_num(self.total)}" if self.total else _num(self.n)
        parts = [f"{self.desc}: {done} {self.unit}" if self.desc else f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        timing = [_duration(elapsed)]
        if self.n and elapsed > 0:
            rate = self.n / elapsed
            timing.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                timing.append(f"eta {_duration((self.total - self.n) / rate)}")
        text = f"{parts[0]} {', '.join(timing)}"
        return f"{text} [{self.postfix}]" if self.postfix else text

    def _print(self, step: int) -> None:
        stream = self._file if self._file is not None else sys.stderr
        print(self.format(), file=stream, flush=True)
        self._last_n = self.n
        self._last_step = max(self._last_step, step)
        self._last_time = self._clock()


def progress(
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    disable: bool = False,
    file: IO | None = None,
    every_s: float = 30.0,
    every_pct: float = 10.0,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar when `file` (default stderr) is a terminal, else a `LineProgress` (see the module docstring).

    Both take `total`, `desc`, `unit`, `disable` and tqdm's drawing options (ignored in a log); `every_s` and
    `every_pct` set how often a log gets a line.
    """
    if interactive(file):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=file, **tqdm_kwargs)
    return LineProgress(
        total, desc, unit, file=file, every_s=every_s, every_pct=every_pct, disable=disable, **tqdm_kwargs
    )


# ---------------------------------------------------------------------------------------------- repeated warnings


class OnceFilter(logging.Filter):
    """Lets a WARNING-or-above record through the first time its (logger, level, text) is seen, then drops it."""

    def __init__(self) -> None:
        super().__init__("odedit.once")
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            key = (record.name, record.levelno, record.getMessage())
        except Exception:  # a record whose arguments do not format: let logging report it as it would
            return True
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = OnceFilter()


def _show_once(showwarning: Any) -> Any:
    seen: set[tuple[str, str]] = set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        key = (getattr(category, "__name__", str(category)), str(message))
        if key in seen:
            return
        seen.add(key)
        showwarning(message, category, filename, lineno, file, line)

    show.odedit_once = True  # type: ignore[attr-defined]
    return show


def attach_once_filter() -> None:
    """Add the repeated-record filter to the handlers of the root logger and of `LIBRARY_LOGGERS` (idempotent)."""
    for name in ("", "py.warnings", *LIBRARY_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            if _ONCE not in handler.filters:
                handler.addFilter(_ONCE)


_INSTALLED = False  # set by install_quiet_logs: only a job's process entry changes its logging


def install_quiet_logs(stream: IO | None = None) -> bool:
    """Each repeated warning once; when `stream` (default stderr) is not a terminal, the environment defaults
    of `QUIET_ENV` too. Returns whether the output is a terminal. Idempotent.

    Called by a job's process entry (`jobs.common.run`, the `odedit` command), never by library code: a
    process that imports the pipeline (a test session, a notebook) keeps its own logging.
    """
    global _INSTALLED
    _INSTALLED = True
    tty = interactive(stream)
    if not getattr(warnings.showwarning, "odedit_once", False):
        warnings.showwarning = _show_once(warnings.showwarning)
    attach_once_filter()
    if not tty:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    return tty


def quiet_ray_data(stream: IO | None = None) -> None:
    """Turn Ray Data's progress bars off in the current `DataContext` when `stream` is not a terminal.

    Call it where a Dataset is built (its tasks get the context as it is then); it imports Ray Data, so only
    code that is about to use it should.
    """
    if interactive(stream):
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if _INSTALLED:
        attach_once_filter()  # Ray configured its loggers' handlers on import


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
