"""Shared test fixtures: offline, CPU-only environment; tiny models built once per session."""

from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions")
)
# Jobs write only under the storage root (issue 19 item 2, pipeline/storage/root.py). Tests put their outputs in
# the temp directory, so that is this session's root, as a user with outputs elsewhere sets one; the caches stay in
# the checkout's .cache, where they are without a root (the demo model is trained once).
os.environ.setdefault("ODEDIT_STORAGE_ROOT", os.path.realpath(tempfile.gettempdir()))
os.environ.setdefault(
    "ODEDIT_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from testdata import FAMILIES, make_image  # noqa: E402,F401  (shared by test modules)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_dir(family)` -> path of a tiny random model of that family, built once per session."""
    from odedit.models import build_tiny

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"), seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dir):
    """`tiny_adapter(family)` -> a freshly loaded adapter (its own model copy) of a tiny model."""
    from odedit.models import ADAPTERS

    def get(family: str, **kwargs):
        return ADAPTERS.get(family).from_pretrained(tiny_dir(family), **kwargs)

    return get


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, no dashboard) for the whole session, never a cluster another process started
    (`address="local"`); shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- reliability log
# Fault-injection and bad-input tests record what they observed; at the end of the session the records are
# written to outputs/reliability/outcomes.json (always: a run that records nothing leaves an empty file, never an
# older run's), with each row's test result, the commit and the date. `python -m jobs.reliability_report` renders
# docs/reliability.md from it; a whole-suite run fails when the committed docs/reliability.md differs from what
# the generator writes for this run (issue 19 item 21), so the table cannot drift from what the tests observe.

_OUTCOMES: list[dict] = []
_RESULTS: dict[str, bool] = {}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def record_outcome(request):
    """`record_outcome(kind, case, outcome, detail="", *, edits_lost=None, applied_twice=None)`: log an observed
    outcome of a fault or bad input. Fault tests that check a ledger pass the counts they measured."""

    def record(
        kind: str,
        case: str,
        outcome: str,
        detail: str = "",
        *,
        edits_lost: int | None = None,
        applied_twice: int | None = None,
    ) -> None:
        row = {"kind": kind, "case": case, "outcome": outcome, "detail": detail[:300], "test": request.node.nodeid}
        if edits_lost is not None:
            row.update(edits_lost=int(edits_lost), applied_twice=int(applied_twice or 0))
        _OUTCOMES.append(row)

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed or (report.when == "call" and report.passed):
        _RESULTS[item.nodeid] = _RESULTS.get(item.nodeid, True) and report.passed


def _whole_suite(session) -> bool:
    """A run of every test (no selection): the only kind whose outcomes may be compared with the document."""
    opt = session.config.option
    args = [os.path.realpath(a) for a in session.config.args]
    everything = {os.path.realpath(_REPO), os.path.realpath(os.path.join(_REPO, "tests"))}
    return (
        not opt.keyword
        and not opt.markexpr
        and not getattr(opt, "lf", False)
        and not getattr(opt, "deselect", None)
        and set(args) <= everything
    )


def pytest_sessionfinish(session, exitstatus):
    from jobs import reliability_report  # deferred: only at the end of a session

    for row in _OUTCOMES:
        row["test_passed"] = _RESULTS.get(row["test"], False)
    data = reliability_report.outcomes_document(_OUTCOMES, int(exitstatus), _REPO)
    out = os.path.join(_REPO, "outputs", "reliability")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "outcomes.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    if not _whole_suite(session) or exitstatus != 0:
        return
    problem = reliability_report.check_document(data, os.path.join(_REPO, "docs", "reliability.md"))
    if problem:
        session.config.get_terminal_writer().line(f"\nerror: {problem}", red=True)
        session.exitstatus = 1
