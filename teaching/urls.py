from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView

from comfyproxy import metrics, views
from comfyproxy.api import gate
from comfyproxy.api.comfy_queue import queue_cancel, queue_status
from comfyproxy.api.comfy_views import submit_prompt

urlpatterns = [
    path("", views.home, name="home"),
    path("practice/", views.practice, name="practice"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("api/v1/comfy_proxy/", include("comfyproxy.api.urls")),
    path("api/v1/practice/", include("comfyproxy.api.practice_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # For operators and Prometheus: staff or programs on this machine only (comfyproxy.metrics).
    path("metrics", metrics.metrics_view, name="metrics"),
    path("healthz", metrics.healthz_view, name="healthz"),
    # What nginx routes the ComfyUI frontend's submission to (both of ComfyUI's spellings).
    re_path(
        r"^comfyui/(?P<username>[^/]+)/(?P<port>[0-9]{1,5})/(?:api/)?prompt/?$",
        submit_prompt,
        name="comfy-submit",
    ),
    # The queue as the script injected into ComfyUI follows it (nginx routes these from the ComfyUI origin).
    path("comfyui/<str:username>/<int:port>/queue-status/", queue_status, name="comfy-queue-status"),
    path(
        "comfyui/<str:username>/<int:port>/queue-cancel/<str:task_id>/",
        queue_cancel,
        name="comfy-queue-cancel",
    ),
    # The ComfyUI origin's entry (nginx routes it there) and, on the teaching origin, the way to it.
    path("comfyui-enter/", gate.comfy_enter, name="comfy-enter"),
    path("comfyui-open/<str:username>/<int:port>/", gate.comfy_open, name="comfy-open"),
    # nginx's own: the auth gate and the page it shows instead of ComfyUI (not routed from outside).
    path("_gate/comfy/", gate.comfy_gate, name="comfy-gate"),
    path("_gate/refused/", gate.comfy_refused, name="comfy-refused"),
]

handler400 = "teaching.error_views.bad_request"
handler403 = "teaching.error_views.permission_denied"
handler404 = "teaching.error_views.page_not_found"
handler500 = "teaching.error_views.server_error"
