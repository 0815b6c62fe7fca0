import csv

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_POST

from pydantic import ValidationError

from . import lifecycle, placement, storage, worker_control
from .charts import MAX_POINTS_PER_LINE, loss_chart
from .datasets import KIND_OF_TASK
from .forms import AddMemberForm, DatasetUploadForm, JobForm, TeamQuotaForm
from .models import ApiToken, Artifact, BaseModel, Checkpoint, Dataset, Job, Membership, Worker
from .spec import JobSpec
from .submission import SubmissionError, submit_job
from .teams import current_team, get_visible_or_404, visible


DASHBOARD_ACTIVE_SHOWN = 25


@login_required
def dashboard(request):
    jobs = visible(request.user, Job.objects.select_related("base_model", "dataset"))
    active = jobs.filter(status__in=Job.ACTIVE_STATUSES)
    # Running first ("running" sorts after "queued"), then the queue in the order workers take it.
    # A long queue is summed up rather than drawn again every 2 s.
    active_jobs = list(active.order_by("-status", "-priority", "created_at")[:DASHBOARD_ACTIVE_SHOWN])
    context = {
        "active_jobs": active_jobs,
        "more_active": active.count() - len(active_jobs),
        "recent_jobs": jobs.exclude(status__in=Job.ACTIVE_STATUSES).order_by("-finished_at")[:10],
        "workers": Worker.objects.select_related("current_job"),
        "team": current_team(request.user),
    }
    template = "jobs/_dashboard_live.html" if request.htmx else "jobs/dashboard.html"
    return render(request, template, context)


@login_required
def dataset_list(request):
    team = current_team(request.user)
    form = DatasetUploadForm()
    if request.method == "POST":
        form = DatasetUploadForm(request.POST, request.FILES)
        if team is None:
            form.add_error(None, "you belong to no team yet; ask an admin to add you to one")
        elif form.is_valid():
            dataset = form.save(team, request.user)
            if dataset.is_valid:
                messages.success(request, f"{dataset.name}: {dataset.rows} rows in {dataset.format} format")
            else:
                messages.error(request, f"{dataset.name} has {dataset.problem_count} problem(s); see below")
            return redirect("dataset_detail", dataset.pk)
    datasets = visible(request.user, Dataset.objects.all())
    return render(request, "jobs/dataset_list.html", {"datasets": datasets, "form": form})


@login_required
def dataset_detail(request, pk):
    dataset = get_visible_or_404(request.user, Dataset.objects.all(), pk=pk)
    return render(request, "jobs/dataset_detail.html", {"dataset": dataset})


@login_required
def job_list(request):
    jobs = visible(request.user, Job.objects.select_related("base_model", "dataset"))
    status = request.GET.get("status")
    if status in Job.Status.values:
        jobs = jobs.filter(status=status)
    jobs = list(jobs[:200])  # read once: the rows and whether any of them is still active
    template = "jobs/_job_rows.html" if request.htmx else "jobs/job_list.html"
    return render(request, template, {"jobs": jobs, "statuses": Job.Status.values, "status": status,
                                      "any_active": any(job.is_active for job in jobs)})


@login_required
def job_new(request):
    team = current_team(request.user)
    if team is None:
        messages.error(request, "you belong to no team yet; ask an admin to add you to one")
        return redirect("dashboard")
    form = JobForm(request.POST or None, team=team, initial=_new_job_initial(request.GET, team))
    if request.method == "POST" and form.is_valid():
        try:
            job = submit_job(team, request.user, form.spec, name=form.cleaned_data["name"])
        except SubmissionError as error:
            form.add_error(error.field if error.field in form.fields else None, error.message)
        else:
            messages.success(request, f"{job.display_name} is queued")
            return redirect("job_detail", job.pk)
    suggestions = {model.name: model.suggested_settings for model in BaseModel.objects.all()}
    return render(request, "jobs/job_new.html", {"form": form, "suggestions": suggestions})


