"""Who may reach what, through the real nginx (tests/nginx_fixtures.py): every combination of
person, instance, port, HTTP or WebSocket, origin and spelling of the path, each allowed or
refused as the project's security model says (nginx/README.md):

- A student reaches only /comfyui/<own username>/<own running port>/; a teacher any student's.
  The port must be that instance's, inside the range: nothing else is ever connected to.
- Only the `comfy_access` cookie issued (through the practice page's entry) for exactly that
  path counts there; the teaching session never does, nor do identity headers a client adds.
- Requests that can change something (POST, WebSocket) must come from the ComfyUI origin
  (submissions: from the same site); any other Origin is refused.
- Every spelling of the submit path reaches the queue, never ComfyUI; dot segments are refused.
- A revoked session loses access within the gate's cache time.

Each case states who asks, for what, and the outcome those rules give; the oracle below derives
it from the rules, not from nginx's configuration. "Allowed" is proven by the
request arriving at that instance's upstream (an echo server that records it) or by the
queue's answer; "refused" by nothing arriving anywhere and the refusal's code. The count of
cases tried and failed goes to test-artifacts/access-matrix.json.
"""

import http.client
import itertools
import json
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from comfyproxy import gateway
from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import control
from tests.nginx_fixtures import GATE_CACHE_SECONDS, EchoUpstream
from tests.processes import wait_until

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "access-matrix.json"
CASE_HEADER = "X-Matrix-Case"
EVIL_ORIGIN = "http://evil.example"
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
# What a client might add to pass for someone (nginx sets its own X-Comfy-* for the gate).
SPOOFED_HEADERS = {
    "X-Comfy-User": "alice",
    "X-Comfy-Unsafe": "",
    "X-Comfy-Refusal": "",
    "X-Forwarded-User": "alice",
    "X-Remote-User": "alice",
    "Remote-User": "alice",
}
# The ComfyUI frontend's two spellings and what a browser or a script could make of them.
SUBMIT_SPELLINGS = [
    "prompt",
    "api/prompt",
    "api/prompt/",
    "/api//prompt",
    "API/prompt",
    "api/Prompt",
    "api/%70rompt",
    "PROMPT",
]
REFUSAL_STATUS = {
    "not_authenticated": 401,
    "cross_site_request": 403,
    "forbidden": 403,
    "instance_not_running": 409,
    "user_not_found": 404,
}

_results: dict = {"groups": {}, "failures": [], "revocation": {}}


# --- The class the matrix is about ------------------------------------------------------------


@dataclass(frozen=True)
class Cookie:
    """A comfy_access cookie and what it was issued for."""

    value: str
    username: str
    port: str

    @property
    def path(self) -> str:
        return gateway.instance_path(self.username, int(self.port))


@dataclass
class Person:
    name: str
    session: str = ""
    is_staff: bool = False
    cookies: list[Cookie] = field(default_factory=list)

    @property
    def primary(self) -> Cookie | None:
        return self.cookies[0] if self.cookies else None


@dataclass
class World:
    gateway: object
    people: dict[str, Person]
    running: set[tuple[str, str]]  # (username, port) of running instances
    ports: dict[str, str]  # name -> port text
    echoes: dict[str, EchoUpstream]  # port text -> upstream that records what reached it
    students: set[str]

    @property
    def comfy_origin(self) -> str:
        return self.gateway.comfy_origin

    @property
    def site_origin(self) -> str:
        return self.gateway.site_origin

    def in_range(self, port_text: str) -> bool:
        first, last = self.gateway.port_range
        return port_text.isdigit() and not port_text.startswith("0") and first <= int(port_text) <= last


# --- Cases and what the rules say of them ------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who asks, and which comfy_access they send: "browser" sends the cookie whose path matches
    (as browsers do), "forged" sends their own instance's cookie to any path (as a script can)."""

    person: str
    cookie_mode: str = "none"
    spoofed: bool = False

    def label(self) -> str:
        return f"{self.person}/{self.cookie_mode}" + ("/spoofed" if self.spoofed else "")


