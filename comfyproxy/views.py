"""The teaching system's pages: the landing page and the student's practice page."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from comfyproxy import errors
from comfyproxy.api.practice import practice_state
from comfyproxy.services import instances


def home(request):
    return render(request, "home.html")


@login_required
def practice(request):
    instance = instances.instance_of(request.user)
    page_error = ""
    try:
        state = practice_state(request, instance)
    except errors.QueueError as error:
        # No way into ComfyUI right now (Redis down): show the page and say why.
        state = {
            **instances.describe_instance(instance),
            "iframe_url": None,
            "running": False,
            "direct_url": None,
        }
        page_error = error.message
    return render(request, "practice.html", {"instance_state": state, "page_error": page_error})