@login_required
def job_estimate(request):
    """The new-job form's memory estimate, recomputed by htmx as the settings change."""
    team = current_team(request.user)
    form = JobForm(request.GET, team=team)
    form.is_valid()  # the estimate needs the model, method and sizes, not a dataset
    context = {"estimate": None}
    base_model = form.cleaned_data.get("base_model")
    if base_model is not None and not form.errors.keys() & {*form.HYPERPARAMETERS, "method"}:
        spec_data = form.spec_data() | {"dataset": 1, "validation_dataset": None, "export_merged": False}
        try:
            spec = JobSpec.model_validate(spec_data)
        except ValidationError:
            spec = None
        if spec is not None:
            estimate = placement.estimate_for(base_model, spec)
            # What a worker whose GPUs cannot hold the job whole would train it in (placement.shards_weights).
            sharded = None
            if estimate and placement.can_shard(spec):
                sharded = placement.estimate_for(base_model, spec, shards=spec.gpus)
            workers = [worker for worker in Worker.objects.all() if worker.capacity_mb]
            context = {
                "estimate": estimate,
                "parts": placement.describe_parts(estimate) if estimate else "",
                "total": placement.gigabytes(estimate.total_mb) if estimate else "",
                "sharded_total": placement.gigabytes(sharded.total_mb) if sharded else "",
                "workers_known": len(workers),
                "workers_that_fit": sum(placement.fits(worker, base_model, spec) for worker in workers),
                "gpus": spec.gpus,
                "workers_with_gpus": sum(placement.has_gpus_for(worker, spec) for worker in workers),
            }
    return render(request, "jobs/_memory_estimate.html", context)


def _new_job_initial(query, team):
    """Preselect the dataset asked for, a base model that fits it, and that model's suggested settings."""
    dataset = Dataset.objects.filter(team=team, is_valid=True, pk=query.get("dataset") or 0).first()
    base_model = BaseModel.objects.filter(name=query.get("base_model", "")).first()
    if base_model is None and dataset is not None:
        task = next(task for task, kind in KIND_OF_TASK.items() if kind == dataset.kind)
        base_model = BaseModel.objects.filter(task=task).first()
    base_model = base_model or BaseModel.objects.first()
    initial = dict(base_model.suggested_settings) if base_model else {}
    if base_model:
        initial["base_model"] = base_model.name
    if dataset:
        initial["dataset"] = dataset.pk
    return initial


def _job_context(request, pk):
    job = get_visible_or_404(request.user, Job.objects.select_related(
        "base_model", "dataset", "validation_dataset", "reference_dataset", "worker", "created_by",
    ), pk=pk)
    return {
        "job": job,
        "chart": loss_chart(list(job.metrics.loss_curve_points(MAX_POINTS_PER_LINE))),
        "events": list(job.events.order_by("-created_at", "-id")[:50]),
        "artifacts": list(job.artifacts.all()),
        "checkpoints": list(job.checkpoints.exclude(file="").order_by("-step")),
    }


@login_required
def job_detail(request, pk):
    return render(request, "jobs/job_detail.html", _job_context(request, pk))


@login_required
def job_live(request, pk):
    """The part of the job page that refreshes itself while the job runs."""
    return render(request, "jobs/_job_live.html", _job_context(request, pk))


@login_required
@require_POST
def job_action(request, pk, action):
    """Cancel, pause or resume a job; the page shows the result, or why it could not be done."""
    job = get_visible_or_404(request.user, Job.objects.all(), pk=pk)
    change = {"cancel": lifecycle.request_cancel, "pause": lifecycle.request_pause, "resume": lifecycle.resume}[action]
    try:
        job = change(job, by_user=request.user)
    except lifecycle.TransitionNotAllowed as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"{job.display_name}: {job.events.order_by('-id').first().message}")
    return redirect("job_detail", job.pk)


@login_required
@require_POST
def job_delete(request, pk):
    """Delete a finished job with its metrics, events, artifacts and checkpoints; their files leave storage too."""
    job = get_visible_or_404(request.user, Job.objects.all(), pk=pk)
    if job.status not in lifecycle.TERMINAL_STATUSES:
        messages.error(request, f"{job.display_name} is {job.status}: cancel it first, then delete it")
        return redirect("job_detail", job.pk)
    name = job.display_name  # before the delete, which forgets the pk a default name is made of
    job.delete()
    messages.success(request, f"{name} deleted")
    return redirect("job_list")


@login_required
def artifact_download(request, pk):
    artifact = get_visible_or_404(request.user, Artifact.objects.select_related("job"), pk=pk)
    return FileResponse(artifact.file.open("rb"), as_attachment=True, filename=artifact.download_name)


