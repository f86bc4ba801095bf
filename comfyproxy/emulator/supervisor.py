"""The emulator process: one ComfyUI instance per port, fault injection, stats, start-up and shutdown."""

import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from .catalog import NodeCatalog
from .config import EmulatorConfig, FaultMode
from .files import InstanceFiles
from .instance import ComfyInstance
from .server import Handler, create_app
from .stats import EmulatorStats

logger = logging.getLogger(__name__)

_CONTROL_PREFIX = "/emulator/"


class PortSlot:
    """One port: its fault mode and, while it is alive, its instance, application runner and listener."""

    def __init__(self, port: int):
        self.port = port
        self.mode = FaultMode.NORMAL
        self.instance: ComfyInstance | None = None
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        # Requests waiting in `hang` mode (tests wait for one to be held before they release it).
        self.held_requests = 0
        self._mode_changed = asyncio.Event()

    def set_mode(self, mode: FaultMode) -> None:
        self.mode = mode
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    async def wait_while_hanging(self) -> None:
        if self.mode is not FaultMode.HANG:
            return
        self.held_requests += 1
        try:
            while self.mode is FaultMode.HANG:
                await self._mode_changed.wait()
        finally:
            self.held_requests -= 1

    def details(self) -> dict:
        details = {"mode": self.mode.value, "held_requests": self.held_requests}
        if self.instance is None:
            return {**details, "running": None, "pending": 0, "history": 0}
        running, pending = self.instance.queue.queue_snapshot()
        return {
            **details,
            "running": running[0].prompt_id if running else None,
            "pending": len(pending),
            "history": len(self.instance.queue.history),
        }


class Emulator:
    def __init__(self, config: EmulatorConfig, root: Path):
        self.config = config
        self.root = root
        self.catalog = NodeCatalog.load()
        self.stats = EmulatorStats()
        self.slots = {port: PortSlot(port) for port in config.ports}
        self._transitions = asyncio.Lock()

    async def start(self) -> None:
        if self.config.startup_seconds > 0:
            await asyncio.sleep(self.config.startup_seconds)
        for port, slot in self.slots.items():
            mode = self.config.initial_faults.get(port, FaultMode.NORMAL)
            await self._bring_up(slot, listen=mode is not FaultMode.REFUSE)
            slot.set_mode(mode)
        _announce(f"ComfyUI emulator ready: {len(self.slots)} port(s), pid {os.getpid()}")

    async def stop(self) -> None:
        for slot in self.slots.values():
            await self._kill(slot)

    async def set_fault(self, port: int, mode: FaultMode) -> None:
        """Put a port in a fault mode; returns once the port behaves accordingly."""
        async with self._transitions:
            slot = self.slots[port]
            previous = slot.mode
            if mode is previous:
                return
            logger.info("port %s: fault mode %s -> %s", port, previous.value, mode.value)
            if mode is FaultMode.DIE:
                await self._kill(slot)
            elif previous is FaultMode.DIE:
                # A restarted ComfyUI: fresh state, slow start, same files on disk.
                if self.config.startup_seconds > 0:
                    await asyncio.sleep(self.config.startup_seconds)
                await self._bring_up(slot, listen=mode is not FaultMode.REFUSE)
            elif mode is FaultMode.REFUSE:
                await self._stop_listening(slot)
            elif previous is FaultMode.REFUSE:
                await self._listen(slot)
            slot.set_mode(mode)

    async def _bring_up(self, slot: PortSlot, *, listen: bool) -> None:
        files = InstanceFiles(self.root / str(slot.port))
        slot.instance = ComfyInstance(slot.port, self.catalog, files, self.stats, self.config.job_seconds)
        slot.instance.start()
        app = create_app(
            slot.instance, outer_middlewares=[self._fault_gate(slot)], extra_routes=self._control_routes()
        )
        slot.runner = web.AppRunner(app, access_log=None)
        await slot.runner.setup()
        if listen:
            await self._listen(slot)

    async def _listen(self, slot: PortSlot) -> None:
        slot.site = web.TCPSite(slot.runner, self.config.host, slot.port, reuse_address=True)
        await slot.site.start()
        _announce(f"ComfyUI emulator listening on http://{self.config.host}:{slot.port}")

    async def _stop_listening(self, slot: PortSlot) -> None:
        # Open WebSockets carry on; a request on a kept-alive connection is dropped by the fault gate.
        if slot.site is not None:
            await slot.site.stop()
            slot.site = None

    async def _kill(self, slot: PortSlot) -> None:
        """Like a killed process: the listener and every connection vanish, and all state with them."""
        if slot.runner is None:
            return
        if slot.site is not None:
            await slot.site.stop()
            slot.site = None
        slot.instance.stop()
        for connection in slot.runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()
        # No graceful runner cleanup: it would wait for the very request that asked for this death.
        slot.instance = slot.runner = None

    def _fault_gate(self, slot: PortSlot):
        @web.middleware
        async def fault_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith(_CONTROL_PREFIX):
                return await handler(request)
            instance = slot.instance
            await slot.wait_while_hanging()
            if slot.instance is not instance or slot.mode in (FaultMode.DIE, FaultMode.REFUSE):
                # The port died or stopped accepting while this request waited or sat in a
                # kept-alive connection: drop the connection without an answer.
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=503)
            if slot.mode is FaultMode.FAIL:
                return web.Response(
                    status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
                )
            return await handler(request)

        return fault_gate

    def _control_routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", _CONTROL_PREFIX + "stats", self._get_stats),
            ("POST", _CONTROL_PREFIX + "reset", self._post_reset),
            ("GET", _CONTROL_PREFIX + "faults", self._get_faults),
            ("POST", _CONTROL_PREFIX + "faults", self._post_faults),
        ]

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.stats.snapshot({port: slot.details() for port, slot in self.slots.items()})
        )

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response({})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({str(port): slot.mode.value for port, slot in self.slots.items()})

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            port, mode = int(body["port"]), FaultMode(body["mode"])
        except (ValueError, KeyError, TypeError):
            modes = ", ".join(mode.value for mode in FaultMode)
            return web.json_response(
                {"error": f'expected {{"port": int, "mode": one of {modes}}}'}, status=400
            )
        if port not in self.slots:
            return web.json_response({"error": f"port {port} is not emulated here"}, status=404)
        reply = {"port": port, "mode": mode.value}
        if mode is FaultMode.DIE and port == request.transport.get_extra_info("sockname")[1]:
            # The connection carrying this request dies with the port: answer first.
            response = web.json_response(reply)
            await response.prepare(request)
            await response.write_eof()
            await self.set_fault(port, mode)
            return response
        await self.set_fault(port, mode)
        return web.json_response(reply)


def _announce(line: str) -> None:
    # Plain stdout lines that scripts and tests wait for.
    print(line, flush=True)


async def _serve(config: EmulatorConfig, root: Path) -> None:
    emulator = Emulator(config, root)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await emulator.start()
    await stopping.wait()
    await emulator.stop()
    _announce("ComfyUI emulator stopped")


def run(config: EmulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.output_dir is not None:
        asyncio.run(_serve(config, config.output_dir.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="comfy-emulator-") as directory:
        asyncio.run(_serve(config, Path(directory)))
