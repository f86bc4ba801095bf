"""The project's URLs plus views that fail, to reach the error handlers the way a crash would."""

from django.core.exceptions import PermissionDenied
from django.urls import path

from teaching.urls import handler400, handler403, handler404, handler500, urlpatterns  # noqa: F401


def crash(request):
    raise RuntimeError("a bug")


def refuse(request):
    raise PermissionDenied


urlpatterns = [
    *urlpatterns,
    path("api/v1/test-crash", crash),
    path("test-crash/", crash),
    path("test-refuse/", refuse),
]
