"""The OpenAI-compatible fine-tuning API under /v1, for the official `openai` client.

Auth is a TuneDeck API token as the bearer key; files and jobs are those of the
token user's teams, through jobs.teams (another team's id answers 404). Errors
have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

- Files are datasets, `file-<pk>`. An upload that fails validation answers 400
  naming the first problems by line; the dataset row is kept (status "error"),
  like an upload in the UI, so the whole report stays visible on its page.
- Jobs are jobs, `ftjob-<pk>`. Status mapping (TuneDeck -> OpenAI):
  queued -> "queued", running -> "running", succeeded -> "succeeded",
  failed -> "failed", cancelled -> "cancelled", paused -> "paused" (a status the
  client's type does not list yet; its models keep unknown values as they are).
- learning_rate = learning_rate_multiplier x BASE_LEARNING_RATE (the JobSpec
  default, 2e-4); "auto" is the JobSpec default of each hyperparameter.
- Extra body fields: `adapter` is the PEFT method, a JobSpec method section
  ({"type": "lora"|"qlora"|"dora"|"adapter"|"ia3"|"prefix"|"prompt"|"full", ...}),
  LoRA by default; `extra_hyperparameters` holds JobSpec hyperparameters that
  OpenAI has no name for (max_steps, max_seq_length, checkpoint_every, ...);
  `gpus` is the JobSpec's GPU count (1 by default, up to 8 on one worker).
  With the `openai` client: `extra_body={"adapter": {...}, "gpus": 2}`.
- Pause stops a running job after its current step, at a checkpoint (a queued
  job pauses at once); resume queues it again and a worker continues from that
  checkpoint, with the optimizer, scheduler, RNG and data position it had.
"""

import functools
import json
import re
from typing import Literal

from django.conf import settings
from django.db.models import ProtectedError
from django.http import FileResponse, Http404, JsonResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError, field_validator

from . import lifecycle
from .api_auth import token_user
from .models import BaseModel, Dataset, Job, JobEvent, Metric
from .spec import Hyperparameters, JobSpec, refuse_unstorable_text
from .submission import QuotaExceeded, SubmissionError, submit_job
from .teams import current_team, get_visible_or_404, visible
from .uploads import store_dataset

BASE_LEARNING_RATE = Hyperparameters().learning_rate
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
PROBLEMS_IN_MESSAGE = 5


def error_response(status, message, param=None, code=None, error_type="invalid_request_error"):
    return JsonResponse(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}, status=status
    )


def api_view(*methods):
    """Token auth, allowed methods, and Http404 in OpenAI's error shape; no CSRF, as there are no cookies."""

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            user = token_user(request)
            if user is None:
                return error_response(
                    401, "Incorrect or revoked API key; create a token on the API tokens page.", code="invalid_api_key"
                )
            request.user = user
            if request.method not in methods:
                return error_response(405, f"{request.method} is not allowed here; use {', '.join(methods)}")
            try:
                return view(request, *args, **kwargs)
            except Http404 as not_found:
                return error_response(404, str(not_found) or "not found", code="not_found")

        wrapper.allowed_methods = methods  # for the isolation test, which tries every route with each
        return wrapper

    return decorate


def unix(moment):
    return int(moment.timestamp()) if moment else None


def pk_from_id(object_id, prefix, what):
    match = re.fullmatch(rf"{prefix}-(\d+)", object_id or "")
    if match is None:
        raise Http404(f"No {what} found with id '{object_id}'.")
    return int(match.group(1))


def page(request, queryset, prefix, what):
    """OpenAI's cursor pagination over a queryset ordered newest first by pk: `limit`, `after`."""
    try:
        limit = min(MAX_PAGE_SIZE, max(1, int(request.GET.get("limit", DEFAULT_PAGE_SIZE))))
    except ValueError:
        limit = DEFAULT_PAGE_SIZE
    if request.GET.get("after"):
        queryset = queryset.filter(pk__lt=pk_from_id(request.GET["after"], prefix, what))
    rows = list(queryset.order_by("-pk")[: limit + 1])
    return rows[:limit], len(rows) > limit


def list_response(data, has_more):
    return JsonResponse({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    })


# Files -------------------------------------------------------------------------------------------

def first_problems(dataset):
    return "; ".join(
        f"line {problem['line']}: {problem['message']}" if problem.get("line") else problem["message"]
        for problem in dataset.problems[:PROBLEMS_IN_MESSAGE]
    )


def file_object(dataset):
    return {
        "id": f"file-{dataset.pk}",
        "object": "file",
        "bytes": dataset.size,
        "created_at": unix(dataset.created_at),
        "filename": dataset.original_filename,
        "purpose": "fine-tune",
        "status": "processed" if dataset.is_valid else "error",
        "status_details": None if dataset.is_valid else f"{dataset.problem_count} problem(s): {first_problems(dataset)}",
        "expires_at": None,
    }


