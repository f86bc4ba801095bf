"""Watch students' ComfyUI instances: notice crashed ones, finish abandoned starts, stop idle ones."""

import logging
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections

from comfyproxy.services import instances

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Check every running ComfyUI instance periodically (see services.instances.check_instances)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--interval",
            type=float,
            default=settings.COMFY_HEALTH_CHECK_SECONDS,
            help="Seconds between rounds [COMFY_HEALTH_CHECK_SECONDS].",
        )
        parser.add_argument("--once", action="store_true", help="Run one round and exit.")

    def handle(self, *args, interval, once, **options):
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        logger.info("instance monitor checking every %ss", interval)
        while True:
            self.check_round()
            if once or stopping.wait(interval):
                break
            # The connection may have gone stale (or the database restarted) while asleep.
            close_old_connections()
        logger.info("instance monitor stopped")

    def check_round(self):
        try:
            report = instances.check_instances()
        except DatabaseError as error:
            # The database will be back; the next round sees everything this one missed.
            logger.warning("instance check skipped, database unavailable: %s", error)
            return
        if report.changed_anything or report.unhealthy:
            logger.info(
                "checked %d: unhealthy %s, stopped %s, idle-stopped %s, abandoned %s",
                report.checked,
                report.unhealthy,
                report.stopped,
                report.idle_stopped,
                report.abandoned,
            )
