"""The queue benchmark, reduced to a smoke test: it runs end to end and the invariants hold.

Timings are the benchmark's business (bench/README.md); here only correctness is asserted.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_a_reduced_queue_benchmark_runs_every_task_once_within_the_cap(tmp_path):
    output = tmp_path / "queue_bench.json"
    command = [
        sys.executable, "bench/queue_bench.py",
        "--tasks", "20", "--students", "5", "--cap", "2",
        "--job-seconds", "0.2", "--arrival-seconds", "0.5",
        "--output", str(output),
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads(output.read_text())
    assert result["task_statuses"] == {"completed": 20}
    assert result["submission_statuses"] == {"200": 20}
    assert result["max_running_seen"] == 2
    assert result["submitted_more_than_once"] == []
    assert result["executed_more_than_once"] == []
    assert result["handoff_seconds"]["count"] == 18
    for key in ("makespan_seconds", "handoff_seconds", "submission_latency_seconds"):
        assert key in result
