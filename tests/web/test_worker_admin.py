"""Staff actions on workers and queued jobs, the Workers page, and queue depths read from the real Redis.

No worker process here: drain and resume against live workers are in tests/integration/test_worker_drain.py.
"""

import pytest
from django.test import Client
from django.urls import reverse

from jobs import lifecycle, worker_admin
from jobs.models import Job, Worker
from jobs.spec import JobSpec
from jobs.submission import broker_priority, submit_job
from jobs.uploads import store_dataset
from jobs.worker_control import queue_depths


@pytest.fixture
def broker(redis_url, settings):
    """The test Redis as Celery's broker, emptied."""
    from webapp.celery import app

    settings.CELERY_BROKER_URL = redis_url
    app.conf.broker_url = redis_url
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    return app


@pytest.fixture
def staff_user(db, django_user_model):
    return django_user_model.objects.create_user("sam", password="staff-42", is_staff=True)


@pytest.fixture
def staff(staff_user):
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def member(team_user):
    client = Client()
    client.force_login(team_user)
    return client


@pytest.fixture
def queued_job(team_user, catalogue, data_dirs, broker):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)

    def make(name):
        return submit_job(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=dataset.pk), name=name)

    return make


@pytest.fixture
def busy_worker(queued_job):
    worker = Worker.objects.create(hostname="gpu-1@host", queues="training")
    job = lifecycle.claim(queued_job("running").pk, worker)
    Worker.objects.filter(pk=worker.pk).update(current_job=job)
    return worker


def routes_of_worker_admin():
    for pattern in worker_admin.urlpatterns:
        yield "/" + str(pattern.pattern).replace("<int:pk>", "{pk}")


def test_every_staff_action_is_a_404_for_anyone_else(member, busy_worker, queued_job, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        waiting = queued_job("waiting")
    ids = {"workers": busy_worker.pk, "jobs": waiting.pk}
    routes = list(routes_of_worker_admin())
    assert len(routes) == 4
    for route in routes:
        url = route.format(pk=ids[route.split("/")[1]])
        for method in ("get", "post"):
            assert getattr(member, method)(url, {"priority": 5}).status_code == 404, f"{method} {url}"
    waiting.refresh_from_db()
    busy_worker.refresh_from_db()
    assert waiting.priority == 0 and not busy_worker.is_draining and busy_worker.current_job.cancel_requested_at is None


def test_members_see_workers_and_queue_depths_read_only_staff_see_actions(member, staff, busy_worker, queued_job):
    page = member.get(reverse("worker_list")).content.decode()
    assert "gpu-1@host" in page and 'id="queue-depths"' in page
    assert "Drain" not in page and "Cancel current job" not in page

    page = staff.get(reverse("worker_list")).content.decode()
    assert reverse("worker_drain", args=[busy_worker.pk]) in page
    assert reverse("worker_cancel_job", args=[busy_worker.pk]) in page


def test_staff_cancel_a_workers_current_job(staff, busy_worker):
    response = staff.post(reverse("worker_cancel_job", args=[busy_worker.pk]))
    assert response.status_code == 302
    job = Job.objects.get(name="running")
    assert job.status == "running" and job.cancel_requested_at is not None  # the worker stops the trainer


def test_queue_depth_counts_the_messages_waiting_in_redis(staff, queued_job, broker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        for name in ("a", "b", "c"):
            queued_job(name)
    assert queue_depths() == {"training": 3}
    page = staff.get(reverse("worker_list")).content.decode()
    assert "<td>training</td><td>3</td>" in page


def test_the_broker_priority_reverses_ours_over_the_whole_range():
    assert [broker_priority(p) for p in worker_admin.PRIORITY_RANGE] == list(range(9, -1, -1))
    assert broker_priority(0) == 5


def waiting_job_ids_in_delivery_order(app):
    """Take every waiting run_job message off the training queue, in the order a worker would get them."""
    ids = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("training")
        while True:
            try:
                message = queue.get(block=False)
            except queue.Empty:
                return ids
            ids.append(message.payload[0][0])
            message.ack()


def test_staff_raise_a_queued_jobs_priority_and_it_is_delivered_first(
    staff, queued_job, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        first, second, third = queued_job("first"), queued_job("second"), queued_job("third")
        response = staff.post(reverse("job_priority", args=[third.pk]), {"priority": 3})
    assert response.status_code == 302
    third.refresh_from_db()
    assert third.priority == 3 and third.events.filter(message__startswith="priority changed from 0 to 3").exists()
    # Its old message is still in the queue, after the others; the claim skips it (next test).
    assert waiting_job_ids_in_delivery_order(broker) == [third.pk, first.pk, second.pk, third.pk]


def test_a_message_sent_for_an_old_priority_does_not_start_the_job(staff, queued_job):
    job = queued_job("lowered")
    staff.post(reverse("job_priority", args=[job.pk]), {"priority": -2})
    worker = Worker.objects.create(hostname="gpu-1@host")
    assert lifecycle.claim(job.pk, worker, sent_priority=0) is None
    assert lifecycle.claim(job.pk, worker, sent_priority=-2).status == "running"


def test_priority_cannot_change_once_running_or_outside_the_range(staff, busy_worker, queued_job):
    running = Job.objects.get(name="running")
    response = staff.post(reverse("job_priority", args=[running.pk]), {"priority": 2}, follow=True)
    assert "no longer queued" in response.content.decode()
    waiting = queued_job("waiting")
    response = staff.post(reverse("job_priority", args=[waiting.pk]), {"priority": 99}, follow=True)
    assert "less than or equal to 5" in response.content.decode()
    running.refresh_from_db()
    waiting.refresh_from_db()
    assert running.priority == waiting.priority == 0


def test_only_staff_see_the_priority_form_and_only_for_a_queued_job(staff, member, queued_job):
    job = queued_job("waiting")
    url = reverse("job_detail", args=[job.pk])
    assert reverse("job_priority", args=[job.pk]) in staff.get(url).content.decode()
    assert reverse("job_priority", args=[job.pk]) not in member.get(url).content.decode()