@login_required
def checkpoint_download(request, pk):
    checkpoint = get_visible_or_404(request.user, Checkpoint.objects.select_related("job").exclude(file=""), pk=pk)
    name = f"{checkpoint.job.display_name}-checkpoint-step-{checkpoint.step}.zip"
    return FileResponse(checkpoint.file.open("rb"), as_attachment=True, filename=name)


METRIC_COLUMNS = (
    "step", "epoch", "train_loss", "eval_loss", "eval_accuracy", "learning_rate", "tokens_per_sec", "mfu",
    "tokens_seen", "gpu_memory_mb", "cpu_memory_mb",
)


@login_required
def job_metrics_csv(request, pk):
    job = get_visible_or_404(request.user, Job.objects.all(), pk=pk)
    response = HttpResponse(content_type="text/csv")
    # The job's name is the user's: quoted as a header must (a quote or a newline in it would break the header).
    response["Content-Disposition"] = content_disposition_header(True, f"{job.display_name}-metrics.csv")
    writer = csv.writer(response)
    writer.writerow(METRIC_COLUMNS)
    writer.writerows(job.metrics.order_by("step", "id").values_list(*METRIC_COLUMNS))
    return response


@login_required
def job_log(request, pk):
    job = get_visible_or_404(request.user, Job.objects.exclude(log_file=""), pk=pk)
    return FileResponse(job.log_file.open("rb"), as_attachment=True, filename=f"{job.display_name}-trainer.log")


@login_required
def worker_list(request):
    """The Workers page; htmx polls it for its live part, so states and actions show as they take effect."""
    template = "jobs/_worker_list_live.html" if request.htmx else "jobs/worker_list.html"
    return render(request, template, {
        "workers": Worker.objects.select_related("current_job"),
        "queue_depths": worker_control.queue_depths(),
    })


@login_required
def token_list(request):
    """Create and list API tokens; a new token is shown on this response only, never again."""
    new_token = None
    if request.method == "POST":
        name = request.POST.get("name", "").strip()[:100]
        if not name:
            messages.error(request, "give the token a name, e.g. the script or notebook that will use it")
        else:
            _, new_token = ApiToken.issue(request.user, name)
    tokens = ApiToken.objects.filter(user=request.user)
    return render(request, "jobs/token_list.html", {"tokens": tokens, "new_token": new_token})


@login_required
@require_POST
def token_revoke(request, pk):
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)
    token.revoke()
    messages.info(request, f"{token.name} is revoked; requests with it now get 401")
    return redirect("token_list")


def _team_admin_or_404(request):
    """The user's team, if they may manage it (team admin or staff)."""
    team = current_team(request.user)
    may_manage = team and (
        request.user.is_staff or team.memberships.filter(user=request.user, role=Membership.Role.ADMIN).exists()
    )
    if not may_manage:
        raise Http404("No team you manage.")
    return team


@login_required
def team_detail(request):
    team = current_team(request.user)
    if team is None:
        raise Http404("You belong to no team.")
    manages = request.user.is_staff or team.memberships.filter(user=request.user, role=Membership.Role.ADMIN).exists()
    quota_form = TeamQuotaForm(instance=team)
    member_form = AddMemberForm(team=team)
    if request.method == "POST":
        team = _team_admin_or_404(request)
        if "add_member" in request.POST:
            member_form = AddMemberForm(request.POST, team=team)
            if member_form.is_valid():
                membership = member_form.save()
                messages.success(request, f"{membership.user} joined {team} as {membership.role}")
                return redirect("team_detail")
        else:
            quota_form = TeamQuotaForm(request.POST, instance=team)
            if quota_form.is_valid():
                quota_form.save()
                messages.success(request, "quota saved")
                return redirect("team_detail")
    return render(request, "jobs/team_detail.html", {
        "team": team, "manages": manages, "quota_form": quota_form, "member_form": member_form,
        "memberships": team.memberships.select_related("user").order_by("user__username"),
        "storage_use": storage.storage_use(team),
    })


@login_required
@require_POST
def team_member_remove(request, pk):
    team = _team_admin_or_404(request)
    membership = get_object_or_404(Membership, pk=pk, team=team)
    if membership.user == request.user:
        messages.error(request, "you cannot remove yourself; ask another admin")
    else:
        membership.delete()
        messages.success(request, f"{membership.user} left {team}")
    return redirect("team_detail")
