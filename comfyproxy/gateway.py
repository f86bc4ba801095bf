"""Who may reach a student's ComfyUI: entry tickets, the `comfy_access` cookie and the gate.

ComfyUI is served from an origin of its own (settings.COMFY_PUBLIC_ORIGIN) because custom
nodes ship student-supplied JavaScript: on that origin it can never act with a teacher's
teaching-site session. Browsers send a host's cookies to every port of it, so the ComfyUI
origin ignores `sessionid` and authenticates with a cookie of its own:

1. The practice page (teaching origin) opens `comfy_entry_url(...)` in its iframe: the
   ComfyUI origin's entry with a one-time ticket, kept server-side for a minute.
2. The entry view redeems it and sets `comfy_access`, scoped to `/comfyui/<user>/<port>/`
   and signed; it names the user and the teaching session the ticket came from.
3. nginx asks the gate view before every ComfyUI request (caching the answer a few
   seconds); Django views under `/comfyui/` get the same user from `ComfyAccessMiddleware`.

Logging out of the teaching site, or changing the password, ends the access within the
gate's cache time: every check looks the originating session up again.
"""

import re
import secrets
from dataclasses import dataclass
from importlib import import_module
from urllib.parse import quote, urlencode

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core import signing
from django.core.cache import cache
from django.utils.crypto import constant_time_compare
from django.utils.deprecation import MiddlewareMixin
from django.utils.functional import SimpleLazyObject
from django.utils.translation import gettext_lazy as _

from comfyproxy import errors
from comfyproxy.models import ComfyInstance
from comfyproxy.services.instances import port_in_range
from comfyproxy.services.notify import ensure_queue_available
from comfyproxy.services.queue import authorize

ACCESS_COOKIE = "comfy_access"
ENTRY_PATH = "/comfyui-enter/"
TICKET_TTL_SECONDS = 60
_TICKET_CACHE_PREFIX = "comfy-entry-ticket:"
# What secrets.token_urlsafe(32) produces; anything else is refused without a cache lookup.
_TICKET_FORMAT = re.compile(r"^[A-Za-z0-9_-]{43}$")
_ACCESS_SALT = "comfyproxy.gateway.comfy_access"
# An instance's path as Django sees it (decoded). nginx canonicalises submissions to it.
INSTANCE_PATH = re.compile(r"^/comfyui/(?P<username>[^/]+)/(?P<port>[0-9]{1,5})/")


class PortOutOfRange(errors.QueueError):
    status_code = 404
    code = "port_out_of_range"
    message = _("There is no ComfyUI of this class at this address.")


class EntryLinkExpired(errors.QueueError):
    status_code = 403
    code = "entry_link_expired"
    message = _("This link to ComfyUI has expired. Go back to the practice page and open ComfyUI again.")


class InstanceUnreachable(errors.QueueError):
    status_code = 502
    code = "instance_unreachable"
    message = _(
        "Your ComfyUI is not answering. It may have stopped: "
        'go back to the practice page and press "Start ComfyUI".'
    )


# Everything the gate (or nginx on its behalf) can refuse with, by the code nginx passes on.
REFUSALS = {
    refusal.code: refusal
    for refusal in (
        errors.NotAuthenticated,
        errors.NotYourInstance,
        errors.CrossSiteRequest,
        errors.InstanceNotRunning,
        PortOutOfRange,
        InstanceUnreachable,
    )
}


@dataclass(frozen=True)
class AccessGrant:
    """What an entry ticket and a `comfy_access` cookie say: who, which instance, which session."""

    user_id: int
    username: str
    port: int
    session_key: str


def instance_path(username: str, port: int) -> str:
    """The instance's address on the ComfyUI origin, encoded as browsers request it.

    The trailing slash matters: ComfyUI's frontend takes its API base from the page path
    without its last segment.
    """
    return f"/comfyui/{quote(username, safe='@+')}/{port}/"


# --- Entry --------------------------------------------------------------------------


def comfy_entry_url(user, instance_or_port: ComfyInstance | int, session_key: str | None) -> str:
    """Where the practice page's iframe opens a ComfyUI: the ComfyUI origin's entry, with a ticket.

    `instance_or_port` is the instance to open (a teacher may open a student's) or the port
    of the user's own. The ticket is a random one-time key; what it stands for (including the
    teaching session's key, which must never appear in a URL) stays in the cache.
    """
    if not user.is_authenticated or not session_key:
        raise errors.NotAuthenticated()
    if isinstance(instance_or_port, ComfyInstance):
        owner, port = instance_or_port.user, instance_or_port.port
    else:
        owner, port = user, instance_or_port
    authorize(user, owner)
    if port is None or not port_in_range(port):
        raise PortOutOfRange()
    # Without Redis the ticket would vanish silently and the student would see "expired".
    ensure_queue_available()
    ticket = secrets.token_urlsafe(32)
    grant = AccessGrant(user.pk, owner.get_username(), port, session_key)
    cache.set(_TICKET_CACHE_PREFIX + ticket, grant, timeout=TICKET_TTL_SECONDS)
    return f"{settings.COMFY_PUBLIC_ORIGIN.rstrip('/')}{ENTRY_PATH}?{urlencode({'ticket': ticket})}"


