"""No URL answers with Django's bare English error pages: API callers get the documented JSON
shape with a stable code, people a short page in their language."""

import pytest
from django.test import override_settings

pytestmark = pytest.mark.django_db

HOST = {"HTTP_HOST": "127.0.0.1:8080"}


def test_an_unknown_api_url_is_json_with_a_stable_code_in_chinese(client):
    response = client.get("/api/v1/comfy_proxy/no-such-endpoint", **HOST)
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"code": "not_found", "message": "这个地址没有内容。", "details": ""}


def test_an_unknown_page_is_a_page_in_chinese(client):
    response = client.get("/no-such-page/", **HOST)
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    body = response.content.decode()
    assert '<html lang="zh-hans">' in body
    assert "页面不存在" in body
    assert "返回教学系统" in body


def test_the_page_follows_the_chosen_language(client):
    client.cookies["django_language"] = "en"
    response = client.get("/no-such-page/", **HOST)
    assert response.status_code == 404
    assert "Page not found" in response.content.decode()


def test_a_program_asking_for_json_gets_json_anywhere(client):
    response = client.get("/no-such-page/", HTTP_ACCEPT="application/json", **HOST)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_refused_host_is_a_400_in_the_documented_shape(client):
    response = client.get("/api/v1/comfy_proxy/queue/status", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"


@override_settings(ROOT_URLCONF="tests.error_urls")
def test_a_crash_is_a_500_in_the_documented_shape_not_a_traceback(client):
    client.raise_request_exception = False
    api = client.get("/api/v1/test-crash", **HOST)
    assert api.status_code == 500
    assert api.json() == {
        "code": "server_error",
        "message": "教学系统出现错误，已记录下来，请稍后重试。",
        "details": "",
    }
    page = client.get("/test-crash/", **HOST)
    assert page.status_code == 500
    assert "出错了" in page.content.decode()
    assert "a bug" not in page.content.decode()


@override_settings(ROOT_URLCONF="tests.error_urls")
def test_a_refusal_without_its_own_answer_is_a_403_page(client):
    response = client.get("/test-refuse/", **HOST)
    assert response.status_code == 403
    assert "没有权限" in response.content.decode()