@dataclass(frozen=True)
class Expect:
    allowed: bool
    statuses: frozenset[int]
    codes: frozenset[str] = frozenset()  # a refusal's code, one of these (empty: no code, nginx's own)
    reaches: str | None = None  # the instance port an allowed request arrives at
    queued_for: str | None = None  # the student an allowed submission is queued for
    by_nginx: bool = False  # refused by nginx itself, before it asks Django or connects anywhere

    @classmethod
    def refused(cls, *reasons: str) -> "Expect":
        """Refused for one of these reasons (when several apply, whichever is checked first)."""
        return cls(False, frozenset(REFUSAL_STATUS[reason] for reason in reasons), frozenset(reasons))

    @classmethod
    def nginx_refuses(cls, status: int) -> "Expect":
        return cls(False, frozenset({status}), by_nginx=True)


@dataclass(frozen=True)
class Case:
    group: str
    actor: Actor
    method: str
    path: str
    origin: str | None
    expect: Expect
    websocket: bool = False
    accept_html: bool = False
    task_id: str | None = None  # queue-cancel: the task it tries to take back

    def describe(self) -> str:
        origin = self.origin or "no Origin"
        kind = "WebSocket" if self.websocket else self.method
        return f"{self.actor.label()} {kind} {self.path} ({origin})"


def cookie_sent(world: World, actor: Actor, raw_path: str) -> Cookie | None:
    person = world.people[actor.person]
    if actor.cookie_mode == "browser":
        return next((cookie for cookie in person.cookies if raw_path.startswith(cookie.path)), None)
    if actor.cookie_mode == "forged":
        return person.primary
    return None


def admitted(world: World, actor: Actor, raw_path: str, username: str, port: str) -> bool:
    """Does the cookie sent name exactly this instance path? (It is only ever issued to its
    student or a teacher, through the practice page's entry.)"""
    cookie = cookie_sent(world, actor, raw_path)
    return cookie is not None and (cookie.username, cookie.port) == (username, port)


_RAW_INSTANCE = re.compile(r"^/comfyui/(?P<user>[^/?]+)/(?P<port>[0-9]{1,5})(?P<rest>/[^?]*)?(?:\?.*)?$")
_DOT_SEGMENT = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)


def expect_comfyui(world: World, actor: Actor, raw_path: str, *, unsafe: bool, origin: str | None) -> Expect:
    """A request for a student's ComfyUI itself (not the queue's own endpoints)."""
    if "%00" in raw_path:
        return Expect.nginx_refuses(400)  # nginx takes no NUL in a path
    parts = _RAW_INSTANCE.match(raw_path)
    if parts is None or not world.in_range(parts["port"]):
        return Expect.nginx_refuses(404)  # no such instance address: nothing is connected to
    if _DOT_SEGMENT.search(parts["rest"] or ""):
        return Expect.nginx_refuses(400)
    username, port = unquote(parts["user"]), parts["port"]
    reasons = set()
    if not admitted(world, actor, raw_path, username, port):
        reasons.add("not_authenticated")
    if unsafe and origin not in (None, world.comfy_origin):
        reasons.add("cross_site_request")
    if not reasons and (username, port) not in world.running:
        reasons.add("instance_not_running")
    if reasons:
        return Expect.refused(*reasons)
    return Expect(True, frozenset({200}), reaches=port)


def expect_submit(world: World, actor: Actor, username: str, port: str, origin: str | None) -> Expect:
    """POST .../prompt in any spelling: the queue answers, ComfyUI never sees it."""
    if len(port) > 5:
        return Expect(False, frozenset({404}))  # Django reads at most five digits: no such address
    raw_prefix = f"/comfyui/{quote(username, safe='@+')}/{port}/"
    reasons = set()
    if origin not in (None, world.comfy_origin, world.site_origin):
        reasons.add("cross_site_request")
    if not admitted(world, actor, raw_prefix, username, port):
        reasons.add("not_authenticated")
    if not reasons and (username, port) not in world.running:
        reasons.add("instance_not_running")
    if reasons:
        return Expect.refused(*reasons)
    return Expect(True, frozenset({200}), queued_for=username)