def get_dataset(request, file_id):
    return get_visible_or_404(request.user, Dataset.objects.all(), pk=pk_from_id(file_id, "file", "file"))


@api_view("GET", "POST")
def files(request):
    if request.method == "GET":
        datasets = visible(request.user, Dataset.objects.all())
        rows, has_more = page(request, datasets, "file", "file")
        return list_response([file_object(dataset) for dataset in rows], has_more)
    upload = request.FILES.get("file")
    if upload is None:
        return error_response(400, "send the file as multipart field 'file'", param="file", code="missing_file")
    if request.POST.get("purpose") != "fine-tune":
        return error_response(400, "TuneDeck stores files for purpose 'fine-tune' only", param="purpose")
    team = current_team(request.user)
    if team is None:
        return error_response(400, "you belong to no team yet; ask an admin to add you to one")
    if upload.size > settings.DATASET_MAX_BYTES:
        # Refused before it is read or stored, as on the upload page.
        return error_response(
            413, f"{upload.name} is {upload.size:,} bytes; the limit is {settings.DATASET_MAX_BYTES:,}",
            param="file", code="file_too_large",
        )
    dataset = store_dataset(team, request.user, upload.name, upload.read())
    if not dataset.is_valid:
        return error_response(
            400,
            f"{upload.name} is not a valid training file ({dataset.problem_count} problem(s), kept as "
            f"file-{dataset.pk}): {first_problems(dataset)}",
            param="file",
            code="invalid_file",
        )
    return JsonResponse(file_object(dataset))


@api_view("GET", "DELETE")
def file_detail(request, file_id):
    dataset = get_dataset(request, file_id)
    if request.method == "GET":
        return JsonResponse(file_object(dataset))
    stored_file = dataset.file
    try:
        dataset.delete()
    except ProtectedError:
        # Jobs keep their datasets so a finished job can always say what it was trained on.
        return error_response(
            409, f"{file_id} is used by fine-tuning jobs and cannot be deleted", param="file_id", code="file_in_use"
        )
    stored_file.delete(save=False)
    return JsonResponse({"id": file_id, "object": "file", "deleted": True})


@api_view("GET")
def file_content(request, file_id):
    dataset = get_dataset(request, file_id)
    return FileResponse(dataset.file.open("rb"), content_type="application/octet-stream")


# Fine-tuning jobs --------------------------------------------------------------------------------

Auto = Literal["auto"]


class OpenAIHyperparameters(Schema):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | int = "auto"
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"


class Supervised(Schema):
    hyperparameters: OpenAIHyperparameters = OpenAIHyperparameters()


class Method(Schema):
    type: Literal["supervised"]
    supervised: Supervised = Supervised()


class CreateJob(Schema):
    """The body of POST /v1/fine_tuning/jobs: OpenAI's fields plus TuneDeck's `adapter`, `extra_hyperparameters`
    and `gpus`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None  # accepted for compatibility; TuneDeck does not store it
    adapter: dict = {}
    extra_hyperparameters: dict = {}
    gpus: int = 1  # checked, with its range, by the JobSpec

    # The model name is looked up and the suffix stored before the JobSpec checks its own text.
    _storable_text = field_validator("*")(refuse_unstorable_text)


# Where a JobSpec field comes from in the request, so an error names what the caller sent.
PARAM_OF_SPEC_FIELD = {
    "base_model": "model",
    "task": "model",
    "dataset": "training_file",
    "validation_dataset": "validation_file",
    "hyperparameters.epochs": "hyperparameters.n_epochs",
    "hyperparameters.batch_size": "hyperparameters.batch_size",
    "hyperparameters.learning_rate": "hyperparameters.learning_rate_multiplier",
    "hyperparameters.seed": "seed",
}


def param_of(spec_field):
    if spec_field in PARAM_OF_SPEC_FIELD:
        return PARAM_OF_SPEC_FIELD[spec_field]
    if spec_field == "method" or spec_field.startswith("method."):
        # pydantic puts the method's tag after "method"; the caller wrote adapter.<field>.
        return ".".join(["adapter", *spec_field.split(".")[2:]])
    if spec_field.startswith("hyperparameters."):
        return "extra_hyperparameters." + spec_field.split(".", 1)[1]
    if spec_field in ("target_modules", "bits", "bottleneck_size"):
        return f"adapter.{spec_field}"
    return spec_field or None


def validation_error_response(error, param_for=lambda field: field):
    first = error.errors()[0]
    param = param_for(".".join(str(part) for part in first["loc"])) or None
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


def spec_from_request(body):
    """Build the JobSpec the request describes; raises pydantic's ValidationError or SubmissionError."""
    if body.hyperparameters and body.method:
        raise SubmissionError("hyperparameters", "give hyperparameters in method.supervised or at the top level, not both")
    given = body.method.supervised.hyperparameters if body.method else body.hyperparameters or OpenAIHyperparameters()
    hyperparameters = dict(body.extra_hyperparameters)
    if given.n_epochs != "auto":
        hyperparameters["epochs"] = given.n_epochs
    if given.batch_size != "auto":
        hyperparameters["batch_size"] = given.batch_size
    if given.learning_rate_multiplier != "auto":
        hyperparameters["learning_rate"] = given.learning_rate_multiplier * BASE_LEARNING_RATE
    if body.seed is not None:
        hyperparameters["seed"] = body.seed
    base_model = BaseModel.objects.filter(name=body.model).first()
    return JobSpec.model_validate({
        "base_model": body.model,
        # The client has no task field: the catalogue entry says what the model is for.
        "task": base_model.task if base_model else "causal_lm_sft",
        "dataset": file_pk(body.training_file, "training_file"),
        "validation_dataset": file_pk(body.validation_file, "validation_file") if body.validation_file else None,
        "method": body.adapter or {"type": "lora"},
        "hyperparameters": hyperparameters,
        "gpus": body.gpus,
    })


