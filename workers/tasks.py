"""Celery tasks. Messages carry only a job id; the database says what to do with it."""

import logging
from datetime import timedelta

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.utils import timezone

from jobs import lifecycle, placement, submission
from jobs.models import Job, Worker
from jobs.spec import JobSpec

from . import heartbeat
from .runner import run_claimed_job

log = logging.getLogger(__name__)
MAINTENANCE_QUEUE = "maintenance"


@shared_task(bind=True, name="workers.tasks.run_job", acks_late=True, max_retries=None)
def run_job(self, job_id, priority=None):
    # A retry goes back at the job's place in the queue order, not at the broker's default.
    come_back_later = {"countdown": settings.QUOTA_RETRY_SECONDS}
    if priority is not None:
        come_back_later["priority"] = submission.broker_priority(priority)
    if must_wait_for_quota(job_id):
        raise self.retry(**come_back_later)
    hostname = self.request.hostname or "unknown"
    worker = Worker.objects.filter(hostname=hostname).first() or heartbeat.register(hostname, ["training"])
    if too_small_for(job_id, worker):
        raise self.retry(**come_back_later)
    job = lifecycle.claim(job_id, worker, sent_priority=priority)
    if job is None:
        log.info("job %s is not claimable (taken, finished, cancelled or re-queued at another priority); nothing to do", job_id)
        return "skipped"
    Worker.objects.filter(pk=worker.pk).update(current_job=job)
    try:
        job = run_claimed_job(job)
    except Exception as exc:
        log.exception("job %s: the worker failed while running it", job_id)
        job.refresh_from_db()
        if job.status == Job.Status.RUNNING:
            lifecycle.transition(job, Job.Status.FAILED, f"worker error: {exc}", error_message=str(exc))
    finally:
        Worker.objects.filter(pk=worker.pk).update(current_job=None, last_heartbeat=timezone.now())
    return job.status


def must_wait_for_quota(job_id):
    """True when the job's team already runs as many jobs as its quota allows (said once in its events)."""
    job = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).select_related("team").first()
    if job is None or job.team.max_running_jobs is None:
        return False
    if Job.objects.filter(team=job.team, status=Job.Status.RUNNING).count() < job.team.max_running_jobs:
        return False
    if not job.events.filter(message__startswith="waiting:").exists():
        lifecycle.log_event(job, f"waiting: team {job.team} is at its quota of running jobs")
    return True


def too_small_for(job_id, worker):
    """True when this worker lacks the memory the queued job needs; the message goes back for a larger one."""
    job = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).select_related("base_model").first()
    if job is None or worker.capacity_mb is None:
        return False
    if placement.fits(worker, job.base_model, JobSpec.model_validate(job.spec)):
        return False
    note = f"waiting: {worker.hostname} has too little memory for this job; left for a larger worker"
    if not job.events.filter(message=note).exists():
        lifecycle.log_event(job, note)
    return True


@shared_task(name="workers.tasks.mark_silent_workers_offline")
def mark_silent_workers_offline():
    silent_since = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_SECONDS)
    return Worker.objects.filter(is_online=True, last_heartbeat__lt=silent_since).update(is_online=False)


def _trains(queues):
    return any(queue != MAINTENANCE_QUEUE for queue in queues)


@worker_ready.connect
def _register_worker(sender, **kwargs):
    queues = [queue.name for queue in sender.task_consumer.queues]
    # Only training workers are listed on the Workers page; the housekeeping one is not a GPU worker.
    if _trains(queues):
        heartbeat.start(sender.hostname, queues)


@worker_shutdown.connect
def _unregister_worker(sender, **kwargs):
    heartbeat.stop(sender.hostname)
