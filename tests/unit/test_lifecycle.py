import pytest

from jobs import lifecycle
from jobs.models import BaseModel, Dataset, Job, JobEvent, Team, Worker

Status = Job.Status


@pytest.fixture
def job(db):
    team = Team.objects.create(name="t")
    model = BaseModel.objects.create(name="m", path="/nowhere", task="causal_lm_sft", architecture="llama")
    dataset = Dataset.objects.create(team=team, name="d", original_filename="d.jsonl", size=1, sha256="0" * 64,
                                     format="text", is_valid=True, rows=1)
    return Job.objects.create(team=team, base_model=model, dataset=dataset, spec={})


@pytest.fixture
def worker(db):
    return Worker.objects.create(hostname="w1@host")


def status_events(job):
    return list(JobEvent.objects.filter(job=job, kind="status").values_list("from_status", "to_status"))


def test_a_job_runs_and_succeeds_with_an_event_per_change(job, worker):
    claimed = lifecycle.claim(job.pk, worker)
    assert claimed.status == Status.RUNNING and claimed.worker == worker and claimed.started_at
    lifecycle.transition(claimed, Status.SUCCEEDED, "done")
    assert claimed.finished_at and claimed.status == Status.SUCCEEDED
    assert status_events(job) == [("queued", "running"), ("running", "succeeded")]


@pytest.mark.parametrize(
    "start, target",
    [
        (Status.QUEUED, Status.SUCCEEDED),
        (Status.QUEUED, Status.FAILED),
        (Status.SUCCEEDED, Status.RUNNING),
        (Status.FAILED, Status.QUEUED),
        (Status.CANCELLED, Status.RUNNING),
        (Status.SUCCEEDED, Status.CANCELLED),
    ],
)
def test_disallowed_transitions_raise_and_change_nothing(job, start, target):
    Job.objects.filter(pk=job.pk).update(status=start)
    job.refresh_from_db()
    with pytest.raises(lifecycle.TransitionNotAllowed, match=f"a {start} job cannot become {target}"):
        lifecycle.transition(job, target, "nope")
    job.refresh_from_db()
    assert job.status == start
    assert status_events(job) == []


def test_a_second_claim_of_the_same_job_gets_nothing(job, worker):
    other = Worker.objects.create(hostname="w2@host")
    assert lifecycle.claim(job.pk, worker) is not None
    assert lifecycle.claim(job.pk, other) is None
    job.refresh_from_db()
    assert job.worker == worker
    assert status_events(job) == [("queued", "running")]


def test_a_stale_copy_cannot_overwrite_a_newer_status(job, worker):
    stale = Job.objects.get(pk=job.pk)
    lifecycle.claim(job.pk, worker)
    with pytest.raises(lifecycle.JobChangedMeanwhile):
        lifecycle.transition(stale, Status.CANCELLED, "too late")
    assert Job.objects.get(pk=job.pk).status == Status.RUNNING


def test_cancel_of_a_queued_job_is_immediate_and_it_cannot_be_claimed(job, worker):
    lifecycle.request_cancel(job)
    assert job.status == Status.CANCELLED
    assert lifecycle.claim(job.pk, worker) is None


def test_cancel_of_a_running_job_is_a_request_to_the_worker(job, worker):
    running = lifecycle.claim(job.pk, worker)
    lifecycle.request_cancel(running)
    assert running.status == Status.RUNNING and running.cancel_requested_at
    assert JobEvent.objects.filter(job=job, message__startswith="cancel requested").count() == 1
    lifecycle.request_cancel(running)  # asking twice is harmless
    assert JobEvent.objects.filter(job=job, message__startswith="cancel requested").count() == 1


def test_a_finished_job_cannot_be_cancelled(job, worker):
    lifecycle.transition(lifecycle.claim(job.pk, worker), Status.FAILED, "boom")
    with pytest.raises(lifecycle.TransitionNotAllowed, match="a failed job cannot be cancelled"):
        lifecycle.request_cancel(job)


def test_a_message_sent_for_an_old_priority_cannot_claim_even_when_the_change_races_it(job, worker):
    read_before_the_change = Job.objects.get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(priority=3)  # the change lands between the claim's read and its write
    with pytest.raises(lifecycle.JobChangedMeanwhile):
        lifecycle.transition(read_before_the_change, Status.RUNNING, "stale", only_if={"priority": 0})
    assert lifecycle.claim(job.pk, worker, sent_priority=0) is None
    assert lifecycle.claim(job.pk, worker, sent_priority=3).status == Status.RUNNING


def test_pause_of_a_running_job_is_a_request_and_resume_queues_it_again(job, worker, django_capture_on_commit_callbacks):
    running = lifecycle.claim(job.pk, worker)
    lifecycle.request_pause(running, by_user="alice")
    assert running.status == Status.RUNNING and running.pause_requested_at
    lifecycle.request_pause(running)  # asking twice is harmless
    assert JobEvent.objects.filter(job=job, message__startswith="pause requested").count() == 1

    paused = lifecycle.transition(running, Status.PAUSED, "paused at step 3")
    with django_capture_on_commit_callbacks(execute=False) as sent:
        resumed = lifecycle.resume(paused, by_user="alice")
    assert resumed.status == Status.QUEUED and resumed.pause_requested_at is None and len(sent) == 1
    assert status_events(job) == [("queued", "running"), ("running", "paused"), ("paused", "queued")]
    assert lifecycle.claim(job.pk, worker).status == Status.RUNNING


def test_a_queued_job_pauses_at_once_and_a_paused_one_can_be_cancelled(job, worker):
    lifecycle.request_pause(job)
    assert job.status == Status.PAUSED
    assert lifecycle.claim(job.pk, worker) is None, "a paused job waits for resume"
    with pytest.raises(lifecycle.TransitionNotAllowed, match="only a paused one"):
        lifecycle.resume(lifecycle.request_cancel(job))
    assert job.status == Status.CANCELLED
