"""Counters for tests, over all ports of the process (GET /emulator/stats, POST /emulator/reset)."""

from collections import Counter


class EmulatorStats:
    def __init__(self):
        # port -> prompt_id of the prompt executing there, from execution start to task_done.
        self.running: dict[int, str] = {}
        self.reset()

    def reset(self) -> None:
        """Clear the counters; what runs now still counts as running."""
        self.submissions: Counter[str] = Counter()
        self.executions: Counter[str] = Counter()
        self.max_running_seen = len(self.running)

    def submitted(self, prompt_id: str) -> None:
        self.submissions[prompt_id] += 1

    def started(self, port: int, prompt_id: str) -> None:
        self.running[port] = prompt_id
        self.executions[prompt_id] += 1
        self.max_running_seen = max(self.max_running_seen, len(self.running))

    def finished(self, port: int) -> None:
        self.running.pop(port, None)

    def snapshot(self, ports: dict[int, dict]) -> dict:
        return {
            "max_running_seen": self.max_running_seen,
            "running": len(self.running),
            "submissions": dict(self.submissions),
            "executions": dict(self.executions),
            "ports": {str(port): details for port, details in ports.items()},
        }
