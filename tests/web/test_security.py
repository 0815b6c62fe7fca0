"""Every POST needs its CSRF token or an API token, every page a login, and production settings pass `check --deploy`.

The routes come from the URL conf and the API's schema, so a route added later is checked too.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import uuid

import pytest
from django.test import Client
from django.urls import URLResolver, get_resolver

from jobs.models import ApiToken, BaseModel
from tests.conftest import REPO

# What stands in for each kind of path parameter: any value will do, the checks come before the view.
FILLERS = {"int": "1", "uuid": str(uuid.uuid4()), "str": "x", "path": "x", "slug": "x"}
# Walked elsewhere: Django's admin (its own login), and the REST API through its schema (below).
NOT_WALKED = ("admin/", "api/")
# Needing no login: the login page, logging out, and what operators' tools read (jobs/ops_views.py guards /metrics).
LOGIN_ROUTES = ("login", "logout", "healthz", "metrics")


def routes(patterns=None, prefix=""):
    """(url, pattern) for every route of the URL conf and the URL confs it includes."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if route not in NOT_WALKED:
                yield from routes(pattern.url_patterns, route)
            continue
        yield "/" + re.sub(r"<(?:(\w+):)?\w+>", lambda match: FILLERS[match.group(1) or "str"], route), pattern


def api_operations(client):
    """(method, url) for every operation of the REST API's schema."""
    for path, operations in client.get("/api/openapi.json").json()["paths"].items():
        for method in operations:
            yield method, re.sub(r"\{\w+\}", "1", path)


@pytest.fixture
def browser(team_user):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(team_user)
    return browser


def csrf_token(browser):
    browser.get("/datasets/")
    return browser.cookies["csrftoken"].value


def test_every_form_post_needs_the_csrf_token(browser):
    exempt = []
    checked = 0
    for url, pattern in routes():
        if getattr(pattern.callback, "csrf_exempt", False):
            exempt.append(url)
            continue
        response = browser.post(url, {})
        assert response.status_code == 403 and b"CSRF" in response.content, (url, response.status_code)
        checked += 1
    assert checked >= 20
    assert Client(enforce_csrf_checks=True).post("/admin/login/", {}).status_code == 403
    # With the token, the same post goes through (here: the upload form says what is missing).
    response = browser.post("/datasets/", {"csrfmiddlewaretoken": csrf_token(browser)})
    assert response.status_code == 200 and "This field is required." in response.content.decode()
    # Only the OpenAI-compatible API goes without: it authenticates by token alone (see below).
    assert exempt and all(url.startswith("/v1/") for url in exempt), exempt


def test_the_csrf_exempt_routes_do_not_take_a_session(browser):
    """A forged request from another site carries the session cookie, never the bearer token."""
    for url, pattern in routes():
        if getattr(pattern.callback, "csrf_exempt", False):
            for method in pattern.callback.allowed_methods:
                response = browser.generic(method, url)
                assert response.status_code == 401, (method, url, response.status_code)
                assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_rest_api_needs_csrf_with_a_session_and_not_with_a_token(browser, team_user):
    posts = [url for method, url in api_operations(browser) if method == "post"]
    assert len(posts) >= 6
    _, token = ApiToken.issue(team_user, "csrf")
    with_token = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {token}")
    csrf = csrf_token(browser)
    for url in posts:
        refused = browser.post(url, "{}", content_type="application/json")
        assert refused.status_code == 403 and refused.json() == {"detail": "CSRF check Failed"}, url
        # With the CSRF token, or with an API token and no CSRF token, the call gets to the view (job 1 does not exist).
        assert browser.post(url, "{}", content_type="application/json", HTTP_X_CSRFTOKEN=csrf).status_code != 403, url
        assert with_token.post(url, "{}", content_type="application/json").status_code != 403, url


