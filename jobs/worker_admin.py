"""Staff actions on workers and on the queue: drain, resume, cancel a worker's job, change a job's priority.

Everyone else gets 404 from these routes, as for another team's objects: they do not exist for them.
"""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect
from django.urls import path
from django.views.decorators.http import require_POST

from . import lifecycle, worker_control
from .models import Job, Worker
from .submission import PriorityNotChanged, change_priority


def staff_post(view):
    post_only = require_POST(view)

    # The staff check comes first, so that a GET from anyone else is a 404 too, not a 405.
    def staff_only(request, *args, **kwargs):
        if not request.user.is_staff:
            raise Http404("staff only")
        return post_only(request, *args, **kwargs)

    return login_required(staff_only)


@staff_post
def worker_drain(request, pk):
    worker = get_object_or_404(Worker, pk=pk)
    try:
        worker_control.drain(worker)
    except worker_control.WorkerDidNotAnswer as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"{worker} is draining: it finishes its current job and takes no new one")
    return redirect("worker_list")


@staff_post
def worker_resume(request, pk):
    worker = get_object_or_404(Worker, pk=pk)
    try:
        worker_control.resume(worker)
    except worker_control.WorkerDidNotAnswer as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"{worker} takes jobs again")
    return redirect("worker_list")


@staff_post
def worker_cancel_job(request, pk):
    worker = get_object_or_404(Worker.objects.select_related("current_job"), pk=pk)
    if worker.current_job is None:
        messages.error(request, f"{worker} runs no job")
        return redirect("worker_list")
    try:
        lifecycle.request_cancel(worker.current_job, by_user=request.user)
    except lifecycle.TransitionNotAllowed as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"stopping {worker.current_job} on {worker}…")
    return redirect("worker_list")


# The range in which broker_priority still tells priorities apart (-4 -> broker 9, 5 -> broker 0).
PRIORITY_RANGE = range(-4, 6)


class PriorityForm(forms.Form):
    priority = forms.IntegerField(min_value=PRIORITY_RANGE[0], max_value=PRIORITY_RANGE[-1])


@staff_post
def job_priority(request, pk):
    job = get_object_or_404(Job, pk=pk)
    form = PriorityForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"priority: {' '.join(form.errors['priority'])}")
        return redirect("job_detail", job.pk)
    try:
        change_priority(job, form.cleaned_data["priority"], by_user=request.user)
    except PriorityNotChanged as error:
        messages.error(request, str(error))
    else:
        messages.info(request, f"priority is now {job.priority}")
    return redirect("job_detail", job.pk)


urlpatterns = [
    path("workers/<int:pk>/drain/", worker_drain, name="worker_drain"),
    path("workers/<int:pk>/resume/", worker_resume, name="worker_resume"),
    path("workers/<int:pk>/cancel-job/", worker_cancel_job, name="worker_cancel_job"),
    path("jobs/<int:pk>/priority/", job_priority, name="job_priority"),
]