def file_pk(file_id, field):
    match = re.fullmatch(r"file-(\d+)", file_id)
    if match is None:
        raise SubmissionError(field, f"{file_id!r} is not a file id; upload the file first and pass its id (file-…)")
    return int(match.group(1))


def fine_tuned_model_name(job):
    name = f"ft:{job.base_model.name}:{job.team.name}"
    return f"{name}:{job.name}:job-{job.pk}" if job.name else f"{name}:job-{job.pk}"


def job_object(job):
    spec = JobSpec.model_validate(job.spec)
    hyperparameters = {
        "n_epochs": spec.hyperparameters.epochs,
        "batch_size": spec.hyperparameters.batch_size,
        "learning_rate_multiplier": spec.hyperparameters.learning_rate / BASE_LEARNING_RATE,
    }
    succeeded = job.status == Job.Status.SUCCEEDED
    eta = job.eta
    return {
        "id": f"ftjob-{job.pk}",
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "finished_at": unix(job.finished_at),
        "error": (
            {"code": "training_failed", "message": job.error_message or "the job failed", "param": None}
            if job.status == Job.Status.FAILED else None
        ),
        "fine_tuned_model": fine_tuned_model_name(job) if succeeded else None,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "adapter": spec.method.model_dump(mode="json"),
        "gpus": spec.gpus,
        "model": job.base_model.name,
        "organization_id": job.team.name,
        # Adapters download through the web app; they are not files of the Files API.
        "result_files": [],
        "seed": spec.hyperparameters.seed,
        "status": job.status,  # TuneDeck's states carry OpenAI's names, see the module docstring
        "trained_tokens": job.tokens_seen if succeeded else None,
        "training_file": f"file-{job.dataset_id}",
        "validation_file": f"file-{job.validation_dataset_id}" if job.validation_dataset_id else None,
        "estimated_finish": unix(timezone.now() + eta) if eta else None,
        "user_provided_suffix": job.name or None,
        "integrations": [],
        "metadata": None,
    }


def get_job(request, job_id):
    return get_visible_or_404(
        request.user, Job.objects.select_related("base_model", "team"), pk=pk_from_id(job_id, "ftjob", "job")
    )


@api_view("GET", "POST")
def jobs(request):
    if request.method == "GET":
        queryset = visible(request.user, Job.objects.select_related("base_model", "team"))
        rows, has_more = page(request, queryset, "ftjob", "job")
        return list_response([job_object(job) for job in rows], has_more)
    team = current_team(request.user)
    if team is None:
        return error_response(400, "you belong to no team yet; ask an admin to add you to one")
    try:
        data = json.loads(request.body or b"{}")
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, or nested or numbered past the parser
        return error_response(400, f"the body is not JSON: {error}")
    try:
        body = CreateJob.model_validate(data)
    except ValidationError as error:
        return validation_error_response(error)
    try:
        job = submit_job(team, request.user, spec_from_request(body), name=body.suffix or "")
    except ValidationError as error:
        return validation_error_response(error, param_of)
    except QuotaExceeded as error:
        return error_response(429, error.message, code="quota_exceeded")
    except SubmissionError as error:
        return error_response(400, error.message, param=param_of(error.field))
    return JsonResponse(job_object(job))