# The targets: (whose name is in the path, which port).
def targets(world: World) -> list[tuple[str, str]]:
    a, b = world.ports["alice"], world.ports["bob"]
    first, last = world.gateway.port_range
    # SSH, PostgreSQL, Redis, the app's own ports, the range's neighbours, a zero-padded own port.
    outside = ["22", "5432", "6379", str(world.gateway.django_port)]
    outside += [str(urlsplit(origin).port) for origin in (world.site_origin, world.comfy_origin)]
    outside += [str(last + 1), str(first - 1), "0" + a]
    return [("alice", a), ("bob", b), ("alice", b), ("alice", world.ports["free"]), ("nobody", a)] + [
        ("alice", port) for port in outside
    ]


def actors(*, spoofing: bool) -> list[Actor]:
    people = [Actor("anonymous")] + [
        Actor(person, mode) for person in ("alice", "bob", "teacher") for mode in ("browser", "forged")
    ]
    if spoofing:
        people += [Actor("anonymous", spoofed=True), Actor("bob", "browser", spoofed=True)]
    return people


def origins(world: World) -> list[str | None]:
    return [None, world.comfy_origin, world.site_origin, EVIL_ORIGIN]


def comfyui_cases(world: World) -> list[Case]:
    """Pages, API calls, changes and ComfyUI's own WebSocket, for every person, target and origin."""
    kinds = [
        ("GET", "", False, True),  # the page itself
        ("GET", "api/queue", False, False),
        ("GET", "api/prompt", False, False),  # reading the queue counter is ComfyUI's, not a submission
        ("POST", "api/settings/Comfy.Matrix", False, False),
        ("GET", "ws?clientId=matrix", True, False),
        ("GET", "api/ws", True, False),
    ]
    cases = []
    for actor, (username, port), origin, (method, rest, websocket, html) in itertools.product(
        actors(spoofing=True), targets(world), origins(world), kinds
    ):
        path = f"/comfyui/{username}/{port}/{rest}"
        unsafe = method != "GET" or websocket
        expect = expect_comfyui(world, actor, path, unsafe=unsafe, origin=origin)
        cases.append(
            Case("comfyui", actor, method, path, origin, expect, websocket=websocket, accept_html=html)
        )
    return cases


def submit_cases(world: World) -> list[Case]:
    cases = []
    for actor, (username, port), origin, spelling in itertools.product(
        actors(spoofing=True), targets(world), origins(world), SUBMIT_SPELLINGS
    ):
        expect = expect_submit(world, actor, username, port, origin)
        cases.append(Case("submit", actor, "POST", f"/comfyui/{username}/{port}/{spelling}", origin, expect))
    return cases


def queue_endpoint_cases(world: World, new_task) -> list[Case]:
    """The injected script's status and cancel endpoints on the ComfyUI origin (Django's own)."""
    cases = []
    for actor, (username, port), origin in itertools.product(
        actors(spoofing=True), targets(world), origins(world)
    ):
        base = f"/comfyui/{username}/{port}/"
        in_path = admitted(world, actor, base, username, port)
        status_expect = Expect(True, frozenset({200})) if in_path else Expect.refused("not_authenticated")
        cases.append(Case("queue-status", actor, "GET", base + "queue-status/", origin, status_expect))
        reasons = set()
        if origin not in (None, world.comfy_origin):
            reasons.add("cross_site_request")
        if not in_path:
            reasons.add("not_authenticated")
        owner = username if username in world.students else "alice"
        task_id = new_task(owner)
        cancel_expect = Expect.refused(*reasons) if reasons else Expect(True, frozenset({200}))
        cases.append(
            Case(
                "queue-cancel",
                actor,
                "POST",
                f"{base}queue-cancel/{task_id}/",
                origin,
                cancel_expect,
                task_id=task_id,
            )
        )
    return cases


def queue_socket_cases(world: World) -> list[Case]:
    """The injected script's socket: the instance's access, from the ComfyUI origin only."""
    cases = []
    for actor, (username, port), origin in itertools.product(
        actors(spoofing=False), targets(world), origins(world)
    ):
        base = f"/comfyui/{username}/{port}/"
        allowed = (
            origin == world.comfy_origin
            and admitted(world, actor, base, username, port)
            and world.in_range(port)
        )
        # Channels refuses a handshake with a bare 403, whatever the reason.
        expect = Expect(True, frozenset({101})) if allowed else Expect(False, frozenset({403}))
        cases.append(Case("queue-socket", actor, "GET", base + "queue-ws/", origin, expect, websocket=True))
    return cases


