"""The one place where a job's status changes.

Every change is a compare-and-set on the status the caller saw, checked against
the table of allowed transitions, and writes a JobEvent in the same
transaction. Claiming a queued job is such a change, which is what makes a
second delivery of the same Celery message do nothing.
"""

from django.db import transaction
from django.utils import timezone

from .models import Job, JobEvent
from .submission import enqueue

Status = Job.Status

ALLOWED_TRANSITIONS = {
    Status.QUEUED: {Status.RUNNING, Status.PAUSED, Status.CANCELLED},
    # Back to QUEUED when its worker is lost (workers/reconciler.py); the next one resumes it.
    Status.RUNNING: {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.PAUSED, Status.QUEUED},
    # Resuming queues the job again; a worker continues it from its last checkpoint.
    Status.PAUSED: {Status.QUEUED, Status.CANCELLED},
    Status.SUCCEEDED: set(),
    Status.FAILED: set(),
    Status.CANCELLED: set(),
}
TERMINAL_STATUSES = {status for status, targets in ALLOWED_TRANSITIONS.items() if not targets}


class TransitionNotAllowed(Exception):
    pass


class JobChangedMeanwhile(Exception):
    """Somebody else changed the job's status between our read and our write."""


def transition(job, to_status, message, only_if=None, **fields):
    """Move `job` from the status it has in memory to `to_status`, or raise.

    `only_if` holds more field values the row must still have for the change to happen.
    """
    from_status = job.status
    if to_status not in ALLOWED_TRANSITIONS[from_status]:
        raise TransitionNotAllowed(f"a {from_status} job cannot become {to_status}")
    now = timezone.now()
    if to_status == Status.RUNNING:
        fields.setdefault("started_at", now)
    if to_status in TERMINAL_STATUSES:
        fields.setdefault("finished_at", now)
    with transaction.atomic():
        still = Job.objects.filter(pk=job.pk, status=from_status, **(only_if or {}))
        changed = still.update(status=to_status, **fields)
        if not changed:
            raise JobChangedMeanwhile(f"job {job.pk} is no longer {from_status}")
        JobEvent.objects.create(
            job=job, kind=JobEvent.Kind.STATUS, from_status=from_status, to_status=to_status, message=message
        )
    job.refresh_from_db()
    return job


def claim(job_id, worker, sent_priority=None):
    """Take a queued job for `worker`; None if it is gone, no longer queued, or the message is stale.

    A priority change queues a second message; the first one, sent for the old priority,
    must not start the job, or a lowered job would still start at its old place in the queue.
    The priority is part of the compare-and-set, so a change racing with the claim cannot slip
    through. (None claims at any priority: for operators and tests, not for messages.)
    """
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status != Status.QUEUED or job.cancel_requested_at:
        return None
    still = {"cancel_requested_at": None}
    if sent_priority is not None:
        still["priority"] = sent_priority
    try:
        return transition(job, Status.RUNNING, f"started on {worker.hostname}", only_if=still, worker=worker)
    except (TransitionNotAllowed, JobChangedMeanwhile):
        return None


def request_cancel(job, by_user=None):
    """Cancel a queued or paused job at once; ask the worker of a running job to stop it."""
    who = f" by {by_user}" if by_user else ""
    if job.status in (Status.QUEUED, Status.PAUSED):
        try:
            return transition(
                job, Status.CANCELLED, f"cancelled{who} while {job.status}", cancel_requested_at=timezone.now()
            )
        except JobChangedMeanwhile:
            job.refresh_from_db()
    if job.status == Status.RUNNING:
        if not job.cancel_requested_at:
            Job.objects.filter(pk=job.pk).update(cancel_requested_at=timezone.now())
            JobEvent.objects.create(job=job, message=f"cancel requested{who}; stopping the trainer")
        job.refresh_from_db()
        return job
    raise TransitionNotAllowed(f"a {job.status} job cannot be cancelled")


def request_pause(job, by_user=None):
    """Pause a queued job at once; ask the worker of a running one to stop at a checkpoint."""
    who = f" by {by_user}" if by_user else ""
    if job.status == Status.QUEUED:
        try:
            return transition(job, Status.PAUSED, f"paused{who} before it started")
        except JobChangedMeanwhile:
            job.refresh_from_db()
    if job.status == Status.RUNNING:
        if not job.pause_requested_at and not job.cancel_requested_at:
            Job.objects.filter(pk=job.pk).update(pause_requested_at=timezone.now())
            JobEvent.objects.create(job=job, message=f"pause requested{who}; the trainer stops at a checkpoint")
        job.refresh_from_db()
        return job
    if job.status == Status.PAUSED:
        return job
    raise TransitionNotAllowed(f"a {job.status} job cannot be paused")


def resume(job, by_user=None):
    """Queue a paused job again; the worker that takes it continues from the last checkpoint."""
    if job.status != Status.PAUSED:
        raise TransitionNotAllowed(f"a {job.status} job cannot be resumed; only a paused one")
    who = f" by {by_user}" if by_user else ""
    with transaction.atomic():
        job = transition(job, Status.QUEUED, f"resumed{who}", pause_requested_at=None)
        transaction.on_commit(lambda: enqueue(job))
    return job


def log_event(job, message, kind=JobEvent.Kind.INFO):
    return JobEvent.objects.create(job=job, kind=kind, message=message)
