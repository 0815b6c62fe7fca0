"""Sweep pages: the list, the form with its live grid size, and a sweep's progress."""

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse

from .models import BaseModel, Job, Sweep
from .submission import SubmissionError
from .sweep_forms import SweepForm
from .sweeps import SWEEP_METRICS, best_job, format_value, submit_sweep
from .teams import current_team, teams_of


def visible_sweeps(user):
    return Sweep.objects.filter(team__in=teams_of(user))


@login_required
def sweep_list(request):
    sweeps = visible_sweeps(request.user).annotate(
        job_count=Count("jobs"), active_count=Count("jobs", filter=Q(jobs__status__in=Job.ACTIVE_STATUSES)),
    ).select_related("created_by")
    return render(request, "jobs/sweep_list.html", {"sweeps": sweeps})


def _initial():
    """The first base model with its suggested settings, as on the new-job form."""
    base_model = BaseModel.objects.first()
    if base_model is None:
        return {}
    return dict(base_model.suggested_settings) | {"base_model": base_model.name}


@login_required
def sweep_new(request):
    team = current_team(request.user)
    if team is None:
        messages.error(request, "you belong to no team yet; ask an admin to add you to one")
        return redirect("dashboard")
    form = SweepForm(request.POST or None, team=team, initial=_initial())
    if request.method == "POST" and form.is_valid():
        try:
            sweep = submit_sweep(team, request.user, form.spec, form.grid, form.cleaned_data["metric"],
                                 name=form.cleaned_data["name"])
        except SubmissionError as error:
            form.add_error(error.field if error.field in form.fields else None, error.message)
        else:
            messages.success(request, f"{sweep}: {len(form.points)} jobs queued")
            return redirect("sweep_detail", sweep.pk)
    suggestions = {model.name: model.suggested_settings for model in BaseModel.objects.all()}
    return render(request, "jobs/sweep_new.html", {"form": form, "suggestions": suggestions})


@login_required
def sweep_preview(request):
    """The form's grid size and what is wrong with the grid, recomputed by htmx as the fields change."""
    team = current_team(request.user)
    form = SweepForm(request.GET, team=team)
    form.is_valid()
    grid_errors = [error for field in (*form.GRID_KEYS, "grid_json", "__all__") for error in form.errors.get(field, [])]
    context = form.size_summary() | {"errors": grid_errors, "team": team, "complete": form.is_valid()}
    if team is not None and team.max_queued_jobs is not None:
        queued = Job.objects.filter(team=team, status=Job.Status.QUEUED).count()
        context["quota"] = {"queued": queued, "limit": team.max_queued_jobs,
                            "room": max(0, team.max_queued_jobs - queued)}
    return render(request, "jobs/sweep_preview.html", context)


@login_required
def sweep_detail(request, pk):
    """A sweep's jobs; htmx asks again for the live part every 2 s while any job is queued or running."""
    sweep = get_object_or_404(visible_sweeps(request.user).select_related("created_by"), pk=pk)
    jobs = list(sweep.jobs.order_by("id"))
    keys = list(sweep.grid)
    best = best_job(sweep, jobs)
    context = {
        "sweep": sweep,
        "objective": SWEEP_METRICS[sweep.metric],
        "keys": keys,
        "rows": [
            # "–" where a key does not apply to the job's method (a rank for IA³).
            {"job": job, "values": [format_value(job.sweep_point[key]) if key in job.sweep_point else "–" for key in keys],
             "metric": getattr(job, sweep.metric), "is_best": job == best}
            for job in jobs
        ],
        "grid_json": json.dumps(sweep.grid, indent=2),
        "base_spec_json": json.dumps(sweep.base_spec, indent=2),
        "best": best,
        "best_value": getattr(best, sweep.metric) if best else None,
        "any_active": any(job.is_active for job in jobs),
        "compare_url": f"{reverse('compare')}?jobs={','.join(str(job.pk) for job in jobs)}",
    }
    template = "jobs/sweep_live.html" if request.htmx else "jobs/sweep_detail.html"
    return render(request, template, context)


urlpatterns = [
    path("sweeps/", sweep_list, name="sweep_list"),
    path("sweeps/new/", sweep_new, name="sweep_new"),
    path("sweeps/new/preview/", sweep_preview, name="sweep_preview"),
    path("sweeps/<int:pk>/", sweep_detail, name="sweep_detail"),
]
