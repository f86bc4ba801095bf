"""Run the dispatcher: `python manage.py comfy_dispatcher [-v 0|1|2]`."""

import asyncio
import logging

from django.core.management.base import BaseCommand

from comfyproxy.dispatcher import Dispatcher
from comfyproxy.snapshots import SnapshotProcess

LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO}


class Command(BaseCommand):
    help = (
        "Hand the class's GPU slots to queued tasks, follow each run in ComfyUI and record how it "
        "ended. Stops cleanly on SIGTERM (a second SIGTERM stops at once)."
    )

    def handle(self, *args, verbosity: int, **options):
        logging.getLogger("comfyproxy").setLevel(LOG_LEVELS.get(verbosity, logging.DEBUG))
        # Snapshots in a child process: their CPU never holds up a hand-off (see snapshots.py).
        asyncio.run(Dispatcher(snapshots=SnapshotProcess()).serve())