def path_trick_cases(world: World) -> list[Case]:
    """Spellings that try to reach another instance, or slip past the gate or the queue."""
    a, b = world.ports["alice"], world.ports["bob"]
    tricks = [
        f"/comfyui/alice/{a}/x/../api/queue",
        f"/comfyui/alice/{a}/x/%2e%2e/api/queue",
        f"/comfyui/alice/{a}/x/%2E%2E/api/queue",
        f"/comfyui/alice/{a}/./api/queue",
        f"/comfyui/alice/{a}/../../bob/{b}/api/queue",
        f"/comfyui/alice/{a}/%2e%2e/%2e%2e/bob/{b}/api/queue",
        f"/comfyui/alice/{a}/%2e%2e%2f%2e%2e%2fbob/{b}/api/queue",
        f"/comfyui/bob/{b}/..%2F..%2Falice/{a}/api/queue",
        f"/comfyui/alice%2F..%2Fbob/{b}/api/queue",
        f"/comfyui/%61lice/{a}/api/queue",
        f"/comfyui/ALICE/{a}/api/queue",
        f"/comfyui/alice/{a}//api/queue",
        f"/comfyui/alice/{a}/api/userdata/workflows%2Fmatrix.json",
        f"/comfyui/alice/{a}/api/queue?x=/../../bob/{b}/",
        f"//comfyui/alice/{a}/api/queue",
        f"/comfyui//alice/{a}/api/queue",
        f"/comfyui/alice//{a}/api/queue",
        f"/comfyui/alice/0{a}/api/queue",
        f"/comfyui/alice/{a}%2Fapi/queue",
        f"/comfyui/alice/{a}%00/api/queue",
    ]
    cases = []
    for actor, path, origin in itertools.product(actors(spoofing=True), tricks, [None, world.comfy_origin]):
        expect = expect_comfyui(world, actor, path, unsafe=False, origin=origin)
        cases.append(Case("path-trick", actor, "GET", path, origin, expect))
    return cases


def site_cases(world: World) -> list[Case]:
    """On the teaching site: the way into a ComfyUI, and the queue socket, by the session."""
    cases = []
    for person, (username, port) in itertools.product(
        ("anonymous", "alice", "bob", "teacher"), targets(world)
    ):
        actor = Actor(person)
        if person == "anonymous":
            expect = Expect(False, frozenset({302}), frozenset({"login"}))
        elif username not in world.students:
            expect = Expect.refused("user_not_found")
        elif person != username and not world.people[person].is_staff:
            expect = Expect.refused("forbidden")
        elif (username, str(int(port))) not in world.running:
            expect = Expect.refused("instance_not_running")
        else:
            expect = Expect(True, frozenset({302}))
        cases.append(
            Case(
                "site-open", actor, "GET", f"/comfyui-open/{username}/{port}/", None, expect, accept_html=True
            )
        )
    for person, origin in itertools.product(("anonymous", "alice", "bob", "teacher"), origins(world)):
        allowed = person != "anonymous" and origin == world.site_origin
        expect = Expect(True, frozenset({101})) if allowed else Expect(False, frozenset({403}))
        cases.append(
            Case(
                "site-socket", Actor(person), "GET", "/ws/comfy_proxy/queue/", origin, expect, websocket=True
            )
        )
    return cases


# --- Asking, and judging the answer ----------------------------------------------------------------


@dataclass
class Answer:
    status: int
    code: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    frame: dict | None = None


def _code_of(status: int, headers: dict, body: bytes) -> str:
    content_type = headers.get("content-type", "")
    if "json" in content_type:
        data = json.loads(body)
        if isinstance(data.get("error"), dict):
            return str(data["error"]["type"])  # ComfyUI's error shape
        return str(data.get("code", ""))
    if "html" in content_type and b'data-code="' in body:
        return body.split(b'data-code="', 1)[1].split(b'"', 1)[0].decode()
    if status == 302 and headers.get("location", "").startswith(settings.LOGIN_URL):
        return "login"
    return ""


