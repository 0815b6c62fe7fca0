"""The reconciler against real rows and a real Redis: lost workers' jobs, lost messages."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs import lifecycle
from jobs.models import Checkpoint, Job, Worker
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset
from webapp.celery import app
from workers import reconciler


@pytest.fixture
def broker(redis_url, settings):
    settings.CELERY_BROKER_URL = redis_url
    app.conf.broker_url = redis_url
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    return redis_url


@pytest.fixture
def submit(team_user, catalogue, data_dirs, broker):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4)

    def submit_one(name):
        return submit_job(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=dataset.pk), name=name)

    return submit_one


def silent_worker():
    return Worker.objects.create(hostname="gone@h", last_heartbeat=timezone.now() - timedelta(minutes=10))


def running_on(job, worker, step):
    job = lifecycle.claim(job.pk, worker)
    Job.objects.filter(pk=job.pk).update(step=step)
    job.refresh_from_db()
    return job


def test_a_job_of_a_silent_worker_is_queued_again_to_resume_from_its_checkpoint(
    submit, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        job = running_on(submit("long"), silent_worker(), step=12)
    Checkpoint.objects.create(job=job, step=10, path="checkpoints/step-000010", file="checkpoints/x.zip")

    result = reconciler.reconcile()
    job.refresh_from_db()
    assert result.workers_marked_offline == 1 and result.requeued == [job.pk]
    assert job.status == "queued" and job.worker is None
    assert job.events.order_by("-id").first().message == (
        "requeued at step 12: gone@h stopped answering; continues from the checkpoint at step 10"
    )
    assert job.pk in reconciler.job_ids_in_broker(), "a worker gets a message to resume it"


def test_a_job_that_keeps_losing_its_worker_fails_with_that_reason(submit, settings):
    settings.TUNEDECK_MAX_LOST_ATTEMPTS = 2
    job = submit("unlucky")
    for _ in range(2):
        running_on(job, silent_worker() if not Worker.objects.exists() else Worker.objects.get(), step=3)
        reconciler.reconcile()
    job.refresh_from_db()
    assert job.status == "failed" and job.error_message == "lost its worker 2 times, last at step 3 (gone@h stopped answering)"


def test_cancel_or_pause_asked_of_a_lost_job_takes_effect(submit):
    worker = silent_worker()
    cancelled, paused = running_on(submit("a"), worker, 4), running_on(submit("b"), worker, 4)
    lifecycle.request_cancel(cancelled)
    lifecycle.request_pause(paused)
    reconciler.reconcile()
    assert Job.objects.get(pk=cancelled.pk).status == "cancelled"
    assert Job.objects.get(pk=paused.pk).status == "paused"


def test_a_live_workers_job_is_left_alone(submit):
    worker = Worker.objects.create(hostname="alive@h", last_heartbeat=timezone.now())
    job = running_on(submit("fine"), worker, 7)
    assert reconciler.reconcile().requeued == []
    assert Job.objects.get(pk=job.pk).status == "running"


def test_queued_jobs_whose_messages_redis_lost_are_sent_again_once(submit, settings, django_capture_on_commit_callbacks):
    settings.QUEUED_MESSAGE_GRACE_SECONDS = 0
    with django_capture_on_commit_callbacks(execute=True):
        first, second = submit("first"), submit("second")
    assert reconciler.job_ids_in_broker() == {first.pk, second.pk}
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()  # as an empty restart does
    with django_capture_on_commit_callbacks(execute=True):
        after_the_restart = submit("third")

    assert sorted(reconciler.reconcile().messages_resent) == sorted([first.pk, second.pk])
    assert reconciler.job_ids_in_broker() == {first.pk, second.pk, after_the_restart.pk}
    assert reconciler.reconcile().messages_resent == [], "a job with a message gets no second one"
    assert second.events.filter(message__contains="not in the broker").count() == 1


def test_operators_run_it_by_hand(submit, capsys):
    running_on(submit("x"), silent_worker(), 1)
    call_command("reconcile")
    assert "1 worker(s) marked offline; jobs requeued: [" in capsys.readouterr().out
