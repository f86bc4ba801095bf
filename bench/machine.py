"""What a result needs to be compared with one from another machine, or another day.

Cloud VMs of the same kind differ in speed from one boot to the next (this project's
figures moved by half between two VMs); a fixed pure-Python loop, timed just before the
run, says how fast this one was.
"""

import statistics
import time

PROBE_ITERATIONS = 2_000_000


def python_speed_ms() -> float:
    """Median milliseconds of three runs of a fixed pure-Python loop: lower is a faster machine."""
    durations = []
    for _run in range(3):
        started = time.perf_counter()
        total = 0
        for number in range(PROBE_ITERATIONS):
            total += number
        durations.append(time.perf_counter() - started)
    return round(statistics.median(durations) * 1000, 1)
