"""Drain and resume, for real: two `celery worker` processes on one queue, drained through the Workers page."""

import pytest
from django.test import Client
from django.urls import reverse

from jobs.models import Job, Worker
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset
from tests.conftest import JOB_TIMEOUT, wait_for, wait_until_registered

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_drained_worker_takes_no_new_jobs_and_takes_them_again_when_resumed(
    team_user, django_user_model, catalogue, data_dirs, start_worker
):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 16)
    spec = JobSpec.model_validate({
        "base_model": "tiny-random-llama", "dataset": dataset.pk, "hyperparameters": {"max_steps": 2, "batch_size": 4},
    })
    staff = Client()
    staff.force_login(django_user_model.objects.create_user("sam", password="staff-42", is_staff=True))
    first, second = start_worker("first"), start_worker("second")
    first_row, second_row = wait_until_registered(first, second)
    # Both report what they run on (a CPU here, so the GPU fields stay empty) and their software.
    assert first_row.accelerator and set(first_row.software_versions) == {"torch", "transformers", "peft", "bitsandbytes"}

    assert staff.post(reverse("worker_drain", args=[first_row.pk])).status_code == 302
    first_row.refresh_from_db()
    assert first_row.is_draining, staff.get(reverse("worker_list")).content.decode()
    assert "draining" in staff.get(reverse("worker_list")).content.decode()

    jobs = [submit_job(team, team_user, spec, name=f"while-draining-{n}") for n in range(2)]
    for job in jobs:
        wait_for(lambda: Job.objects.get(pk=job.pk).status in ("succeeded", "failed"), JOB_TIMEOUT,
                 f"{job} to finish\n{second.log()}")
    assert {job.worker.hostname for job in Job.objects.filter(pk__in=[job.pk for job in jobs])} == {second.hostname}
    assert not Job.objects.filter(status="failed").exists(), Job.objects.filter(status="failed").first().error_message

    # Resume the first and drain the second: the next job can only go to the first.
    assert staff.post(reverse("worker_resume", args=[first_row.pk])).status_code == 302
    assert staff.post(reverse("worker_drain", args=[second_row.pk])).status_code == 302
    first_row.refresh_from_db()
    assert not first_row.is_draining
    job = submit_job(team, team_user, spec, name="after-resume")
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "succeeded", JOB_TIMEOUT, f"{job} to finish\n{first.log()}")
    assert Job.objects.get(pk=job.pk).worker.hostname == first.hostname
