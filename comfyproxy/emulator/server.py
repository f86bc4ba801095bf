"""The HTTP and WebSocket face of one emulated instance: ComfyUI's routes, each also under /api.

Handlers follow ComfyUI 0.3.64's server.py closely, down to which malformed bodies end in a 500
(aiohttp answers an unhandled exception with `500 Internal Server Error\\n\\nServer got itself in trouble`,
which is what clients of the real server see). The frontend is the official comfyui-frontend-package.
"""

import hashlib
import importlib.resources
import ipaddress
import json
import logging
import mimetypes
import os
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import WSMsgType, web

from .data import recorded_body
from .instance import ComfyInstance

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FRONTEND_DIR = Path(str(importlib.resources.files("comfyui_frontend_package") / "static"))
SERVER_FEATURES = json.loads(recorded_body("api_features"))
# folder_paths.folder_names_and_paths of ComfyUI 0.3.64; no folder holds any model here.
MODEL_FOLDERS = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)
# Never served inline from /view, so an uploaded page cannot run in the server's origin.
_UNSAFE_VIEW_TYPES = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}
_RECORDED_JSON = {
    name: recorded_body(name)
    for name in (
        "api_embeddings",
        "api_extensions",
        "api_features",
        "api_users",
        "api_i18n",
        "api_workflow_templates",
        "api_experiment_models",
    )
}
_TEMPLATES_INDEX = recorded_body("templates_index.json")
_NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}


