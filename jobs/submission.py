"""Turning a validated JobSpec into a queued job, for the form and the API alike."""

from django.db import transaction

from .datasets import FORMATS, KIND_OF_TASK
from .models import BaseModel, Dataset, Job, JobEvent
from .spec import TASK_LABELS, JobSpec


class SubmissionError(Exception):
    def __init__(self, field, message):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def check_against_catalogue(team, spec: JobSpec):
    """What pydantic cannot know: that the model and dataset exist, belong and fit together."""
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
    return base_model, dataset


def submit_job(team, user, spec: JobSpec, name=""):
    base_model, dataset = check_against_catalogue(team, spec)
    with transaction.atomic():
        job = Job.objects.create(
            team=team,
            created_by=user,
            name=name,
            base_model=base_model,
            dataset=dataset,
            spec=spec.model_dump(mode="json"),
            status=Job.Status.QUEUED,
        )
        JobEvent.objects.create(
            job=job, kind=JobEvent.Kind.STATUS, to_status=Job.Status.QUEUED, message=f"queued by {user}"
        )
        transaction.on_commit(lambda: enqueue(job))
    return job


def enqueue(job):
    from workers.tasks import run_job

    run_job.apply_async(args=[job.pk], queue=job.queue)