def headers_for(world: World, case: Case, case_id: str) -> dict:
    person = world.people[case.actor.person]
    cookies = {}
    if person.session:
        # Browsers send a host's cookies to every port of it: the teaching session comes along.
        cookies[settings.SESSION_COOKIE_NAME] = person.session
    if case.group in ("site-open", "site-socket"):
        host_origin = world.site_origin
    else:
        host_origin = world.comfy_origin
        cookie = cookie_sent(world, case.actor, case.path)
        if cookie is not None:
            cookies[gateway.ACCESS_COOKIE] = cookie.value
    headers = {
        "Host": urlsplit(host_origin).netloc,
        CASE_HEADER: case_id,
        "Accept": "text/html,application/xhtml+xml" if case.accept_html else "application/json",
    }
    if cookies:
        headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    if case.origin:
        headers["Origin"] = case.origin
    if case.actor.spoofed:
        headers.update(SPOOFED_HEADERS)
        headers["X-Comfy-Access"] = world.people["alice"].primary.value
        headers["X-Comfy-Port"] = world.ports["alice"]
        headers["X-Comfy-Origin"] = world.comfy_origin
    return headers


def ask(world: World, case: Case, case_id: str) -> Answer:
    headers = headers_for(world, case, case_id)
    origin = world.site_origin if case.group in ("site-open", "site-socket") else world.comfy_origin
    netloc = urlsplit(origin).netloc
    if case.websocket and case.group in ("queue-socket", "site-socket"):
        return _handshake(f"ws://{netloc}{case.path}", headers)
    if case.websocket:
        # ComfyUI's socket behind the gate, on an echo upstream: the handshake's arrival is what counts.
        headers.update(
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            }
        )
    body = None
    if case.method == "POST":
        body = json.dumps({"prompt": WORKFLOW, "client_id": "matrix"}).encode()
        headers["Content-Type"] = "application/json"
    host, port = netloc.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        # http.client sends the path exactly as given (dot segments and all), as a raw client would.
        connection.request(case.method, case.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        response_headers = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    return Answer(response.status, _code_of(response.status, response_headers, data), response_headers, data)


def _handshake(url: str, headers: dict) -> Answer:
    origin = headers.pop("Origin", None)
    headers.pop("Host", None)
    try:
        with connect(url, origin=origin, additional_headers=headers, open_timeout=15) as socket:
            return Answer(101, frame=json.loads(socket.recv(timeout=15)))
    except InvalidStatus as refused:
        return Answer(refused.response.status_code)


def judge(world: World, case: Case, answer: Answer, reached: list[str]) -> str | None:
    """Why this answer breaks the rules, or None."""
    expect = case.expect
    if answer.status >= 500:
        return f"server error {answer.status}"
    if "access-control-allow-origin" in answer.headers:
        return "answered with CORS permission"
    if answer.status not in expect.statuses:
        return f"status {answer.status} ({answer.code or 'no code'}), expected {sorted(expect.statuses)}"
    if reached != ([expect.reaches] if expect.reaches else []):
        return f"arrived at {reached or 'no upstream'}, expected {expect.reaches or 'none'}"
    if not expect.allowed:
        if expect.codes and answer.code not in expect.codes:
            return f"refused with {answer.code or 'no code'}, expected one of {sorted(expect.codes)}"
        if expect.by_nginx and "x-content-type-options" in answer.headers:
            return "refused by Django, expected nginx itself to refuse before asking anyone"
        if case.task_id and Task.objects.get(pk=case.task_id).status != TaskStatus.QUEUED:
            return "a refused cancel changed the task"
        return None
    if expect.queued_for:
        task = Task.objects.filter(pk=json.loads(answer.body)["prompt_id"]).select_related("owner").first()
        if task is None or task.owner.username != expect.queued_for:
            return f"not queued for {expect.queued_for}"
    if case.task_id and Task.objects.get(pk=case.task_id).status != TaskStatus.CANCELLED:
        return "an allowed cancel did not cancel"
    if case.group in ("queue-status", "queue-socket"):
        frame = answer.frame if case.websocket else json.loads(answer.body)
        shown = [task["task_id"] for task in frame["tasks"]]
        owner = unquote(case.path.split("/")[2])
        if Task.objects.filter(pk__in=shown).exclude(owner__username=owner).exists():
            return "showed someone else's tasks"
    if case.group == "site-open" and not answer.headers["location"].startswith(
        world.comfy_origin + "/comfyui-enter/"
    ):
        return f"redirected to {answer.headers['location']}, not to the ComfyUI origin's entry"
    return None


def run_cases(world: World, cases: list[Case]) -> list[str]:
    def run(numbered):
        number, case = numbered
        case_id = f"{number}-{uuid.uuid4().hex[:8]}"
        answer = ask(world, case, case_id)
        reached = [
            port
            for port, echo in world.echoes.items()
            if any(
                {name.lower(): value for name, value in seen["headers"]}.get(CASE_HEADER.lower()) == case_id
                for seen in list(echo.requests)
            )
        ]
        return case, answer, reached

    failures = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        answered = list(pool.map(run, enumerate(cases)))
    for case, answer, reached in answered:
        problem = judge(world, case, answer, reached)
        group = _results["groups"].setdefault(case.group, {"cases": 0, "failed": 0})
        group["cases"] += 1
        if problem:
            group["failed"] += 1
            failures.append(f"{case.describe()}: {problem}")
    _results["failures"] += failures
    return failures


# --- The class, and the tests ----------------------------------------------------------------------


@pytest.fixture
def world(nginx_gateway, make_student, register_instance, teacher, make_task):
    """alice and bob each run a "ComfyUI" that records what reaches it; carol runs the emulator."""
    echo_ports = nginx_gateway.free_ports[:2]
    echoes = {str(port): EchoUpstream(port) for port in echo_ports}
    for echo in echoes.values():
        echo.start()
    ports = {"alice": str(echo_ports[0]), "bob": str(echo_ports[1]), "free": str(nginx_gateway.free_ports[2])}
    people = {"anonymous": Person("anonymous")}
    for name in ("alice", "bob"):
        user = make_student(name)
        register_instance(user, int(ports[name]))
        people[name] = Person(name, session=nginx_gateway.login(user))
    people["teacher"] = Person("teacher", session=nginx_gateway.login(teacher), is_staff=True)
    # A practically unlimited per-student limit: every allowed submission here is queued.
    control.set_student_limit(actor=teacher, value=1000)

    def enter(person: Person, user, port: int) -> None:
        target = user.comfy_instance if person.name != user.username else port
        client = nginx_gateway.comfy_client(
            get_user_model().objects.get(username=person.name), target, session_key=person.session
        )
        person.cookies.append(Cookie(client.cookies[gateway.ACCESS_COOKIE], user.username, str(port)))

    users = {name: get_user_model().objects.get(username=name) for name in ("alice", "bob")}
    enter(people["alice"], users["alice"], int(ports["alice"]))
    enter(people["alice"], users["alice"], int(ports["bob"]))  # an entry at someone else's port
    enter(people["alice"], users["alice"], int(ports["free"]))  # and at a port nobody runs on
    enter(people["bob"], users["bob"], int(ports["bob"]))
    enter(people["teacher"], users["alice"], int(ports["alice"]))
    enter(people["teacher"], users["bob"], int(ports["bob"]))
    for name, user in users.items():
        make_task(user, port=int(ports[name]))  # something of their own for their pages to show
    yield World(
        gateway=nginx_gateway,
        people=people,
        running={("alice", ports["alice"]), ("bob", ports["bob"])},
        ports=ports,
        echoes=echoes,
        students=set(users),
    )
    for echo in echoes.values():
        echo.stop()


@pytest.fixture(scope="module", autouse=True)
def matrix_artifact(request):
    """Write the counts (and any failure) for the README once the module's tests have run."""
    yield
    groups = _results["groups"]
    summary = {
        "cases": sum(group["cases"] for group in groups.values()),
        "failed": sum(group["failed"] for group in groups.values()),
        "groups": groups,
        "revocation": _results["revocation"],
        "failures": _results["failures"][:200],
    }
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"\naccess matrix: {summary['cases']} cases, {summary['failed']} failed "
            f"({ARTIFACT.relative_to(ARTIFACT.parent.parent)})"
        )


