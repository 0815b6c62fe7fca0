"""Celery tasks. Messages carry only a job id; the database says what to do with it."""

import functools
import logging
import threading
from pathlib import Path

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.utils import timezone

from jobs import lifecycle, placement, storage, submission
from jobs.models import Artifact, Job, Worker
from jobs.spec import JobSpec
from webapp.log_format import job_logging_context

from . import heartbeat, reconciler
from .runner import run_claimed_job

log = logging.getLogger(__name__)
MAINTENANCE_QUEUE = "maintenance"
INFERENCE_QUEUE = "inference"


@shared_task(bind=True, name="workers.tasks.run_job", acks_late=True, max_retries=None)
def run_job(self, job_id, priority=None):
    with job_logging_context(job_id):  # every line logged while this message is handled names the job
        return handle_job_message(self, job_id, priority)


def handle_job_message(task, job_id, priority):
    # A retry goes back at the job's place in the queue order, not at the broker's default.
    come_back_later = {"countdown": settings.QUOTA_RETRY_SECONDS}
    if priority is not None:
        come_back_later["priority"] = submission.broker_priority(priority)
    if must_wait_for_quota(job_id):
        raise task.retry(**come_back_later)
    hostname = task.request.hostname or "unknown"
    worker = Worker.objects.filter(hostname=hostname).first() or heartbeat.register(hostname, ["training"])
    if too_small_for(job_id, worker):
        raise task.retry(**come_back_later)
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
    """True when this worker lacks the GPUs or the memory the queued job needs; the message goes back for a larger one."""
    job = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).select_related("base_model").first()
    if job is None:
        return False
    spec = JobSpec.model_validate(job.spec)
    if not placement.has_gpus_for(worker, spec):
        note = (f"waiting: {worker.hostname} has {worker.gpu_count} GPU(s) and this job asks for {spec.gpus}; "
                "left for a larger worker")
    elif worker.capacity_mb is None or placement.fits_in_memory(worker, job.base_model, spec):
        return False
    else:
        note = f"waiting: {worker.hostname} has too little memory for this job; left for a larger worker"
    if not job.events.filter(message=note).exists():
        lifecycle.log_event(job, note)
    return True


@shared_task(name="workers.tasks.reconcile")
def reconcile():
    return str(reconciler.reconcile())


@shared_task(name="workers.tasks.apply_retention")
def apply_retention():
    return storage.apply_retention()


def _trains(queues):
    return any(queue not in (MAINTENANCE_QUEUE, INFERENCE_QUEUE) for queue in queues)


@worker_ready.connect
def _register_worker(sender, **kwargs):
    queues = [queue.name for queue in sender.task_consumer.queues]
    # Only training workers are listed on the Workers page (and placed jobs on): the housekeeping
    # worker is not a GPU worker, and an inference worker's queue takes no training jobs.
    if _trains(queues):
        heartbeat.start(sender.hostname, queues)


@worker_shutdown.connect
def _unregister_worker(sender, **kwargs):
    heartbeat.stop(sender.hostname)


# --- the playground ---

# Under --pool threads, two requests would swap adapters under each other; under --pool solo it is never contended.
_one_request_at_a_time = threading.Lock()


@functools.cache
def resident_models():
    """The models this worker process keeps loaded between playground requests."""
    # Imported here: torch and transformers load on inference workers, never in the web app.
    from .inference import ResidentModels

    return ResidentModels()


@shared_task(
    bind=True, name="workers.tasks.answer_in_playground", ignore_result=False, track_started=True,
    # A request nobody is waiting for any more is not worth redelivering after a lost worker.
    acks_late=False,
)
def answer_in_playground(self, job_ids, inputs):
    """The base model's answer, then each finished job's, to one playground request.

    Runs on an inference worker (`-Q inference --pool solo`), which keeps the base model loaded
    and swaps the jobs' adapters on it. `inputs` is a causal LM's prompt and sampling settings
    ({"prompt", "sampling": {"temperature", "max_new_tokens", "seed"}}) or a classifier's text
    ({"text"}). The result, read by the playground page, is {"answers": [...]}, or
    {"error": why} for a request that cannot be answered as asked.
    """
    from . import inference

    jobs = Job.objects.filter(pk__in=job_ids, status=Job.Status.SUCCEEDED).select_related("base_model")
    jobs = sorted(jobs, key=lambda job: job_ids.index(job.pk))
    if len(jobs) != len(job_ids) or len({job.base_model_id for job in jobs}) != 1:
        return {"error": "the jobs are no longer all finished jobs of one base model; open the playground again"}
    base_model = jobs[0].base_model
    cache_dir = Path(settings.INFERENCE_CACHE_DIR) / (self.request.hostname or "worker")
    try:
        with _one_request_at_a_time:
            answers = resident_models().answer(
                base_model.path, base_model.task, [fine_tuned_of(job, cache_dir) for job in jobs],
                base_name=base_model.name, prompt=inputs.get("prompt"), text=inputs.get("text"),
                sampling=inference.Sampling(**inputs.get("sampling", {})),
            )
    except inference.UnusableRequest as problem:
        return {"error": str(problem)}
    for answer, job in zip(answers[1:], jobs):
        answer |= {"job_id": job.pk, "method_label": job.method_label}
    return {"answers": answers, "worker": self.request.hostname}


def fine_tuned_of(job, cache_dir):
    """The job's adapter artifact, unpacked into this worker's cache (once per artifact)."""
    from .inference import FineTuned, UnusableRequest, extract_artifact

    artifact = job.artifacts.filter(kind=Artifact.Kind.ADAPTER).order_by("-id").first()
    if artifact is None:
        raise UnusableRequest(f"{job.display_name} has no artifact to answer with")
    directory = extract_artifact(lambda: artifact.file.open("rb"), cache_dir / f"artifact-{artifact.pk}")
    return FineTuned(key=f"artifact-{artifact.pk}", name=job.display_name, method=job.method_name, directory=directory)