def test_every_page_needs_a_login(db):
    anonymous = Client()
    checked = 0
    for url, pattern in routes():
        if pattern.name in LOGIN_ROUTES:
            continue
        response = anonymous.get(url)
        if url.startswith("/v1/"):
            assert response.status_code == 401, url
        else:
            assert response.status_code == 302 and response["Location"].startswith("/login/?next="), (url, response)
        checked += 1
    assert checked >= 30
    for method, url in api_operations(anonymous):
        assert anonymous.generic(method.upper(), url).status_code == 401, (method, url)
    assert anonymous.get("/admin/")["Location"].startswith("/admin/login/")
    assert anonymous.get("/login/").status_code == 200


def test_a_token_of_a_deactivated_user_or_of_another_scheme_is_refused(team_user):
    _, token = ApiToken.issue(team_user, "soon unused")
    for header in (f"Token {token}", f"Basic {token}", token, "Bearer ", f"Bearer {token}\x00"):
        client = Client(HTTP_AUTHORIZATION=header)
        assert client.get("/v1/files").status_code == 401 and client.get("/api/datasets").status_code == 401, header
    team_user.is_active = False
    team_user.save()
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get("/v1/files").status_code == 401 and client.get("/api/datasets").status_code == 401


def test_logging_out_ends_the_session_for_pages_and_the_api(browser):
    assert browser.get("/datasets/").status_code == 200 and browser.get("/api/datasets").status_code == 200
    assert browser.post("/logout/", {"csrfmiddlewaretoken": csrf_token(browser)}).status_code == 302
    assert browser.get("/datasets/").status_code == 302
    assert browser.get("/api/datasets").status_code == 401


def settings_in_a_subprocess(tmp_path, code, **environment):
    """Run `code` after Django's setup with exactly these settings variables (none inherited)."""
    inherited = {name: value for name, value in os.environ.items()
                 if name not in ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS") and not name.startswith("TUNEDECK_")}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{code}"],
        cwd=REPO, capture_output=True, text=True,
        env=inherited | {"DJANGO_SETTINGS_MODULE": "webapp.settings", "TUNEDECK_DATA_DIR": str(tmp_path)} | environment,
    )


def test_production_settings_pass_the_deploy_check(tmp_path):
    check = settings_in_a_subprocess(
        tmp_path,
        "from django.conf import settings\n"
        "from django.core.management import call_command\n"
        "call_command('check', deploy=True, fail_level='WARNING')\n"
        "print('DEBUG', settings.DEBUG)",
        SECRET_KEY=secrets.token_urlsafe(50), ALLOWED_HOSTS="tunedeck.example.com", TUNEDECK_BEHIND_HTTPS_PROXY="1",
    )
    assert check.returncode == 0, check.stderr
    assert "DEBUG False" in check.stdout  # off by default once there is a secret key


def test_without_a_secret_key_production_does_not_start_and_development_is_local_only(tmp_path):
    refused = settings_in_a_subprocess(tmp_path, "", DEBUG="false")
    assert refused.returncode != 0 and "SECRET_KEY must be set in the environment when DEBUG is off" in refused.stderr
    development = settings_in_a_subprocess(
        tmp_path, "from django.conf import settings\nprint(settings.DEBUG, settings.ALLOWED_HOSTS)")
    assert development.stdout.strip() == "True ['127.0.0.1', 'localhost']"


def test_a_base_models_own_code_is_refused_in_the_catalogue_unless_an_admin_trusts_it(admin_client, tmp_path):
    model = tmp_path / "custom-llama"
    model.mkdir()
    mark = tmp_path / "custom-code-ran"
    (model / "custom_llama.py").write_text(f"from pathlib import Path\nPath({str(mark)!r}).touch()\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "tunedeck-custom-llama", "auto_map": {"AutoConfig": "custom_llama.CustomLlamaConfig"},
    }))
    form = admin_client.get("/admin/jobs/basemodel/add/").content.decode()
    assert re.search(r'<input type="checkbox" name="trust_remote_code"(?![^>]*checked)', form)

    response = admin_client.post("/admin/jobs/basemodel/add/", {
        "name": "custom", "path": str(model), "task": "causal_lm_sft", "architecture": "llama",
        "description": "", "suggested_settings": "{}",
    })
    assert response.status_code == 200
    assert "ships its own Python code (auto_map in its config)" in response.content.decode()
    assert not BaseModel.objects.exists() and not mark.exists()
