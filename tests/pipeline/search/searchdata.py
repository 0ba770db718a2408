"""The search tests' shared inputs: a space of every kind and a raw config dict around it."""

from __future__ import annotations

SPACE = {
    "method.lr": {"type": "loguniform", "low": "1e-3", "high": 0.3},  # PyYAML reads 1e-3 as a string
    "odedit.w_loc": {"type": "uniform", "low": 0.0, "high": 2.0},
    "odedit.penalty": {"type": "choice", "values": ["learned", "fixed", "off"]},
    "method.n_iter": {"type": "randint", "low": 2, "high": 4},
}


def raw_config(**search) -> dict:
    """A raw config dict of a valid search (as the loader's extra checks receive it)."""
    return {
        "stream": {"mode": "sequential", "eval_every": 8, "batch_size": 4},
        "search": {"space": dict(SPACE), **search},
    }


def issue_paths(issues) -> list[str]:
    return sorted(i.path for i in issues)
