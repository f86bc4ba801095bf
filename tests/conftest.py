"""Fixtures shared by the suite: people, instances, and clients logged in as them."""

import itertools

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from comfyproxy.models import QueueSettings
from comfyproxy.services import instances

_usernames = itertools.count(1)


@pytest.fixture
def make_student(db):
    def make(username: str | None = None, **extra):
        username = username or f"student{next(_usernames)}"
        return get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)

    return make


@pytest.fixture
def student(make_student):
    return make_student("alice")


@pytest.fixture
def other_student(make_student):
    return make_student("bob")


@pytest.fixture
def teacher(db):
    return get_user_model().objects.create_user(
        username="teacher", password="pw-teacher", is_staff=True, is_superuser=True
    )


@pytest.fixture
def client_for():
    def make(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def register_instance(db):
    """Record a running instance for a user at a port (as `comfy_instances register` does)."""

    def register(user, port: int, host: str = "127.0.0.1"):
        return instances.register_instance(user=user, port=port, host=host)

    return register


@pytest.fixture
def queue_settings(db):
    return QueueSettings.load()