def test_every_combination_is_allowed_or_refused_as_the_security_model_says(world, make_task):
    def new_task(username: str) -> str:
        user = get_user_model().objects.get(username=username)
        return str(make_task(user, port=int(world.ports[username])).pk)

    cases = (
        comfyui_cases(world)
        + submit_cases(world)
        + queue_endpoint_cases(world, new_task)
        + queue_socket_cases(world)
        + path_trick_cases(world)
        + site_cases(world)
    )
    failures = run_cases(world, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases broke the rules:\n" + "\n".join(
        failures[:60]
    )


def test_comfyuis_own_socket_opens_for_its_student_and_teachers_only(
    nginx_gateway, make_student, register_instance, teacher
):
    """A real WebSocket to a real (emulated) ComfyUI, the socket the frontend keeps open."""
    port = nginx_gateway.emulator_ports[0]
    carol = make_student("carol")
    register_instance(carol, port)
    dave = make_student("dave")
    register_instance(dave, nginx_gateway.emulator_ports[1])
    url = nginx_gateway.comfy_origin.replace("http", "ws", 1) + f"/comfyui/carol/{port}/ws?clientId=matrix"

    def access(user, target) -> str:
        client = nginx_gateway.comfy_client(user, target)
        return f"{gateway.ACCESS_COOKIE}={client.cookies[gateway.ACCESS_COOKIE]}"

    holders = {
        "anonymous": "",
        "carol": access(carol, port),
        "teacher": access(teacher, carol.comfy_instance),
        "dave (his own access)": access(dave, nginx_gateway.emulator_ports[1]),
    }
    failures = []
    for (who, cookie), origin in itertools.product(
        holders.items(), [None, nginx_gateway.comfy_origin, nginx_gateway.site_origin, EVIL_ORIGIN]
    ):
        allowed = who in ("carol", "teacher") and origin in (None, nginx_gateway.comfy_origin)
        headers = {"Cookie": cookie} if cookie else {}
        try:
            with connect(url, origin=origin, additional_headers=headers, open_timeout=15) as socket:
                hello = json.loads(socket.recv(timeout=15))
                outcome = hello["type"] == "status" and hello["data"]["sid"] == "matrix"
        except InvalidStatus as refused:
            outcome = False
            if refused.response.status_code not in (401, 403):
                failures.append(f"{who} ({origin}): refused with {refused.response.status_code}")
        group = _results["groups"].setdefault("comfyui-socket", {"cases": 0, "failed": 0})
        group["cases"] += 1
        if outcome != allowed:
            group["failed"] += 1
            failures.append(f"{who} ({origin}): {'opened' if outcome else 'refused'}, expected the opposite")
    _results["failures"] += failures
    assert not failures, failures


