"""Team quotas: queued jobs are capped at submission (429 on the API), running jobs at claim time."""

import json

import pytest
from django.urls import reverse

from jobs import lifecycle
from jobs.models import ApiToken, Job, JobEvent, Worker
from jobs.uploads import store_dataset
from workers.tasks import must_wait_for_quota


@pytest.fixture
def team(team_user):
    return team_user.memberships.get().team


@pytest.fixture
def training_file(team, team_user, data_dirs):
    return store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)


def job_body(training_file):
    return {"model": "tiny-random-llama", "training_file": f"file-{training_file.pk}"}


def test_a_submission_beyond_the_queued_quota_gets_429_with_the_reason(
    client, team, team_user, catalogue, training_file, django_capture_on_commit_callbacks
):
    team.max_queued_jobs = 1
    team.save()
    _, token = ApiToken.issue(team_user, "tests")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    with django_capture_on_commit_callbacks(execute=False):
        first = client.post("/v1/fine_tuning/jobs", json.dumps(job_body(training_file)), "application/json", **headers)
        second = client.post("/v1/fine_tuning/jobs", json.dumps(job_body(training_file)), "application/json", **headers)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["message"] == (
        "team acme already has 1 queued job(s), its quota is 1; wait for one to start or cancel one"
    )
    assert Job.objects.count() == 1

    # The web form says the same, and a cancelled job frees the slot.
    client.force_login(team_user)
    form = {"base_model": "tiny-random-llama", "dataset": training_file.pk, "method": "lora", "epochs": 1,
            "batch_size": 2, "learning_rate": 0.01, "max_seq_length": 32, "warmup_steps": 0, "eval_fraction": 0,
            "checkpoint_every": 50, "seed": 1, "target_preset": "attention_qv"}
    response = client.post(reverse("job_new"), form)
    assert "its quota is 1" in str(response.context["form"].non_field_errors())
    lifecycle.request_cancel(Job.objects.get())
    with django_capture_on_commit_callbacks(execute=False):
        assert client.post(reverse("job_new"), form).status_code == 302


def test_a_job_of_a_team_at_its_running_quota_waits_in_the_queue(team, team_user, catalogue, training_file, settings):
    from jobs.spec import JobSpec
    from jobs.submission import submit_job

    team.max_running_jobs = 1
    team.save()
    spec = JobSpec.model_validate({"base_model": "tiny-random-llama", "dataset": training_file.pk})
    running = submit_job(team, team_user, spec)
    lifecycle.claim(running.pk, Worker.objects.create(hostname="w1@h"))
    waiting = submit_job(team, team_user, spec)

    # What run_job asks before claiming; True sends the message back to the queue for a while.
    assert must_wait_for_quota(waiting.pk) and must_wait_for_quota(waiting.pk)
    waiting.refresh_from_db()
    assert waiting.status == "queued"
    assert JobEvent.objects.filter(job=waiting, message="waiting: team acme is at its quota of running jobs").count() == 1

    lifecycle.transition(Job.objects.get(pk=running.pk), "succeeded", "done")
    assert not must_wait_for_quota(waiting.pk)