@api_view("GET")
def job_detail(request, job_id):
    return JsonResponse(job_object(get_job(request, job_id)))


@api_view("POST")
def job_cancel(request, job_id):
    job = get_job(request, job_id)
    try:
        lifecycle.request_cancel(job, by_user=request.user)
    except lifecycle.TransitionNotAllowed as error:
        return error_response(400, str(error), param="fine_tuning_job_id", code="job_not_cancellable")
    return JsonResponse(job_object(job))


@api_view("POST")
def job_pause_or_resume(request, job_id, action):
    job = get_job(request, job_id)
    change, refusal_code = {
        "pause": (lifecycle.request_pause, "job_not_pausable"),
        "resume": (lifecycle.resume, "job_not_resumable"),
    }[action]
    try:
        job = change(job, by_user=request.user)
    except lifecycle.TransitionNotAllowed as error:
        return error_response(400, str(error), param="fine_tuning_job_id", code=refusal_code)
    return JsonResponse(job_object(job))


def metric_time(job, step):
    """Metric rows carry no time of their own; place a step between the job's start and end by its progress."""
    start = job.started_at or job.created_at
    end = job.finished_at or timezone.now()
    share = min(1.0, step / job.total_steps) if job.total_steps else 1.0
    return start + (end - start) * share


def job_events_newest_first(job):
    events = [
        {
            "id": f"ftevent-{event.pk}",
            "object": "fine_tuning.job.event",
            "created_at": event.created_at,
            "level": "error" if event.kind == JobEvent.Kind.ERROR or event.to_status == Job.Status.FAILED else "info",
            "message": event.message,
            "type": "message",
            "data": {"from_status": event.from_status, "to_status": event.to_status} if event.to_status else {},
        }
        for event in job.events.all()
    ]
    total = job.total_steps or "?"
    for metric in job.metrics.filter(train_loss__isnull=False):
        events.append({
            "id": f"ftmetric-{metric.pk}",
            "object": "fine_tuning.job.event",
            "created_at": metric_time(job, metric.step),
            "level": "info",
            "message": f"Step {metric.step}/{total}: training loss={metric.train_loss:.4f}",
            "type": "metrics",
            "data": {"step": metric.step, "train_loss": metric.train_loss, "total_steps": job.total_steps},
        })
    # Ties (a status event and a step in the same instant) fall back on the id, stable across pages.
    events.sort(key=lambda event: (event["created_at"], event["id"]), reverse=True)
    return events


@api_view("GET")
def job_events(request, job_id):
    events = job_events_newest_first(get_job(request, job_id))
    after = request.GET.get("after")
    if after:
        ids = [event["id"] for event in events]
        if after not in ids:
            raise Http404(f"No event found with id '{after}'.")
        events = events[ids.index(after) + 1:]
    try:
        limit = min(MAX_PAGE_SIZE, max(1, int(request.GET.get("limit", DEFAULT_PAGE_SIZE))))
    except ValueError:
        limit = DEFAULT_PAGE_SIZE
    data = [event | {"created_at": unix(event["created_at"])} for event in events[:limit]]
    return list_response(data, len(events) > limit)


@api_view("GET")
def job_checkpoints(request, job_id):
    job = get_job(request, job_id)
    rows, has_more = page(request, job.checkpoints.all(), "ftckpt", "checkpoint")
    losses = dict(
        Metric.objects.filter(job=job, step__in=[row.step for row in rows], train_loss__isnull=False)
        .values_list("step", "train_loss")
    )
    model_name = fine_tuned_model_name(job)
    return list_response([
        {
            "id": f"ftckpt-{checkpoint.pk}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": unix(checkpoint.created_at),
            "fine_tuned_model_checkpoint": f"{model_name}:ckpt-step-{checkpoint.step}",
            "fine_tuning_job_id": f"ftjob-{job.pk}",
            "metrics": {"step": checkpoint.step, "train_loss": losses.get(checkpoint.step)},
            "step_number": checkpoint.step,
        }
        for checkpoint in rows
    ], has_more)


urlpatterns = [
    path("files", files),
    path("files/<str:file_id>", file_detail),
    path("files/<str:file_id>/content", file_content),
    path("fine_tuning/jobs", jobs),
    path("fine_tuning/jobs/<str:job_id>", job_detail),
    path("fine_tuning/jobs/<str:job_id>/cancel", job_cancel),
    path("fine_tuning/jobs/<str:job_id>/pause", job_pause_or_resume, {"action": "pause"}),
    path("fine_tuning/jobs/<str:job_id>/resume", job_pause_or_resume, {"action": "resume"}),
    path("fine_tuning/jobs/<str:job_id>/events", job_events),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", job_checkpoints),
]
