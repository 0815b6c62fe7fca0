"""The /v1 routes' shapes and refusals, without a worker: the queued job is checked as a row."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Job
from jobs.uploads import store_dataset

CHAT_ROWS = (
    b'{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}, '
    b'{"role": "assistant", "content": "hello"}]}\n'
) * 4


@pytest.fixture
def training_file(team_user, data_dirs):
    team = team_user.memberships.get().team
    return store_dataset(team, team_user, "chat.jsonl", CHAT_ROWS)


def create_job(api, body, django_capture_on_commit_callbacks):
    # The message to Redis is sent on commit; these tests check the row, not the broker.
    with django_capture_on_commit_callbacks(execute=False):
        return api.post("/v1/fine_tuning/jobs", json.dumps(body), content_type="application/json")


def test_a_chat_jsonl_upload_becomes_a_valid_dataset(api, data_dirs):
    response = api.post("/v1/files", {"purpose": "fine-tune", "file": SimpleUploadedFile("chat.jsonl", CHAT_ROWS)})
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "processed" and response.json()["filename"] == "chat.jsonl"
    assert api.get("/v1/files").json()["data"][0]["id"] == response.json()["id"]


def test_an_upload_for_another_purpose_is_refused(api, data_dirs):
    response = api.post("/v1/files", {"purpose": "batch", "file": SimpleUploadedFile("chat.jsonl", CHAT_ROWS)})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"


def test_openai_hyperparameters_map_onto_the_job_spec(api, catalogue, training_file, django_capture_on_commit_callbacks):
    response = create_job(api, {
        "model": "tiny-random-llama",
        "training_file": f"file-{training_file.pk}",
        "suffix": "terse",
        "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 5,
        }}},
        "adapter": {"type": "ia3"},
        "extra_hyperparameters": {"max_steps": 7},
    }, django_capture_on_commit_callbacks)
    assert response.status_code == 200, response.content
    job = Job.objects.get()
    hyperparameters = job.spec["hyperparameters"]
    assert job.name == "terse" and job.spec["method"]["type"] == "ia3"
    assert hyperparameters["epochs"] == 2 and hyperparameters["batch_size"] == 8 and hyperparameters["seed"] == 3
    assert hyperparameters["learning_rate"] == pytest.approx(5 * 2e-4) and hyperparameters["max_steps"] == 7
    body = response.json()
    assert body["id"] == f"ftjob-{job.pk}" and body["status"] == "queued" and body["fine_tuned_model"] is None
    assert body["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": pytest.approx(5)}


@pytest.mark.parametrize("body, param", [
    ({"adapter": {"type": "lora", "target_modules": ["no_such_proj"]}}, "adapter.target_modules"),
    ({"adapter": {"type": "magic"}}, "adapter"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"extra_hyperparameters": {"max_seq_length": 1}}, "extra_hyperparameters.max_seq_length"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"training_file": "file-999999"}, "training_file"),
    ({"hyperparameters": {}, "method": {"type": "supervised"}}, "hyperparameters"),
])
def test_a_bad_job_is_refused_with_the_parameter_named(
    api, catalogue, training_file, django_capture_on_commit_callbacks, body, param
):
    response = create_job(
        api, {"model": "tiny-random-llama", "training_file": f"file-{training_file.pk}"} | body,
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param, response.json()
    assert not Job.objects.exists()


def test_pause_and_resume_a_queued_job(api, catalogue, training_file, django_capture_on_commit_callbacks):
    job_id = create_job(
        api, {"model": "tiny-random-llama", "training_file": f"file-{training_file.pk}"},
        django_capture_on_commit_callbacks,
    ).json()["id"]
    refused = api.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "job_not_resumable"

    paused = api.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"  # asking twice is fine

    with django_capture_on_commit_callbacks(execute=False) as sent:
        resumed = api.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert len(sent) == 1, "resuming queues a message for a worker"
    messages = [event["message"] for event in api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert messages[0].startswith("resumed by alice") and messages[1].startswith("paused by alice")

    api.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    refused = api.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "job_not_pausable"