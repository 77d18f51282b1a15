"""A pytest plugin for the GPU window: each test's outcome, and a failure's report, appended to the
file named by ``$PYTEST_LIVE_LOG`` as soon as the test ends, so that a run cut at its time cap still
brings back which tests failed and why (pytest itself prints failures only at the end).

    PYTEST_LIVE_LOG=out.txt python -m pytest -p pytest_live ...   # benchmarks/ on the import path
"""
from __future__ import annotations

import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("PYTEST_LIVE_LOG")
    if not path or (report.when != "call" and report.passed):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
        if report.failed:
            f.write(report.longreprtext[-6000:] + "\n\n")
