from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView

from comfyproxy import metrics
from comfyproxy.api.comfy_views import submit_prompt

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("api/v1/comfy_proxy/", include("comfyproxy.api.urls")),
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
]
