"""Turning a validated JobSpec into a queued job, for the form and the API alike."""

from django.conf import settings
from django.db import transaction

from .datasets import FORMATS, KIND_OF_TASK
from .models import BaseModel, Dataset, Job, JobEvent, Team
from .placement import TooFewGpus, WontFit, gigabytes, place
from .spec import TASK_LABELS, JobSpec


class SubmissionError(Exception):
    def __init__(self, field, message):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class QuotaExceeded(SubmissionError):
    """The job is fine, the team has too many waiting (HTTP 429, not 400)."""

    def __init__(self, message):
        super().__init__(None, message)


def check_queue_quota(team):
    if team.max_queued_jobs is None:
        return
    queued = Job.objects.filter(team=team, status=Job.Status.QUEUED).count()
    if queued >= team.max_queued_jobs:
        raise QuotaExceeded(
            f"team {team.name} already has {queued} queued job(s), its quota is {team.max_queued_jobs}; "
            "wait for one to start or cancel one"
        )


def check_against_catalogue(team, spec: JobSpec):
    """What pydantic cannot know: the site's limits, and that the model and dataset exist, belong and fit together."""
    if spec.hyperparameters.max_seq_length > settings.MAX_SEQ_LENGTH:
        raise SubmissionError(
            "hyperparameters.max_seq_length",
            f"max_seq_length is {spec.hyperparameters.max_seq_length}; the limit here is {settings.MAX_SEQ_LENGTH}",
        )
    base_model = BaseModel.objects.filter(name=spec.base_model).first()
    if base_model is None:
        names = ", ".join(BaseModel.objects.values_list("name", flat=True)) or "none yet"
        raise SubmissionError("base_model", f"no base model named {spec.base_model!r} (catalogue: {names})")
    if base_model.task != spec.task:
        raise SubmissionError(
            "task", f"{base_model.name} is for {TASK_LABELS[base_model.task]}, not {TASK_LABELS[spec.task]}"
        )
    dataset = Dataset.objects.filter(pk=spec.dataset, team=team).first()
    if dataset is None:
        raise SubmissionError("dataset", f"no dataset with id {spec.dataset} in team {team}")
    if not dataset.is_valid:
        raise SubmissionError(
            "dataset", f"dataset {dataset.name!r} has {dataset.problem_count} problem(s); fix the file and upload it again"
        )
    needed_kind = KIND_OF_TASK[spec.task]
    if FORMATS[dataset.format][0] != needed_kind:
        raise SubmissionError(
            "dataset", f"dataset {dataset.name!r} is in {dataset.format} format, which does not fit {TASK_LABELS[spec.task]}"
        )
    validation_dataset = None
    if spec.validation_dataset is not None:
        validation_dataset = Dataset.objects.filter(pk=spec.validation_dataset, team=team).first()
        if validation_dataset is None:
            raise SubmissionError("validation_dataset", f"no dataset with id {spec.validation_dataset} in team {team}")
        if not validation_dataset.is_valid or validation_dataset.kind != dataset.kind:
            raise SubmissionError(
                "validation_dataset",
                f"dataset {validation_dataset.name!r} cannot validate this job: it must be valid and of the same "
                f"kind as {dataset.name!r} ({dataset.format})",
            )
    reference_dataset = None
    if spec.reference_dataset is not None:
        reference_dataset = Dataset.objects.filter(pk=spec.reference_dataset, team=team).first()
        if reference_dataset is None:
            raise SubmissionError("reference_dataset", f"no dataset with id {spec.reference_dataset} in team {team}")
        if not reference_dataset.is_valid or reference_dataset.kind != "sft":
            raise SubmissionError(
                "reference_dataset",
                f"dataset {reference_dataset.name!r} cannot serve the forgetting check: it must be a valid text "
                "dataset (text, prompt/completion, alpaca or chat)",
            )
    check_method_fits_model(base_model, spec.method)
    return base_model, dataset, validation_dataset, reference_dataset


