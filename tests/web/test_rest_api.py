"""The native REST API under /api/, without a worker: queued jobs are checked as rows."""

import json
import re

import pytest
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs import lifecycle
from jobs.models import ApiToken, Artifact, Job, Metric, Sweep, Worker
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset

PROMPT_ROWS = b'{"prompt": "2+2=", "completion": "4"}\n' * 4
# Path parameter -> which of alice's objects it names.
OBJECT_OF_PARAMETER = {"dataset_id": "dataset", "job_id": "job", "artifact_id": "artifact", "sweep_id": "sweep"}


def client_with_token(user):
    _, token = ApiToken.issue(user, "tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def api(team_user):
    return client_with_token(team_user)


@pytest.fixture
def team(team_user):
    return team_user.memberships.get().team


@pytest.fixture
def dataset(team, team_user, data_dirs):
    return store_dataset(team, team_user, "qa.jsonl", PROMPT_ROWS)


@pytest.fixture
def job(team, team_user, catalogue, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        return submit_job(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=dataset.pk), name="first")


@pytest.fixture
def artifact(job):
    artifact = Artifact(job=job, kind="adapter", size=3, sha256="0" * 64)
    artifact.file.save("adapter.zip", ContentFile(b"zip"), save=True)
    return artifact


def post_json(api, url, body, django_capture_on_commit_callbacks):
    # The message to Redis is sent on commit; these tests check the row, not the broker.
    with django_capture_on_commit_callbacks(execute=False):
        return api.post(url, json.dumps(body), content_type="application/json")


def test_an_upload_is_stored_with_its_validation_report(api, data_dirs):
    good = api.post("/api/datasets", {"file": SimpleUploadedFile("qa.jsonl", PROMPT_ROWS), "name": "qa"})
    assert good.status_code == 201, good.content
    assert good.json()["is_valid"] and good.json()["format"] == "prompt_completion" and good.json()["rows"] == 4

    bad = api.post("/api/datasets", {"file": SimpleUploadedFile("bad.jsonl", b'{"prompt": "x"}\nnot json\n')})
    assert bad.status_code == 201 and not bad.json()["is_valid"]
    detail = api.get(f"/api/datasets/{bad.json()['id']}").json()
    assert detail["problem_count"] >= 1 and detail["problems"][0]["line"] is not None

    listed = api.get("/api/datasets").json()
    assert listed["count"] == 2 and {row["id"] for row in listed["items"]} == {good.json()["id"], bad.json()["id"]}


def test_an_upload_with_columns_maps_them(api, data_dirs):
    csv = b"review,stars\ngreat,5\nbad,1\nfine,3\nmeh,2\n"
    response = api.post("/api/datasets", {
        "file": SimpleUploadedFile("reviews.csv", csv), "format": "classification",
        "text_column": "review", "label_column": "stars",
    })
    assert response.status_code == 201, response.content
    assert response.json()["column_map"] == {"text": "review", "label": "stars"} and response.json()["is_valid"]


def test_an_upload_with_an_unknown_format_is_refused_naming_the_field(api, data_dirs):
    response = api.post("/api/datasets", {"file": SimpleUploadedFile("qa.jsonl", PROMPT_ROWS), "format": "yaml"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["form", "format"]


def test_base_models_are_listed(api, catalogue):
    names = {row["name"] for row in api.get("/api/base-models").json()}
    assert names == {"tiny-random-llama", "all-MiniLM-L6-v2"}


def test_a_job_is_created_from_a_job_spec(api, catalogue, dataset, django_capture_on_commit_callbacks):
    spec = {"base_model": "tiny-random-llama", "dataset": dataset.pk, "method": {"type": "ia3"},
            "hyperparameters": {"max_steps": 3}}
    response = post_json(api, "/api/jobs", spec, django_capture_on_commit_callbacks)
    assert response.status_code == 201, response.content
    job = Job.objects.get()
    assert response.json()["id"] == job.pk and response.json()["status"] == "queued"
    assert response.json()["base_model"] == "tiny-random-llama" and response.json()["dataset"] == dataset.pk
    assert job.spec["method"]["type"] == "ia3" and job.spec["hyperparameters"]["max_steps"] == 3


@pytest.mark.parametrize("spec, field", [
    ({"hyperparameters": {"epochs": 0}}, ["hyperparameters", "epochs"]),
    ({"method": {"type": "lora", "r": 0}}, ["method", "lora", "r"]),
    ({"surprise": 1}, ["surprise"]),
])
def test_a_bad_job_spec_is_refused_with_422_naming_the_field(
    api, catalogue, dataset, spec, field, django_capture_on_commit_callbacks
):
    body = {"base_model": "tiny-random-llama", "dataset": dataset.pk} | spec
    response = post_json(api, "/api/jobs", body, django_capture_on_commit_callbacks)
    assert response.status_code == 422, response.content
    assert response.json()["detail"][0]["loc"][-len(field):] == field
    assert not Job.objects.exists()


def test_a_spec_the_catalogue_refuses_is_a_400_naming_the_field(api, catalogue, dataset, django_capture_on_commit_callbacks):
    response = post_json(api, "/api/jobs", {"base_model": "gpt-7", "dataset": dataset.pk}, django_capture_on_commit_callbacks)
    assert response.status_code == 400 and response.json()["field"] == "base_model"


def test_a_job_beyond_the_queue_quota_is_a_429(api, team, job, django_capture_on_commit_callbacks):
    team.max_queued_jobs = 1
    team.save()
    response = post_json(api, "/api/jobs", {"base_model": "tiny-random-llama", "dataset": job.dataset_id},
                         django_capture_on_commit_callbacks)
    assert response.status_code == 429 and "quota" in response.json()["detail"]


def test_jobs_are_listed_with_filters_and_pages(api, team, team_user, job, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        dora = submit_job(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=job.dataset_id,
                                                   method={"type": "dora"}))
    lifecycle.request_cancel(dora)
    assert [row["id"] for row in api.get("/api/jobs").json()["items"]] == [dora.pk, job.pk]
    assert [row["id"] for row in api.get("/api/jobs?status=cancelled").json()["items"]] == [dora.pk]
    assert [row["id"] for row in api.get("/api/jobs?method=lora").json()["items"]] == [job.pk]
    second_page = api.get("/api/jobs?limit=1&offset=1").json()
    assert second_page["count"] == 2 and [row["id"] for row in second_page["items"]] == [job.pk]
    assert api.get("/api/jobs?method=magic").status_code == 422


def test_a_job_shows_its_detail_metrics_and_events(api, job):
    Metric.objects.create(job=job, step=1, train_loss=2.5, learning_rate=1e-4)
    Metric.objects.create(job=job, step=2, train_loss=2.1, learning_rate=1e-4)
    assert api.get(f"/api/jobs/{job.pk}").json()["spec"]["base_model"] == "tiny-random-llama"
    assert [row["train_loss"] for row in api.get(f"/api/jobs/{job.pk}/metrics").json()] == [2.5, 2.1]
    assert api.get(f"/api/jobs/{job.pk}/events").json()[0]["to_status"] == "queued"


def test_a_cancelled_job_is_retried_as_a_new_queued_job(api, job, django_capture_on_commit_callbacks):
    cancelled = api.post(f"/api/jobs/{job.pk}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.post(f"/api/jobs/{job.pk}/cancel").status_code == 409

    with django_capture_on_commit_callbacks(execute=False):
        retried = api.post(f"/api/jobs/{job.pk}/retry")
    assert retried.status_code == 201, retried.content
    new_job = Job.objects.get(pk=retried.json()["id"])
    assert new_job.pk != job.pk and new_job.status == "queued" and new_job.spec == job.spec and new_job.name == "first"
    assert api.post(f"/api/jobs/{new_job.pk}/retry").status_code == 409


def test_a_job_is_paused_and_resumed(api, job, django_capture_on_commit_callbacks):
    assert api.post(f"/api/jobs/{job.pk}/resume").status_code == 409
    paused = api.post(f"/api/jobs/{job.pk}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    with django_capture_on_commit_callbacks(execute=False) as sent:
        resumed = api.post(f"/api/jobs/{job.pk}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued" and len(sent) == 1


def test_artifacts_are_listed_and_downloaded(api, job, artifact):
    listed = api.get(f"/api/jobs/{job.pk}/artifacts").json()
    assert [(row["id"], row["kind"], row["download_name"]) for row in listed] == [(artifact.pk, "adapter", "first-adapter.zip")]
    download = api.get(f"/api/artifacts/{artifact.pk}/download")
    assert download.status_code == 200 and b"".join(download.streaming_content) == b"zip"
    assert 'filename="first-adapter.zip"' in download["Content-Disposition"]


def test_workers_are_for_staff_only(api, team_user, django_user_model):
    Worker.objects.create(hostname="gpu-1@box", queues="training")
    assert api.get("/api/workers").status_code == 403
    staff = django_user_model.objects.create_user("root", is_staff=True)
    assert [row["hostname"] for row in client_with_token(staff).get("/api/workers").json()] == ["gpu-1@box"]


def test_a_logged_in_browser_user_is_let_in_by_the_session(client, team_user, catalogue):
    client.force_login(team_user)
    assert client.get("/api/base-models").status_code == 200


def test_no_token_a_wrong_token_or_a_revoked_token_is_a_401(team_user, catalogue):
    row, token = ApiToken.issue(team_user, "soon revoked")
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/base-models").status_code == 200
    row.revoke()
    for client in (Client(), Client(HTTP_AUTHORIZATION="Bearer td-wrong"), Client(HTTP_AUTHORIZATION=f"Bearer {token}")):
        assert client.get("/api/base-models").status_code == 401


def api_routes_with_an_id(schema):
    """Every (method, path) of the generated schema whose path names an object."""
    for path, operations in schema["paths"].items():
        if "{" in path:
            for method in operations:
                yield method, path


def test_another_teams_objects_answer_404_on_every_api_route(client, dataset, job, artifact, other_team_user):
    sweep = Sweep.objects.create(team=job.team, base_spec=job.spec, grid={"method.r": [4]})
    alices = {"dataset": dataset, "job": job, "artifact": artifact, "sweep": sweep}
    bob = client_with_token(other_team_user)
    routes = list(api_routes_with_an_id(client.get("/api/openapi.json").json()))
    assert len(routes) >= 8
    for method, path in routes:
        def alices_id(match):
            kind = OBJECT_OF_PARAMETER.get(match.group(1))
            assert kind, f"{path} takes {match.group(1)!r}, an id of an unknown kind: add it to OBJECT_OF_PARAMETER"
            return str(alices[kind].pk)

        url = re.sub(r"\{(\w+)\}", alices_id, path)
        response = getattr(bob, method)(url)
        assert response.status_code == 404, f"{method.upper()} {url} answered {response.status_code}"
    job.refresh_from_db()
    assert job.status == "queued" and Job.objects.count() == 1


def test_the_schema_lists_every_route_and_the_docs_page_serves_swagger_locally(client):
    schema = client.get("/api/openapi.json").json()
    assert {(method, path) for path, operations in schema["paths"].items() for method in operations} == {
        ("post", "/api/datasets"), ("get", "/api/datasets"), ("get", "/api/datasets/{dataset_id}"),
        ("get", "/api/base-models"),
        ("post", "/api/jobs"), ("get", "/api/jobs"), ("get", "/api/jobs/{job_id}"),
        ("get", "/api/jobs/{job_id}/metrics"), ("get", "/api/jobs/{job_id}/events"),
        ("post", "/api/jobs/{job_id}/cancel"), ("post", "/api/jobs/{job_id}/retry"),
        ("post", "/api/jobs/{job_id}/pause"), ("post", "/api/jobs/{job_id}/resume"),
        ("get", "/api/jobs/{job_id}/artifacts"), ("get", "/api/artifacts/{artifact_id}/download"),
        ("get", "/api/workers"),
        ("post", "/api/sweeps"), ("get", "/api/sweeps/{sweep_id}"),
    }
    docs = client.get("/api/docs").content.decode()
    assert "swagger-ui-bundle.js" in docs and "cdn." not in docs
