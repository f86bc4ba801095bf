"""`python -m comfyproxy.emulator --ports 8189-8198 ...`: the emulator without Django (quick to start)."""

import argparse

from .config import add_arguments, config_from_options
from .supervisor import run


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m comfyproxy.emulator",
        description="Serve emulated ComfyUI 0.3.64 instances, one per port.",
    )
    add_arguments(parser)
    options = vars(parser.parse_args())
    try:
        config = config_from_options(options)
    except ValueError as error:
        parser.error(str(error))
    run(config)


if __name__ == "__main__":
    main()
