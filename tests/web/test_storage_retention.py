"""Retention and a team's storage use, on real files in local storage."""

import os
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from jobs.models import Artifact, BaseModel, Checkpoint, Job
from jobs.spec import JobSpec
from jobs.storage import apply_retention, storage_use
from jobs.uploads import store_dataset


@pytest.fixture
def team(team_user, data_dirs):
    return team_user.memberships.get().team


@pytest.fixture
def make_job(team, team_user):
    """make_job(status, finished_days_ago) -> a job with an artifact, two checkpoints and a log, all stored."""
    base_model = BaseModel.objects.create(name="tiny", path="/nowhere", task="causal_lm_sft", architecture="llama")
    dataset = store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4)

    def make(status, finished_days_ago=None):
        finished_at = timezone.now() - timedelta(days=finished_days_ago) if finished_days_ago is not None else None
        spec = JobSpec(base_model="tiny", dataset=dataset.pk, method={"type": "lora", "r": 4}).model_dump(mode="json")
        job = Job.objects.create(team=team, created_by=team_user, base_model=base_model, dataset=dataset, spec=spec,
                                 status=status, finished_at=finished_at)
        artifact = Artifact(job=job, kind="adapter", size=7, sha256="0" * 64)
        artifact.file.save("adapter.zip", ContentFile(b"adapter"), save=True)
        for step in (1, 2):
            checkpoint = Checkpoint(job=job, step=step, path=f"checkpoints/step-{step}", size=10)
            checkpoint.file.save("checkpoint.zip", ContentFile(b"checkpoint"), save=True)
        job.log_file.save("trainer.log", ContentFile(b"loss went down\n"), save=False)
        job.log_size = 15
        job.save()
        return job

    return make


def stored(field_file):
    return bool(field_file.name) and default_storage.exists(field_file.name)


def test_checkpoint_files_of_jobs_finished_long_ago_go_and_their_rows_stay(make_job, settings):
    settings.CHECKPOINT_RETENTION_DAYS = 30
    old = make_job("succeeded", finished_days_ago=31)
    recent = make_job("failed", finished_days_ago=29)
    paused = make_job("paused")  # it will resume from its checkpoints, however old they are
    Checkpoint.objects.filter(job=paused).update(created_at=timezone.now() - timedelta(days=90))
    old_files = [checkpoint.file.name for checkpoint in old.checkpoints.all()]

    assert apply_retention() == {"checkpoint_files_deleted": 2, "orphaned_files_deleted": 0}

    assert [checkpoint.file.name for checkpoint in old.checkpoints.all()] == ["", ""]
    assert [checkpoint.size for checkpoint in old.checkpoints.all()] == [10, 10]
    assert not any(default_storage.exists(name) for name in old_files)
    assert all(stored(artifact.file) for artifact in Artifact.objects.all())  # artifacts are not checkpoints
    assert stored(Job.objects.get(pk=old.pk).log_file)
    for job in (recent, paused):
        assert all(stored(checkpoint.file) for checkpoint in job.checkpoints.all())


def test_retention_zero_keeps_checkpoints_forever(make_job, settings):
    settings.CHECKPOINT_RETENTION_DAYS = 0
    job = make_job("succeeded", finished_days_ago=1000)
    assert apply_retention()["checkpoint_files_deleted"] == 0
    assert all(stored(checkpoint.file) for checkpoint in job.checkpoints.all())


def test_orphaned_files_older_than_a_day_are_swept_named_and_young_ones_stay(make_job, settings, tmp_path):
    job = make_job("succeeded", finished_days_ago=1)
    orphan = default_storage.save("artifacts/team-1/job-999/left-behind.zip", ContentFile(b"x"))
    being_stored = default_storage.save("checkpoints/team-1/job-998/just-written.zip", ContentFile(b"x"))
    outside = default_storage.save("elsewhere/not-ours.txt", ContentFile(b"x"))
    a_week_ago = (timezone.now() - timedelta(days=7)).timestamp()
    for name in [orphan, outside, job.log_file.name, *[c.file.name for c in job.checkpoints.all()]]:
        os.utime(default_storage.path(name), (a_week_ago, a_week_ago))

    call_command("apply_retention")

    assert not default_storage.exists(orphan)
    assert default_storage.exists(being_stored) and default_storage.exists(outside)
    assert stored(job.log_file) and all(stored(checkpoint.file) for checkpoint in job.checkpoints.all())


def test_deleting_a_finished_job_removes_its_files(client, team_user, make_job, django_capture_on_commit_callbacks):
    job = make_job("succeeded", finished_days_ago=0)
    other = make_job("succeeded", finished_days_ago=0)
    names = [job.log_file.name, *Artifact.objects.filter(job=job).values_list("file", flat=True),
             *job.checkpoints.values_list("file", flat=True)]
    client.force_login(team_user)
    page = client.get(reverse("job_detail", args=[job.pk])).content.decode()
    assert "Delete job" in page

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("job_delete", args=[job.pk]), follow=True)

    assert f"{job.display_name} deleted" in response.content.decode()
    assert not Job.objects.filter(pk=job.pk).exists()
    assert len(names) == 4 and not any(default_storage.exists(name) for name in names)
    assert stored(other.log_file) and all(stored(checkpoint.file) for checkpoint in other.checkpoints.all())
    assert job.dataset.file and stored(job.dataset.file)  # the dataset is the team's, not the job's


def test_an_active_job_or_another_teams_job_cannot_be_deleted(client, team_user, other_team_user, make_job):
    running = make_job("running")
    client.force_login(team_user)
    response = client.post(reverse("job_delete", args=[running.pk]), follow=True)
    assert "is running: cancel it first" in response.content.decode()
    assert "Delete job" not in response.content.decode()
    assert Job.objects.filter(pk=running.pk).exists() and stored(running.log_file)

    finished = make_job("succeeded", finished_days_ago=0)
    client.force_login(other_team_user)
    assert client.post(reverse("job_delete", args=[finished.pk])).status_code == 404
    assert Job.objects.filter(pk=finished.pk).exists()


def test_the_team_page_shows_its_storage_use_from_one_query(client, team, team_user, other_team_user, make_job,
                                                           django_assert_num_queries):
    make_job("succeeded", finished_days_ago=0)
    let_go = make_job("succeeded", finished_days_ago=0)
    Checkpoint.objects.filter(job=let_go, step=1).update(file="")  # a file let go no longer counts
    other_team = other_team_user.memberships.get().team
    store_dataset(other_team, other_team_user, "big.jsonl", b'{"text": "x"}\n' * 1000)

    with django_assert_num_queries(1):
        use = storage_use(team)
    dataset_bytes = len(b'{"prompt": "2+2=", "completion": "4"}\n' * 4)
    assert use == {"datasets": dataset_bytes, "artifacts": 14, "checkpoints": 30, "logs": 30,
                   "total": dataset_bytes + 74}

    client.force_login(team_user)
    page = client.get(reverse("team_detail")).content.decode()
    assert "<dt>Checkpoints</dt><dd>30\xa0bytes</dd>" in page
    assert f"<dt>In all</dt><dd>{dataset_bytes + 74}\xa0bytes</dd>" in page


def test_a_team_with_nothing_stored_uses_zero_bytes(team):
    assert storage_use(team) == {"datasets": 0, "artifacts": 0, "checkpoints": 0, "logs": 0, "total": 0}
