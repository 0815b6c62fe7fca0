"""API tokens: shown once, stored as a hash, revocable; /v1 answers 401 without a good one and 404 across teams."""

import hashlib
import re

import pytest
from django.test import Client
from django.urls import reverse

from jobs import openai_api
from jobs.models import ApiToken, Dataset, Job
from jobs.spec import JobSpec
from jobs.uploads import store_dataset

VALID_ROWS = b'{"prompt": "a", "completion": "b"}\n' * 4


def create_token(client, name="notebook"):
    page = client.post(reverse("token_list"), {"name": name}).content.decode()
    return re.search(r'<code class="new-token">([^<]+)</code>', page).group(1)


def api(token):
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def test_a_new_token_is_shown_once_and_only_its_hash_is_stored(client, team_user):
    client.force_login(team_user)
    token = create_token(client)

    row = ApiToken.objects.get()
    assert row.user == team_user and row.name == "notebook" and token.startswith(row.prefix)
    assert row.hashed_secret == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {str(value) for value in ApiToken.objects.values().get().values()}

    later = client.get(reverse("token_list")).content.decode()
    assert "notebook" in later and row.prefix in later
    assert token not in later

    assert api(token).get("/v1/files").status_code == 200
    row.refresh_from_db()
    assert row.last_used_at is not None


def test_a_revoked_or_wrong_token_gets_401_in_openais_shape(client, team_user):
    client.force_login(team_user)
    token = create_token(client)
    row = ApiToken.objects.get()

    response = client.post(reverse("token_revoke", args=[row.pk]))
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.revoked_at is not None
    assert "revoked" in client.get(reverse("token_list")).content.decode()

    for bad in (token, token + "x", "td-not-a-token"):
        response = api(bad).get("/v1/files")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert Client().get("/v1/files").status_code == 401


def test_only_the_owner_can_revoke_a_token(client, team_user, other_team_user):
    row, _ = ApiToken.issue(other_team_user, "bob's")
    client.force_login(team_user)
    assert client.post(reverse("token_revoke", args=[row.pk])).status_code == 404
    row.refresh_from_db()
    assert row.revoked_at is None


def routes_with_an_id():
    for pattern in openai_api.urlpatterns:
        route = str(pattern.pattern)
        if "<str:file_id>" in route or "<str:job_id>" in route:
            for method in pattern.callback.allowed_methods:
                yield route, method


@pytest.mark.parametrize("route, method", list(routes_with_an_id()))
def test_another_teams_file_and_job_are_not_found_on_every_route(
    route, method, team_user, other_team_user, catalogue, data_dirs
):
    other_team = other_team_user.memberships.get().team
    dataset = store_dataset(other_team, other_team_user, "d.jsonl", VALID_ROWS)
    spec = JobSpec(base_model="tiny-random-llama", dataset=dataset.pk)
    job = Job.objects.create(
        team=other_team, created_by=other_team_user, base_model=catalogue["llama"], dataset=dataset,
        spec=spec.model_dump(mode="json"),
    )
    _, token = ApiToken.issue(team_user, "alice's")

    url = "/v1/" + route.replace("<str:file_id>", f"file-{dataset.pk}").replace("<str:job_id>", f"ftjob-{job.pk}")
    response = api(token).generic(method, url)

    assert response.status_code == 404, (method, url, response.content)
    assert response.json()["error"]["code"] == "not_found"
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    job.refresh_from_db()
    assert job.status == "queued" and job.cancel_requested_at is None


def test_the_owners_team_sees_its_file(team_user, data_dirs):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", VALID_ROWS)
    _, token = ApiToken.issue(team_user, "alice's")
    response = api(token).get(f"/v1/files/file-{dataset.pk}")
    assert response.status_code == 200
    assert response.json() | {"created_at": 0} == {
        "id": f"file-{dataset.pk}", "object": "file", "bytes": len(VALID_ROWS), "created_at": 0,
        "filename": "d.jsonl", "purpose": "fine-tune", "status": "processed", "status_details": None,
        "expires_at": None,
    }