def _json_bytes(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8")


@web.middleware
async def cache_control(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if request.path.endswith((".js", ".css", "index.json")):
        response.headers.setdefault("Cache-Control", "no-cache")
    return response


@web.middleware
async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's guard against cross-site POSTs to a local server.

    With a loopback IP address as Host, an Origin header must name the same host:port.
    """
    if "Host" in request.headers and "Origin" in request.headers:
        host = request.headers["Host"].lower()
        origin = urllib.parse.urlparse(request.headers["Origin"]).netloc.lower()
        try:
            loopback = ipaddress.ip_address(urllib.parse.urlsplit("//" + host).hostname).is_loopback
        except ValueError:
            loopback = False  # a host name, not an IP address: not checked
        if loopback and host and origin and host != origin:
            logger.warning("request with non matching host and origin %s != %s, returning 403", host, origin)
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


class ComfyApi:
    """ComfyUI's endpoints for one instance."""

    def __init__(self, instance: ComfyInstance):
        self.instance = instance

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of the routes ComfyUI registers both plain and under /api."""
        return [
            ("GET", "/ws", self.websocket),
            ("GET", "/", self.index),
            ("GET", "/embeddings", self.recorded("api_embeddings")),
            ("GET", "/models", self.model_folders),
            ("GET", "/models/{folder}", self.models),
            ("GET", "/extensions", self.recorded("api_extensions")),
            ("POST", "/upload/image", self.upload_image),
            ("POST", "/upload/mask", self.upload_mask),
            ("GET", "/view", self.view),
            ("GET", "/view_metadata/{folder_name}", self.view_metadata),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.recorded("api_features")),
            ("GET", "/prompt", self.prompt_info),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/history", self.history),
            ("GET", "/history/{prompt_id}", self.history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/queue", self.queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.interrupt),
            ("POST", "/free", self.free),
            ("GET", "/settings", self.settings),
            ("GET", "/settings/{id}", self.setting),
            ("POST", "/settings", self.post_settings),
            ("POST", "/settings/{id}", self.post_setting),
            ("GET", "/users", self.recorded("api_users")),
            ("GET", "/userdata", self.list_userdata),
            ("GET", "/userdata/{file}", self.userdata),
            ("POST", "/userdata/{file}", self.post_userdata),
            ("DELETE", "/userdata/{file}", self.delete_userdata),
            ("GET", "/i18n", self.recorded("api_i18n")),
            ("GET", "/workflow_templates", self.recorded("api_workflow_templates")),
            ("GET", "/experiment/models", self.recorded("api_experiment_models")),
            ("GET", "/experiment/models/{folder}", self.models),
        ]

    def internal_routes(self) -> list[tuple[str, str, Handler]]:
        """Routes of ComfyUI's /internal sub-application, which has no /api copy."""
        return [
            ("GET", "/internal/logs", self.logs),
            ("GET", "/internal/logs/raw", self.raw_logs),
        ]

    # Frontend and recorded replies

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(FRONTEND_DIR / "index.html", headers=_NO_CACHE)

    @staticmethod
    async def templates_index(request: web.Request) -> web.Response:
        return web.Response(body=_TEMPLATES_INDEX, content_type="application/json")

    @staticmethod
    def recorded(name: str) -> Handler:
        body = _RECORDED_JSON[name]

        async def reply(request: web.Request) -> web.Response:
            return _json_bytes(body)

        return reply

    async def system_stats(self, request: web.Request) -> web.Response:
        stats = json.loads(recorded_body("api_system_stats"))
        stats["system"]["argv"][-1] = str(self.instance.port)
        return web.json_response(stats)

    async def model_folders(self, request: web.Request) -> web.Response:
        return web.json_response(list(MODEL_FOLDERS))

    async def models(self, request: web.Request) -> web.Response:
        if request.match_info["folder"] not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response([])

    async def view_metadata(self, request: web.Request) -> web.Response:
        # No model files exist, so there is never metadata to show.
        return web.Response(status=404)

    async def object_info(self, request: web.Request) -> web.Response:
        return _json_bytes(self.instance.catalog.object_info_body)

    async def object_info_node(self, request: web.Request) -> web.Response:
        node_class = request.match_info["node_class"]
        info = self.instance.catalog.object_info.get(node_class)
        return web.json_response({} if info is None else {node_class: info})

    # Prompts, queue and history

    async def prompt_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance.queue_info())

    async def post_prompt(self, request: web.Request) -> web.Response:
        self.instance.log("got prompt")
        status, reply = self.instance.submit(await request.json())
        return web.json_response(reply, status=status)

    async def queue(self, request: web.Request) -> web.Response:
        running, pending = self.instance.queue.queue_snapshot()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        # `in`, not .get(), as in ComfyUI: a JSON list body is accepted and does nothing.
        if "clear" in body and body["clear"]:  # noqa: RUF019
            self.instance.queue.wipe_queue()
        if "delete" in body:
            for prompt_id in body["delete"]:
                self.instance.queue.delete_queue_item(prompt_id)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.instance.interrupt(body.get("prompt_id"))
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.instance.free(free_memory=bool(body.get("free_memory", False)))
        return web.Response(status=200)

    async def history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items")
        offset = request.rel_url.query.get("offset")
        history = self.instance.queue.get_history(
            max_items=None if max_items is None else int(max_items),
            offset=-1 if offset is None else int(offset),
        )
        return web.json_response(history)

    async def history_item(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "clear" in body and body["clear"]:  # noqa: RUF019 (as in post_queue)
            self.instance.queue.wipe_history()
        if "delete" in body:
            for prompt_id in body["delete"]:
                self.instance.queue.delete_history_item(prompt_id)
        return web.Response(status=200)

    # WebSocket

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        hub, executor = self.instance.hub, self.instance.executor
        sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        hub.register(sid, socket)
        try:
            await hub.send_now(socket, "status", {"status": self.instance.queue_info(), "sid": sid})
            # A reconnecting owner learns which node runs now (without prompt_id, as ComfyUI sends it).
            if executor.client_id == sid and executor.last_node_id is not None:
                await hub.send_now(socket, "executing", {"node": executor.last_node_id})
            first_message = True
            async for message in socket:
                if message.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                    if first_message and data.get("type") == "feature_flags":
                        await hub.send_now(socket, "feature_flags", SERVER_FEATURES)
                    first_message = False
                except (json.JSONDecodeError, AttributeError):
                    logger.warning("invalid message from client %s: %.200s", sid, message.data)
        finally:
            hub.unregister(sid)
        return socket

    # Files

    async def view(self, request: web.Request) -> web.StreamResponse:
        return self._view_file(request.rel_url.query)

    def _view_file(self, query) -> web.StreamResponse:
        files = self.instance.files
        if "filename" in query:
            filename, directory = files.annotated_filepath(query["filename"])
            if not filename or filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            if directory is None:
                directory = files.directory_by_type(query.get("type", "output"))
            if directory is None:
                return web.Response(status=400)
            if "subfolder" in query:
                full_directory = os.path.join(directory, query["subfolder"])
                if os.path.commonpath((os.path.abspath(full_directory), directory)) != directory:
                    return web.Response(status=403)
                directory = full_directory
            filename = os.path.basename(filename)
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                if content_type in _UNSAFE_VIEW_TYPES:
                    content_type = "application/octet-stream"
                return web.FileResponse(
                    path,
                    headers={"Content-Disposition": f'filename="{filename}"', "Content-Type": content_type},
                )
        return web.Response(status=404)

    async def upload_image(self, request: web.Request) -> web.Response:
        return self._upload(await request.post(), save=None)

    async def upload_mask(self, request: web.Request) -> web.Response:
        post = await request.post()
        original = json.loads(post.get("original_ref"))

        def save_if_original_exists(upload, path: str) -> None:
            # ComfyUI composites the mask into the original's alpha (with Pillow); the emulator stores the
            # upload as it came. Like ComfyUI it writes nothing when the original cannot be found.
            filename, directory = self.instance.files.annotated_filepath(original["filename"])
            if not filename or filename[0] == "/" or ".." in filename:
                return
            directory = directory or self.instance.files.directory_by_type(original.get("type", "output"))
            if directory is None:
                return
            if original.get("subfolder", ""):
                directory = os.path.join(directory, original["subfolder"])
            if os.path.isfile(os.path.join(directory, filename)):
                with open(path, "wb") as target:
                    target.write(upload.file.read())

        return self._upload(post, save=save_if_original_exists)

    def _upload(self, post, save: Callable[[object, str], None] | None) -> web.Response:
        upload = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type")
        if upload_type is None:
            upload_type = "input"
        upload_dir = self.instance.files.directory_by_type(upload_type)
        if upload_dir is None:
            raise ValueError(f"unknown upload type {upload_type!r}")
        if not (upload and upload.file):
            return web.Response(status=400)
        filename = upload.filename
        if not filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "")
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, path)) != upload_dir:
            return web.Response(status=400)
        os.makedirs(folder, exist_ok=True)

        stem, extension = os.path.splitext(filename)
        duplicate = False
        if overwrite not in ("true", "1"):
            number = 1
            while os.path.exists(path):
                if _same_content(path, upload.file):
                    duplicate = True
                    break
                filename = f"{stem} ({number}){extension}"
                path = os.path.join(folder, filename)
                number += 1
        if not duplicate:
            if save is None:
                with open(path, "wb") as target:
                    target.write(upload.file.read())
            else:
                save(upload, path)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

    # Settings and user data (single user, "default")

    async def settings(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance.settings)

    async def setting(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance.settings.get(request.match_info["id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        self.instance.settings = {**self.instance.settings, **(await request.json())}
        return web.Response(status=200)

    async def post_setting(self, request: web.Request) -> web.Response:
        self.instance.settings[request.match_info["id"]] = await request.json()
        return web.Response(status=200)

    async def list_userdata(self, request: web.Request) -> web.Response:
        return self._list_userdata(request.rel_url.query)

    def _list_userdata(self, query) -> web.Response:
        directory = query.get("dir", "")
        if not directory:
            return web.Response(status=400, text="Directory not provided")
        root = self.instance.files.user_path(directory)
        if root is None:
            return web.Response(status=403, text="Invalid directory")
        if not os.path.exists(root):
            return web.Response(status=404, text="Directory not found")
        recurse = query.get("recurse", "").lower() == "true"
        full_info = query.get("full_info", "").lower() == "true"
        split = query.get("split", "").lower() == "true"
        paths = Path(root).rglob("*") if recurse else Path(root).glob("*")
        results = []
        for path in sorted(paths):
            if not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            if full_info:
                results.append(_file_info(path, root))
            elif split:
                results.append([relative, *relative.split("/")])
            else:
                results.append(relative)
        return web.json_response(results)

    def _userdata_path(self, request: web.Request) -> str | web.Response:
        file = request.match_info["file"]
        if not file:
            return web.Response(status=400)
        path = self.instance.files.user_path(file)
        return web.Response(status=403) if path is None else path

    async def userdata(self, request: web.Request) -> web.StreamResponse:
        return self._read_userdata(request)

    async def post_userdata(self, request: web.Request) -> web.Response:
        return self._write_userdata(request, await request.read())

    async def delete_userdata(self, request: web.Request) -> web.Response:
        return self._delete_userdata(request)

    # The file work is synchronous, as in ComfyUI: small local files, and it keeps the handlers plain.

    def _read_userdata(self, request: web.Request) -> web.StreamResponse:
        path = self._userdata_path(request)
        if isinstance(path, web.Response):
            return path
        if not os.path.exists(path):
            return web.Response(status=404)
        return web.FileResponse(path)

    def _write_userdata(self, request: web.Request, body: bytes) -> web.Response:
        path = self._userdata_path(request)
        if isinstance(path, web.Response):
            return path
        overwrite = request.query.get("overwrite", "true") != "false"
        full_info = request.query.get("full_info", "false").lower() == "true"
        if not overwrite and os.path.exists(path):
            return web.Response(status=409, text="File already exists")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as target:
            target.write(body)
        root = self.instance.files.user_dir
        if full_info:
            return web.json_response(_file_info(Path(path), root))
        return web.json_response(os.path.relpath(path, root))

    def _delete_userdata(self, request: web.Request) -> web.Response:
        path = self._userdata_path(request)
        if isinstance(path, web.Response):
            return path
        if not os.path.exists(path):
            return web.Response(status=404)
        os.remove(path)
        return web.Response(status=204)

    # Logs

    async def logs(self, request: web.Request) -> web.Response:
        return web.json_response("".join(entry["t"] + " - " + entry["m"] for entry in self.instance.logs))

    async def raw_logs(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": list(self.instance.logs), "size": {"cols": 80, "rows": 24}})


def _same_content(path: str, upload_file) -> bool:
    with open(path, "rb") as existing:
        existing_digest = hashlib.sha256(existing.read()).hexdigest()
    upload_digest = hashlib.sha256(upload_file.read()).hexdigest()
    upload_file.seek(0)
    return existing_digest == upload_digest


def _file_info(path: Path, root: str) -> dict:
    stat = path.stat()
    return {
        "path": path.relative_to(root).as_posix(),
        "size": stat.st_size,
        "modified": stat.st_mtime,
        "created": stat.st_ctime,
    }


def create_app(
    instance: ComfyInstance,
    *,
    outer_middlewares: list,
    extra_routes: list[tuple[str, str, Handler]],
) -> web.Application:
    """The aiohttp application of one instance.

    `outer_middlewares` run before ComfyUI's own (the emulator's fault injection); `extra_routes` are
    added plain only (the emulator's control endpoints).
    """
    app = web.Application(
        client_max_size=SERVER_FEATURES["max_upload_size"],
        middlewares=[*outer_middlewares, cache_control, origin_only],
    )
    api = ComfyApi(instance)
    comfy_routes = api.routes()
    for method, path, handler in comfy_routes:
        app.router.add_route(method, "/api" + path, handler)
    for method, path, handler in [*comfy_routes, *api.internal_routes(), *extra_routes]:
        app.router.add_route(method, path, handler)
    app.router.add_route("GET", "/templates/index.json", api.templates_index)
    app.router.add_static("/", FRONTEND_DIR)
    return app