def redeem_ticket(ticket: str) -> AccessGrant:
    """The grant a ticket stands for, once: a second redemption (or a late one) is refused."""
    if not _TICKET_FORMAT.match(ticket):
        raise EntryLinkExpired()
    key = _TICKET_CACHE_PREFIX + ticket
    grant = cache.get(key)
    # Only the request whose delete removed the key may use it (two tabs racing, a replay).
    if not isinstance(grant, AccessGrant) or not cache.delete(key):
        raise EntryLinkExpired()
    return grant


def grant_access(response, grant: AccessGrant) -> None:
    """Give the browser `comfy_access` for exactly this instance's path on the ComfyUI origin."""
    value = signing.dumps(
        {
            "uid": grant.user_id,
            "u": grant.username,
            "p": grant.port,
            "sk": grant.session_key,
            # Every entry gets a fresh value, so nginx never serves it a decision cached for an older one.
            "n": secrets.token_urlsafe(6),
        },
        salt=_ACCESS_SALT,
    )
    response.set_cookie(
        ACCESS_COOKIE,
        value,
        path=instance_path(grant.username, grant.port),
        httponly=True,
        samesite="Lax",
        secure=settings.COMFY_PUBLIC_ORIGIN.startswith("https://"),
    )


# --- Checking access ------------------------------------------------------------------


def read_access_cookie(value: str) -> AccessGrant | None:
    if not value:
        return None
    try:
        data = signing.loads(value, salt=_ACCESS_SALT, max_age=settings.SESSION_COOKIE_AGE)
        return AccessGrant(int(data["uid"]), str(data["u"]), int(data["p"]), str(data["sk"]))
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None


def grant_for_path(cookie_value: str, username: str, port_text: str) -> AccessGrant:
    """The cookie's grant, if it was issued for exactly this instance path (no database)."""
    grant = read_access_cookie(cookie_value)
    if grant is None or grant.username != username or str(grant.port) != port_text:
        raise errors.NotAuthenticated()
    return grant


def check_origin(*, unsafe: bool, origin: str) -> None:
    """Browsers send Origin with every POST and WebSocket; only the ComfyUI origin's own pass.

    ComfyUI checks Origin itself only when Host is a loopback address, and nginx keeps the
    browser's Host, so this check is the one that counts.
    """
    if unsafe and origin and origin != settings.COMFY_PUBLIC_ORIGIN.rstrip("/"):
        raise errors.CrossSiteRequest()


def check_port(port_text: str) -> int:
    port = int(port_text) if port_text.isdigit() else 0
    if not port_in_range(port):
        raise PortOutOfRange()
    return port


def session_user(grant: AccessGrant):
    """The grant's user if the teaching session it came from is still that user's login."""
    session = import_module(settings.SESSION_ENGINE).SessionStore(grant.session_key).load()
    if str(session.get(SESSION_KEY)) != str(grant.user_id):
        return None
    user = get_user_model()._default_manager.filter(pk=grant.user_id).first()
    if user is None or not getattr(user, "is_active", True):
        return None
    # As django.contrib.auth.get_user does: a password change ends the session's logins.
    session_hash = session.get(HASH_SESSION_KEY) or ""
    valid_hashes = (user.get_session_auth_hash(), *user.get_session_auth_fallback_hash())
    if not any(constant_time_compare(session_hash, valid) for valid in valid_hashes):
        return None
    return user


def check_instance_access(grant: AccessGrant, port: int):
    """Owner or staff, and a running instance of that student at exactly that port on the GPU host."""
    user = session_user(grant)
    if user is None:
        raise errors.NotAuthenticated()
    if user.get_username() != grant.username and not user.is_staff:
        raise errors.NotYourInstance()
    running = (
        ComfyInstance.objects.running()
        .filter(port=port, host=settings.COMFY_GPU_HOST)
        .filter(**{f"user__{get_user_model().USERNAME_FIELD}": grant.username})
        .exists()
    )
    if not running:
        raise errors.InstanceNotRunning()
    return user


def comfy_access_user(cookie_value: str, username: str, port_text: str):
    """The user `comfy_access` names for this instance path, or None."""
    try:
        grant = grant_for_path(cookie_value, username, port_text)
    except errors.NotAuthenticated:
        return None
    return session_user(grant)


class ComfyAccessMiddleware(MiddlewareMixin):
    """On `/comfyui/<user>/<port>/...` the user is whoever `comfy_access` names, never the session's.

    Those paths belong to the ComfyUI origin, where student JavaScript runs: a teacher's
    teaching-site session (whose cookie the browser sends to every port of the host) must
    not count there. Goes after AuthenticationMiddleware.
    """

    def process_request(self, request):
        match = INSTANCE_PATH.match(request.path_info)
        if match is None:
            return
        cookie_value = request.COOKIES.get(ACCESS_COOKIE, "")

        def resolve():
            return comfy_access_user(cookie_value, match["username"], match["port"]) or AnonymousUser()

        request.user = SimpleLazyObject(resolve)

        async def auser():
            return await sync_to_async(resolve)()

        request.auser = auser