def check_method_fits_model(base_model, method):
    """Refuse at the door what the engine would only find out after loading the model."""
    info = base_model.architecture_info
    if not info:
        return
    linear_modules = info.get("linear_modules", [])
    short_names = sorted({name.rsplit(".", 1)[-1] for name in linear_modules})
    targets = getattr(method, "target_modules", None)
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_modules)]
        if unknown:
            raise SubmissionError(
                "target_modules",
                f"{', '.join(unknown)} not found in {base_model.name}; its linear layers are: {', '.join(short_names)}",
            )
    elif targets is not None and info.get("family") is None:
        raise SubmissionError(
            "target_modules",
            f"presets are defined for Llama- and BERT-style models; for {base_model.name} give a custom list "
            f"from: {', '.join(short_names)}",
        )
    if method.type == "qlora" and not linear_modules:
        raise SubmissionError("bits", f"QLoRA quantizes linear layers and {base_model.name} has none")
    hidden_size = info.get("hidden_size")
    if method.type == "adapter" and hidden_size and method.bottleneck_size and method.bottleneck_size > hidden_size:
        raise SubmissionError(
            "bottleneck_size",
            f"bottleneck_size {method.bottleneck_size} is larger than {base_model.name}'s hidden size "
            f"{hidden_size}; a bottleneck must be smaller",
        )


def check_placement(base_model, spec):
    """The queue for the job and its memory estimate; refused when no worker could hold it."""
    try:
        return place(base_model, spec)
    except TooFewGpus as refusal:
        raise SubmissionError("gpus", str(refusal)) from None
    except WontFit as refusal:
        raise SubmissionError(None, str(refusal)) from None


def submit_job(team, user, spec: JobSpec, name=""):
    base_model, dataset, validation_dataset, reference_dataset = check_against_catalogue(team, spec)
    placement = check_placement(base_model, spec)
    with transaction.atomic():
        # One submission of a team at a time from counting its queue to adding to it: two at once would both
        # find room for one more and together pass the quota (a burst through the API did, see bench/load.py).
        check_queue_quota(Team.objects.select_for_update().get(pk=team.pk))
        job = Job.objects.create(
            team=team,
            created_by=user,
            name=name,
            base_model=base_model,
            dataset=dataset,
            validation_dataset=validation_dataset,
            reference_dataset=reference_dataset,
            spec=spec.model_dump(mode="json"),
            status=Job.Status.QUEUED,
            queue=placement.queue,
            estimated_memory_mb=placement.estimate.total_mb if placement.estimate else None,
        )
        JobEvent.objects.create(
            job=job,
            kind=JobEvent.Kind.STATUS,
            to_status=Job.Status.QUEUED,
            message=f"queued by {user} on {placement.queue}{describe_gpus(spec)}{describe_fit(placement)}",
        )
        transaction.on_commit(lambda: enqueue(job))
    return job


def describe_gpus(spec):
    return f" for {spec.gpus} GPUs" if spec.gpus > 1 else ""


def describe_fit(placement):
    if placement.estimate is None:
        return ""
    fit = f"; {placement.workers_that_fit} of {placement.workers_known} workers fit it" if placement.workers_known else ""
    return f" (needs about {gigabytes(placement.estimate.total_mb)} on a GPU{fit})"


# The Redis transport serves message priority 0 first and 9 last; a job's priority is the other way
# round (higher starts sooner, 0 by default), so a default job sits in the middle, at
# CELERY_TASK_DEFAULT_PRIORITY, and every step up or down moves it one list nearer or further.
MIDDLE_BROKER_PRIORITY = 5


def broker_priority(job_priority):
    return min(9, max(0, MIDDLE_BROKER_PRIORITY - job_priority))


def enqueue(job):
    from workers.tasks import run_job

    # The message carries the priority it was sent for, so that after a change the superseded
    # message knows it must not start the job (see lifecycle.claim).
    run_job.apply_async(args=[job.pk, job.priority], queue=job.queue, priority=broker_priority(job.priority))


class PriorityNotChanged(Exception):
    pass


def change_priority(job, priority, by_user):
    """Give a queued job a new priority and queue a new message for it at that priority."""
    if priority == job.priority:
        return job
    with transaction.atomic():
        changed = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(priority=priority)
        if not changed:
            raise PriorityNotChanged(f"job {job.display_name} is no longer queued; its priority cannot change")
        JobEvent.objects.create(job=job, message=f"priority changed from {job.priority} to {priority} by {by_user}")
        job.refresh_from_db()
        transaction.on_commit(lambda: enqueue(job))
    return job
