"""Shared test fixtures: offline, CPU-only environment; tiny models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions")
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
# written to outputs/reliability/outcomes.json, from which `python -m jobs.reliability_report` renders
# docs/reliability.md (the table is generated from a real test run, never written by hand).

_OUTCOMES: list[dict] = []


@pytest.fixture
def record_outcome(request):
    """`record_outcome(kind, case, outcome, detail="")`: log an observed outcome of a fault or bad input."""

    def record(kind: str, case: str, outcome: str, detail: str = "") -> None:
        _OUTCOMES.append(
            {"kind": kind, "case": case, "outcome": outcome, "detail": detail[:300], "test": request.node.nodeid}
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    if not _OUTCOMES:
        return
    import json

    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outputs", "reliability")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "outcomes.json"), "w", encoding="utf-8") as fh:
        json.dump({"exitstatus": int(exitstatus), "outcomes": _OUTCOMES}, fh, indent=1)
