"""The one outbound client for ComfyUI: every call has a timeout, every failure a type.

A failure says whether trying again can help (`retryable`) and whether the request may
have reached ComfyUI anyway (`maybe_delivered`): a prompt sent into a timeout or a 500
may already be queued there (ComfyUI enqueues before some of its 500s), so
`submit_exactly_once` re-sends only after `/queue` and `/history` show that ComfyUI
does not have it.
"""

import asyncio
import enum
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 3.0
    # Reading a reply. ComfyUI validates the whole graph before answering POST /prompt.
    request: float = 15.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    first_backoff: float = 0.5  # doubled after each failed attempt


# --- Failures --------------------------------------------------------------------------


class ComfyError(Exception):
    retryable = False
    maybe_delivered = False

    def __init__(self, message: str, *, maybe_delivered: bool | None = None):
        super().__init__(message)
        if maybe_delivered is not None:
            self.maybe_delivered = maybe_delivered


class ComfyUnreachable(ComfyError):
    """No answer: the connection failed, timed out or dropped before a reply."""

    retryable = True

    def __init__(self, message: str, *, refused: bool = False, maybe_delivered: bool = False):
        super().__init__(message, maybe_delivered=maybe_delivered)
        # Nothing listens on the port any more: the ComfyUI process is gone.
        self.refused = refused


class ComfyServerError(ComfyError):
    """A 5xx reply: ComfyUI failed while handling the request."""

    retryable = True
    maybe_delivered = True

    def __init__(self, status_code: int, body: str):
        super().__init__(f"ComfyUI answered {status_code}: {body[:300]}")
        self.status_code = status_code


class ComfyRejected(ComfyError):
    """ComfyUI refused the workflow (400 with its own `error` and `node_errors`)."""

    def __init__(self, error: dict, node_errors: dict):
        super().__init__(f"ComfyUI rejected the prompt: {error.get('message', '')}")
        self.error = error
        self.node_errors = node_errors


class ComfyProtocolError(ComfyError):
    """A reply ComfyUI never sends (unexpected status or body): trying again will not help."""


def _refused(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, ConnectionRefusedError):
            return True
        error = error.__cause__ or error.__context__
    return False


# --- What ComfyUI reports ----------------------------------------------------------------


@dataclass(frozen=True)
class PromptRequest:
    """A POST /prompt body: our prompt id and the student's fields, never `number`/`front`."""

    prompt_id: str
    prompt: dict
    client_id: str = ""
    extra_data: dict = field(default_factory=dict)
    partial_execution_targets: list | None = None

    def body(self) -> dict:
        body = {"prompt_id": self.prompt_id, "prompt": self.prompt, "extra_data": self.extra_data}
        if self.client_id:
            # Selects the student's own socket for progress events and images.
            body["client_id"] = self.client_id
        if self.partial_execution_targets is not None:
            body["partial_execution_targets"] = self.partial_execution_targets
        return body


@dataclass(frozen=True)
class Accepted:
    prompt_id: str
    number: float | None
    # Outputs that failed validation while the valid ones run (a 200 can carry these).
    node_errors: dict


@dataclass(frozen=True)
class HistoryEntry:
    """A finished prompt, as `/history/<id>` reports it."""

    status_str: str
    messages: list
    outputs: dict

    @classmethod
    def parse(cls, entry) -> "HistoryEntry":
        if not isinstance(entry, dict):
            raise ComfyProtocolError("history entry is not an object")
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        messages = status.get("messages") if isinstance(status.get("messages"), list) else []
        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
        return cls(status_str=str(status.get("status_str", "")), messages=messages, outputs=outputs)

    def _message(self, kind: str) -> dict | None:
        for message in self.messages:
            if isinstance(message, list | tuple) and len(message) == 2 and message[0] == kind:
                return message[1] if isinstance(message[1], dict) else {}
        return None

    @property
    def succeeded(self) -> bool:
        return self.status_str == "success"

    @property
    def interrupted(self) -> bool:
        return self._message("execution_interrupted") is not None

    @property
    def execution_error(self) -> dict | None:
        return self._message("execution_error")


class PromptState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    UNKNOWN = "unknown"  # never arrived, deleted while pending, or lost in a restart


@dataclass(frozen=True)
class PromptLocation:
    state: PromptState
    history: HistoryEntry | None = None

    @property
    def known(self) -> bool:
        return self.state is not PromptState.UNKNOWN


