"""Bringing the broker and the workers back in line with the database, which holds the truth.

Run by beat every RECONCILE_SECONDS and by `manage.py reconcile`:

1. Workers whose heartbeat stopped are marked offline.
2. A running job whose worker went silent is queued again (a worker resumes it from
   its last checkpoint), or ends as cancelled or paused if that was asked for, or
   fails once it has lost its worker TUNEDECK_MAX_LOST_ATTEMPTS times.
3. A queued job with no message in Redis (Redis restarted empty, say) gets a new one.
   A second message for a job is harmless: only one claim can succeed.
"""

import base64
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from django.conf import settings
from kombu.exceptions import OperationalError
from django.db.models import Max, Q
from django.utils import timezone

from jobs import lifecycle
from jobs.models import Job, JobEvent, Worker
from jobs.submission import enqueue

log = logging.getLogger(__name__)
RUN_JOB_TASK = "workers.tasks.run_job"


@dataclass
class Reconciliation:
    workers_marked_offline: int = 0
    requeued: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    stopped: list = field(default_factory=list)  # cancelled or paused as asked, their worker gone
    messages_resent: list = field(default_factory=list)

    def __str__(self):
        return (
            f"{self.workers_marked_offline} worker(s) marked offline; jobs requeued: {self.requeued}, "
            f"failed: {self.failed}, cancelled or paused: {self.stopped}, messages sent again: {self.messages_resent}"
        )


def reconcile():
    result = Reconciliation()
    result.workers_marked_offline = mark_silent_workers_offline()
    for job in Job.objects.filter(status=Job.Status.RUNNING).filter(
        Q(worker__isnull=True) | Q(worker__is_online=False)
    ).select_related("worker"):
        try:
            handle_lost_job(job, result)
        except lifecycle.JobChangedMeanwhile:
            pass  # its worker reported after all
    resend_lost_messages(result)
    if result.requeued or result.failed or result.stopped or result.messages_resent or result.workers_marked_offline:
        log.warning("reconciled: %s", result)
    return result


def mark_silent_workers_offline():
    silent_since = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_SECONDS)
    return Worker.objects.filter(is_online=True, last_heartbeat__lt=silent_since).update(is_online=False)


def handle_lost_job(job, result):
    where = f"{job.worker.hostname} stopped answering" if job.worker else "its worker is gone"
    if job.cancel_requested_at:
        lifecycle.transition(job, Job.Status.CANCELLED, f"cancelled at step {job.step}; {where}")
        result.stopped.append(job.pk)
        return
    if job.pause_requested_at:
        lifecycle.transition(job, Job.Status.PAUSED, f"paused: {where}; resuming continues from the last checkpoint")
        result.stopped.append(job.pk)
        return
    lost_before = job.events.filter(from_status=Job.Status.RUNNING, to_status=Job.Status.QUEUED).count()
    if lost_before + 1 >= settings.TUNEDECK_MAX_LOST_ATTEMPTS:
        reason = f"lost its worker {lost_before + 1} times, last at step {job.step} ({where})"
        lifecycle.transition(job, Job.Status.FAILED, f"failed: {reason}", error_message=reason)
        result.failed.append(job.pk)
        return
    checkpoint = job.checkpoints.exclude(file="").aggregate(step=Max("step"))["step"]
    then = f"continues from the checkpoint at step {checkpoint}" if checkpoint else "starts again: no checkpoint yet"
    job = lifecycle.transition(job, Job.Status.QUEUED, f"requeued at step {job.step}: {where}; {then}", worker=None)
    enqueue(job)
    result.requeued.append(job.pk)


def resend_lost_messages(result):
    """Send a new message for each queued job that has none in the broker, past a grace period."""
    settled_before = timezone.now() - timedelta(seconds=settings.QUEUED_MESSAGE_GRACE_SECONDS)
    candidates = list(
        Job.objects.filter(status=Job.Status.QUEUED, created_at__lt=settled_before)
        .exclude(events__created_at__gte=settled_before, events__kind__in=[JobEvent.Kind.STATUS])
        .distinct()
    )
    if not candidates:
        return
    try:
        in_broker = job_ids_in_broker()
    except (redis.RedisError, OSError, OperationalError):
        log.exception("the broker cannot be read; queued jobs are left as they are")
        return
    for job in candidates:
        if job.pk not in in_broker:
            lifecycle.log_event(job, "its message was not in the broker (Redis restarted?); queued again")
            enqueue(job)
            result.messages_resent.append(job.pk)


def job_ids_in_broker():
    """Ids of the jobs with a run_job message in Redis: waiting in a queue, or delivered and not yet acknowledged."""
    from webapp.celery import app

    with app.connection_for_read() as connection:
        channel = connection.default_channel
        client = channel.client
        messages = []
        for key in client.scan_iter(_type="list"):
            messages += client.lrange(key, 0, -1)
        # The Redis transport keeps each delivered, unacknowledged message as [message, exchange, routing key].
        messages += [json.dumps(json.loads(entry)[0]) for entry in client.hvals(channel.unacked_key)]
    job_ids = set()
    for raw in messages:
        try:
            message = json.loads(raw)
            if message.get("headers", {}).get("task") != RUN_JOB_TASK:
                continue
            args = json.loads(base64.b64decode(message["body"]))[0]
            job_ids.add(int(args[0]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not a message of ours
    return job_ids