def revoke_logout(user, session_key):
    Session.objects.filter(pk=session_key).delete()


def revoke_password(user, session_key):
    user.set_password(secrets.token_hex(8))
    user.save()


def revoke_deactivation(user, session_key):
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)


@pytest.mark.parametrize(
    "revoke", [revoke_logout, revoke_password, revoke_deactivation], ids=lambda f: f.__name__
)
def test_a_session_revoked_while_the_gate_cache_is_warm_loses_access_within_its_ttl(
    nginx_gateway, make_student, register_instance, revoke
):
    port = nginx_gateway.emulator_ports[1]
    student = make_student("erin")
    register_instance(student, port)
    session_key = nginx_gateway.login(student)
    comfy = nginx_gateway.comfy_client(student, port, session_key=session_key)
    path = f"/comfyui/erin/{port}/api/queue"
    for _warm in range(5):
        assert comfy.get(path).status_code == 200  # the decision is now in nginx's cache
    revoke(student, session_key)
    revoked_at = time.monotonic()
    group = _results["groups"].setdefault("revocation", {"cases": 0, "failed": 0})
    group["cases"] += 1
    try:
        wait_until(
            lambda: comfy.get(path).status_code == 401,
            # The cache time, one refresh served stale behind it, and a slow machine.
            timeout=GATE_CACHE_SECONDS + 3,
            interval=0.1,
            message="access to end",
        )
        # Its queue status, which no cache stands in front of, ends at once.
        assert comfy.get(f"/comfyui/erin/{port}/queue-status/").status_code == 401
    except (TimeoutError, AssertionError):
        group["failed"] += 1
        _results["failures"].append(f"{revoke.__name__}: access did not end within the gate's cache time")
        raise
    _results["revocation"][revoke.__name__] = {
        "lost_access_after_seconds": round(time.monotonic() - revoked_at, 2),
        "gate_cache_seconds": GATE_CACHE_SECONDS,
    }
