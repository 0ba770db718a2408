"""pipeline.reporting.progress: bars on a terminal, a line now and then in a log; each repeated warning once."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest

from pipeline.reporting import progress as pr
from pipeline.reporting.progress import LineProgress, OnceFilter, install_quiet_logs, progress


@pytest.fixture(autouse=True)
def _leave_logging_as_found(monkeypatch):
    """install_quiet_logs changes process-wide state; undo it so later tests see their own warnings."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(pr, "_INSTALLED", False)
    for key in pr.QUIET_ENV:
        monkeypatch.setenv(key, os.environ[key]) if key in os.environ else monkeypatch.delenv(key, raising=False)
    yield
    for name in ("", "py.warnings", *pr.LIBRARY_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            if pr._ONCE in handler.filters:
                handler.removeFilter(pr._ONCE)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_ten_percent_not_per_redraw():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=240, desc="stream", unit="edit", file=out, clock=clock)
    for done in range(0, 241, 8):  # the engine's poll loop: set n, refresh, once a second
        for _ in range(3):
            clock.t += 1.0
            bar.n = done
            bar.refresh()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # 10%, 20%, ... 100%: not 90 redraws
    assert lines[0].startswith("stream: 24/240 edit (10%)") and "eta" in lines[0]
    assert lines[-1].startswith("stream: 240/240 edit (100%)")


def test_slow_progress_still_prints_every_so_often_and_closes_with_the_final_state():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, desc="slow", unit="it", file=out, clock=clock, every_s=30)
    for _ in range(90):  # 1 step a second: under 10% in 90 s, so time decides
        clock.t += 1.0
        bar.update(1)
    bar.set_postfix_str("loss 0.5", refresh=False)
    clock.t += 1.0
    bar.n = 95
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["30/1000", "60/1000", "90/1000", "95/1000"]
    assert lines[-1].endswith("[loss 0.5]")
    out2 = io.StringIO()
    with LineProgress(desc="no total", file=out2, clock=Clock()) as open_ended:
        open_ended.update(5)
    assert out2.getvalue() == "no total: 5 it 00:00\n"


def test_disabled_bars_print_nothing_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    bar = progress(total=3, desc="x", disable=True, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == "" and isinstance(bar, LineProgress)
    tty = progress(total=3, desc="x", file=Terminal(), bar_format="{n}")
    assert type(tty).__module__.startswith("tqdm")
    tty.close()


def test_repeated_warnings_show_once(monkeypatch):
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(str(a[0])))
    for key in pr.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    assert install_quiet_logs(io.StringIO()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
            warnings.warn("another", UserWarning, stacklevel=1)
    assert shown == ["deprecated thing", "another"]
    assert all(os.environ[key] == value for key, value in pr.QUIET_ENV.items())


def test_a_users_environment_wins_and_a_terminal_keeps_its_bars(monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("TQDM_MININTERVAL", "1")
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    assert install_quiet_logs(Terminal()) is True
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ
    install_quiet_logs(io.StringIO())
    assert os.environ["TQDM_MININTERVAL"] == "1" and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_repeated_log_records_of_warning_level_pass_once():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(OnceFilter())
    log = logging.getLogger("odedit.test.once")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(3):
            log.warning("worker %s is slow", 1)
            log.error("boom")
        log.warning("worker %s is slow", 2)
        log.setLevel(logging.INFO)
        log.info("step")
        log.info("step")
    finally:
        log.removeHandler(handler)
    assert out.getvalue().splitlines() == ["worker 1 is slow", "boom", "worker 2 is slow", "step", "step"]


def test_ray_data_bars_go_off_in_a_log():
    ray_data = pytest.importorskip("ray.data")
    ctx = ray_data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        ctx.enable_progress_bars = True
        pr.quiet_ray_data(Terminal())
        assert ctx.enable_progress_bars is True
        pr.quiet_ray_data(io.StringIO())
        assert ctx.enable_progress_bars is False
    finally:
        ctx.enable_progress_bars = before
