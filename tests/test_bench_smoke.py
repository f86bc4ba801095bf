"""The class benchmark (bench/classroom.py) scaled down to ten students, as a smoke test.

It runs the real command against its own stack (nginx, uvicorn, dispatcher, Redis, the
emulator, a SQLite file) and checks that every phase completes without an error and that
every figure is produced. Timings on a shared test machine mean nothing, so none is checked.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_CLASS = (
    *("--students", "10", "--cap", "2", "--job-seconds", "0.2-0.5"),
    *("--memory-tasks", "30", "--gate-requests", "30", "--database", "sqlite"),
)
# Where each figure of the report lives in the JSON.
FIGURES = [
    ("class", "submissions", "latency_ms", "p50"),
    ("class", "submissions", "latency_ms", "p99"),
    ("class", "positions", "all_right_after_burst_start_s"),
    ("class", "positions", "frames_wrong"),
    ("class", "updates", "lost"),
    ("class", "run", "push_ms", "p50"),
    ("class", "run", "push_ms", "p99"),
    ("class", "run", "handoff_ms", "p50"),
    ("class", "run", "handoff_ms", "p99"),
    ("class", "run", "makespan_over_ideal"),
    ("class", "run", "seed_makespan_over_ideal"),
    ("memory", "web_peak_mb"),
    ("memory", "dispatcher_peak_mb"),
]


def figure(result: dict, path: tuple[str, ...]):
    for key in path:
        result = result[key]
    return result


def test_a_small_class_goes_through_every_phase_without_an_error(tmp_path):
    output = tmp_path / "classroom.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.classroom", *SMALL_CLASS, "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(output.read_text())

    klass = result["class"]
    assert klass["submissions"]["count"] == 10
    assert klass["submissions"]["errors"] == 0, klass["submissions"]["error_examples"]
    assert klass["tasks_not_completed"] == 0
    assert klass["all_finished_in_time"]
    assert klass["sockets_dropped"] == 0
    assert klass["comfyui_saw"]["max_running"] <= 2
    assert klass["comfyui_saw"]["submitted_twice"] == klass["comfyui_saw"]["executed_twice"] == 0
    assert result["memory"]["submission_errors"] == 0, result["memory"]["error_examples"]
    assert result["memory"]["all_cancelled_shown"]

    missing = [".".join(path) for path in FIGURES if figure(result, path) is None]
    assert missing == []
    gate = result["gate"]["files"]
    assert {entry["upstream"] for entry in gate} == {"the emulator", "a static nginx"}
    assert all(entry["gated_over_plain"] > 0 and entry["gated_over_direct"] > 0 for entry in gate)
    # The printed table names every figure beside its goal.
    for label in ("class burst", "position push", "hand-off", "makespan / ideal", "gate:", "memory"):
        assert label in run.stdout
