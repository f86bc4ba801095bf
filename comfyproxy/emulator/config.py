"""The emulator's options, shared by `python -m comfyproxy.emulator` and `manage.py comfy_emulator`."""

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path


class FaultMode(enum.StrEnum):
    """How a port misbehaves; described in the package docstring (`comfyproxy/emulator/__init__.py`)."""

    NORMAL = "normal"
    FAIL = "fail"
    HANG = "hang"
    REFUSE = "refuse"
    DIE = "die"


@dataclass(frozen=True)
class EmulatorConfig:
    ports: tuple[int, ...]
    host: str = "127.0.0.1"
    # None: per-node timing model; a number: every workflow takes that long, spread over its nodes.
    job_seconds: float | None = None
    # None: a temporary directory, removed on exit.
    output_dir: Path | None = None
    startup_seconds: float = 0.0
    initial_faults: dict[int, FaultMode] = field(default_factory=dict)


def parse_port_spec(spec: str) -> tuple[int, ...]:
    """`"8189-8198"` or `"8189,8191,8200-8202"` → the ports in the order given, without repeats."""
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a port or port range: {part!r}") from None
        if not 0 < low <= high <= 65535:
            raise argparse.ArgumentTypeError(f"bad port range: {part!r}")
        ports.extend(port for port in range(low, high + 1) if port not in ports)
    if not ports:
        raise argparse.ArgumentTypeError("no ports given")
    return tuple(ports)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ports",
        type=parse_port_spec,
        required=True,
        help="ports to serve, one ComfyUI instance each: 8189-8198 or 8189,8191,8200-8202",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=None,
        help="every workflow takes this long, spread over its nodes (default: a per-node timing model)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where instances keep output/temp/input/user files, one subdirectory per port "
        "(default: a temporary directory)",
    )
    parser.add_argument(
        "--startup-seconds",
        type=float,
        default=0.0,
        help="delay before a port starts listening, as ComfyUI takes a while to start (default 0)",
    )
    for mode in (FaultMode.FAIL, FaultMode.HANG, FaultMode.REFUSE):
        parser.add_argument(
            f"--{mode}-ports",
            type=parse_port_spec,
            default=(),
            help=f"ports that start in fault mode {mode.value!r}",
        )


def config_from_options(options: dict) -> EmulatorConfig:
    """Build the config from parsed options (argparse namespace vars or Django's options dict)."""
    ports = options["ports"]
    faults: dict[int, FaultMode] = {}
    for mode in (FaultMode.FAIL, FaultMode.HANG, FaultMode.REFUSE):
        for port in options.get(f"{mode}_ports") or ():
            if port not in ports:
                raise ValueError(f"--{mode}-ports: {port} is not among --ports")
            faults[port] = mode
    return EmulatorConfig(
        ports=ports,
        host=options.get("host") or "127.0.0.1",
        job_seconds=options.get("job_seconds"),
        output_dir=options.get("output_dir"),
        startup_seconds=options.get("startup_seconds") or 0.0,
        initial_faults=faults,
    )