@dataclass(frozen=True)
class QueueContents:
    running: frozenset[str]
    pending: frozenset[str]


def _prompt_ids(items) -> frozenset[str]:
    # Queue items are ComfyUI's raw 5-tuples: [number, prompt_id, prompt, extra_data, outputs].
    if not isinstance(items, list):
        raise ComfyProtocolError("queue list is not a list")
    return frozenset(str(item[1]) for item in items if isinstance(item, list | tuple) and len(item) >= 2)


# --- The client ----------------------------------------------------------------------------


class ComfyClient:
    """Talks to any number of ComfyUI instances (each call names the instance's base URL).

    Each instance gets a small connection pool of its own: httpx scans every pooled
    connection on each request, which with one shared pool across a class of instances
    costs more CPU than the requests themselves. The pools share one TLS context, as
    building one reads the system's CA bundle (a third of a second each).
    """

    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
    ):
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._transport_factory = transport_factory or self._http_transports()
        self._pools: dict[str, httpx.AsyncClient] = {}

    @staticmethod
    def _http_transports() -> Callable[[], httpx.AsyncHTTPTransport]:
        tls_context = ssl.create_default_context()  # now, not in the middle of a hand-off

        def make() -> httpx.AsyncHTTPTransport:
            return httpx.AsyncHTTPTransport(
                verify=tls_context,
                limits=httpx.Limits(max_connections=8, max_keepalive_connections=2),
                # Never through a proxy from the environment: instances are on the GPU host.
                trust_env=False,
            )

        return make

    def _pool(self, base_url: str) -> httpx.AsyncClient:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = httpx.AsyncClient(
                transport=self._transport_factory(),
                timeout=httpx.Timeout(self.timeouts.request, connect=self.timeouts.connect),
                trust_env=False,
                follow_redirects=False,
            )
        return pool

    @staticmethod
    async def warm_up() -> None:
        """Make one request to a throwaway local server, so that the first request to ComfyUI
        does not load the HTTP stack (httpcore, h11, anyio's backend: some 75 modules, tens of
        milliseconds in the middle of the first hand-off after a start)."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(), trust_env=False) as client:
                await client.get(f"http://127.0.0.1:{port}/", timeout=5)
        except httpx.HTTPError as error:
            logger.debug("warm-up request failed: %r", error)  # only slower, never wrong
        finally:
            server.close()
            await server.wait_closed()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    async def _request(self, base_url: str, method: str, path: str, *, json_body=None) -> httpx.Response:
        url = base_url + path
        try:
            response = await self._pool(base_url).request(method, url, json=json_body)
        except httpx.ConnectTimeout as error:
            raise ComfyUnreachable(f"{method} {url}: connect timed out") from error
        except httpx.ConnectError as error:
            raise ComfyUnreachable(f"{method} {url}: {error}", refused=_refused(error)) from error
        except httpx.TimeoutException as error:
            raise ComfyUnreachable(f"{method} {url}: no reply in time", maybe_delivered=True) from error
        except httpx.TransportError as error:
            raise ComfyUnreachable(f"{method} {url}: {error!r}", maybe_delivered=True) from error
        if response.status_code >= 500:
            raise ComfyServerError(response.status_code, response.text)
        return response

    @staticmethod
    def _json(response: httpx.Response):
        try:
            return response.json()
        except ValueError:
            raise ComfyProtocolError(
                f"{response.request.url} answered {response.status_code} without JSON"
            ) from None

    @staticmethod
    def _expect_ok(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise ComfyProtocolError(f"{response.request.url} answered {response.status_code}")

    # --- Submitting ---------------------------------------------------------------------

    async def submit_prompt(self, base_url: str, request: PromptRequest) -> Accepted:
        """One POST /prompt. Prefer `submit_exactly_once`, which retries safely."""
        response = await self._request(base_url, "POST", "/prompt", json_body=request.body())
        if response.status_code == 400:
            body = self._json(response)
            error = body.get("error") if isinstance(body, dict) else None
            if not isinstance(error, dict):
                raise ComfyProtocolError(f"400 without ComfyUI's error object: {response.text[:300]}")
            node_errors = body.get("node_errors")
            raise ComfyRejected(error, node_errors if isinstance(node_errors, dict) else {})
        self._expect_ok(response)
        body = self._json(response)
        if not isinstance(body, dict) or str(body.get("prompt_id")) != request.prompt_id:
            raise ComfyProtocolError(f"POST /prompt did not echo our prompt id: {response.text[:300]}")
        number = body.get("number")
        node_errors = body.get("node_errors")
        return Accepted(
            prompt_id=request.prompt_id,
            number=float(number) if isinstance(number, int | float) else None,
            node_errors=node_errors if isinstance(node_errors, dict) else {},
        )

    async def submit_exactly_once(
        self,
        base_url: str,
        request: PromptRequest,
        *,
        before_send: Callable[[], None] | None = None,
    ) -> Accepted | PromptLocation:
        """Submit, retrying a failed attempt only when ComfyUI provably does not have the prompt.

        Returns ComfyUI's acceptance, or where the prompt was found when an attempt that
        looked failed had in fact arrived. `before_send` runs before every POST (the
        dispatcher checks its lease there). Raises the last error once the attempts are
        spent; its `maybe_delivered` tells whether the prompt may still be in ComfyUI.
        """
        uncertain = False  # an earlier attempt may have reached ComfyUI
        last_error: ComfyError | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.first_backoff * 2 ** (attempt - 1))
            if uncertain:
                try:
                    location = await self.locate(base_url, request.prompt_id)
                except ComfyError as error:
                    logger.info("prompt %s: cannot check whether it arrived: %s", request.prompt_id, error)
                    last_error = ComfyUnreachable(str(error), maybe_delivered=True)
                    continue
                if location.known:
                    return location
                uncertain = False
            if before_send is not None:
                before_send()
            try:
                return await self.submit_prompt(base_url, request)
            except ComfyError as error:
                if not error.retryable:
                    raise
                logger.info("prompt %s: attempt %d failed: %s", request.prompt_id, attempt + 1, error)
                last_error = error
                uncertain = error.maybe_delivered
        assert last_error is not None
        if uncertain:
            last_error.maybe_delivered = True
        raise last_error

    # --- Following a prompt -----------------------------------------------------------------

    async def history(self, base_url: str, prompt_id: str) -> HistoryEntry | None:
        """The prompt's history entry once it has finished; None before (ComfyUI answers `{}`)."""
        response = await self._request(base_url, "GET", f"/history/{prompt_id}")
        self._expect_ok(response)
        body = self._json(response)
        if not isinstance(body, dict):
            raise ComfyProtocolError("history is not an object")
        entry = body.get(prompt_id)
        return None if entry is None else HistoryEntry.parse(entry)

    async def queue(self, base_url: str) -> QueueContents:
        response = await self._request(base_url, "GET", "/queue")
        self._expect_ok(response)
        body = self._json(response)
        if not isinstance(body, dict):
            raise ComfyProtocolError("queue is not an object")
        return QueueContents(
            running=_prompt_ids(body.get("queue_running", [])),
            pending=_prompt_ids(body.get("queue_pending", [])),
        )

    async def locate(self, base_url: str, prompt_id: str) -> PromptLocation:
        """Where the prompt is now. /queue is read before /history: ComfyUI writes the history
        entry before it drops the prompt from the queue, so a prompt in neither never arrived
        (or was deleted, or lost in a restart)."""
        contents = await self.queue(base_url)
        if prompt_id in contents.running:
            return PromptLocation(PromptState.RUNNING)
        if prompt_id in contents.pending:
            return PromptLocation(PromptState.PENDING)
        entry = await self.history(base_url, prompt_id)
        if entry is not None:
            return PromptLocation(PromptState.FINISHED, entry)
        return PromptLocation(PromptState.UNKNOWN)

    # --- Stopping and cleaning up ---------------------------------------------------------------

    async def interrupt(self, base_url: str, prompt_id: str) -> None:
        """Interrupt this prompt if it is running (ComfyUI ignores the id otherwise)."""
        response = await self._request(base_url, "POST", "/interrupt", json_body={"prompt_id": prompt_id})
        self._expect_ok(response)

    async def delete_pending(self, base_url: str, prompt_id: str) -> None:
        """Drop the prompt if it is still waiting inside ComfyUI (a running one is left alone)."""
        response = await self._request(base_url, "POST", "/queue", json_body={"delete": [prompt_id]})
        self._expect_ok(response)

    async def free_memory(self, base_url: str) -> None:
        response = await self._request(
            base_url, "POST", "/free", json_body={"unload_models": True, "free_memory": True}
        )
        self._expect_ok(response)
