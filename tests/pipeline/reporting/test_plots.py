"""The plot of lambda and the penalty along a stream (issue 17), from result rows as the engine writes them."""

from __future__ import annotations

import math

from pipeline.reporting.plots import plot_dual


def test_plot_dual_reads_the_rows_last_iteration_lambda_and_penalty(tmp_path):
    rows = [{"final_lambda": 0.69 + 0.01 * i, "final_penalty": 10.0 ** -(i % 4)} for i in range(12)]
    rows[3]["final_penalty"] = math.nan  # a rolled-back step
    path = plot_dual(rows, str(tmp_path / "dual.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    host = [{"final_lambda": math.nan, "final_penalty": math.nan}] * 3  # the host arm: no penalty at all
    assert plot_dual(host, str(tmp_path / "host.png")).endswith("host.png")
