"""The playground: one prompt (or one text to classify) answered by a base model and fine-tuned versions of it, side by side.

The web process never runs a model. A request goes over the `inference` queue to an inference
worker (workers.tasks.answer_in_playground), which keeps the base model loaded and swaps the
jobs' adapters on it; the answers come back through Celery's result backend, and the page polls
a small fragment until they are there. The ids of a user's requests live in their session, so
a user reads the answers to their own requests only.
"""

import time
from itertools import groupby

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render
from django.urls import path

from workers.tasks import answer_in_playground

from .models import Job
from .teams import get_visible_or_404, visible

SESSION_KEY = "playground_requests"
REQUESTS_REMEMBERED = 20  # per session: enough for a page or two of going back and forth
# As many as an inference worker keeps loaded at once (workers.inference.ADAPTERS_KEPT): more would
# make it read some adapters from disk again on every request.
MAX_JOBS = 4


class GenerationForm(forms.Form):
    # Not stripped: a prompt's trailing newline (after "### Response:", say) is part of the prompt.
    prompt = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}), max_length=4000, strip=False,
        error_messages={"required": "Prompt: type a prompt for the models to continue.",
                        "max_length": "Prompt: at most %(limit_value)d characters (it has %(show_value)d)."},
    )
    temperature = forms.FloatField(
        initial=0.0, min_value=0, max_value=2, help_text="0 is greedy: always the most likely token",
        error_messages={key: "Temperature must be a number from 0 (greedy) to 2." for key in
                        ("required", "invalid", "min_value", "max_value")},
    )
    max_new_tokens = forms.IntegerField(
        initial=64, min_value=1, max_value=512, label="Max new tokens",
        error_messages={key: "Max new tokens must be a whole number from 1 to 512." for key in
                        ("required", "invalid", "min_value", "max_value")},
    )
    seed = forms.IntegerField(
        initial=0, min_value=0, max_value=2**31 - 1, help_text="the same for every model, so the dice are the same",
        error_messages={key: "Seed must be a whole number from 0 to 2147483647." for key in
                        ("required", "invalid", "min_value", "max_value")},
    )

    def clean_prompt(self):
        # Browsers send a textarea's line breaks as CRLF; the models were trained on LF.
        prompt = self.cleaned_data["prompt"].replace("\r\n", "\n")
        if not prompt.strip():
            raise forms.ValidationError(self.fields["prompt"].error_messages["required"])
        return prompt

    def inputs(self):
        data = self.cleaned_data
        return {"prompt": data["prompt"], "sampling": {key: data[key] for key in ("temperature", "max_new_tokens", "seed")}}


class ClassificationForm(forms.Form):
    text = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), max_length=4000,
        error_messages={"required": "Text: type a text for the classifiers to label.",
                        "max_length": "Text: at most %(limit_value)d characters (it has %(show_value)d)."},
    )

    def inputs(self):
        return {"text": self.cleaned_data["text"]}


@login_required
def playground(request):
    """Pick finished jobs (?jobs=3,5), then ask them; the answers arrive in #playground-answers."""
    jobs = requested_jobs(request)
    if not jobs:
        return render(request, "jobs/playground_pick.html", {"groups": finished_jobs_by_base_model(request.user)})
    problems = why_not_comparable(jobs)
    form_class = ClassificationForm if jobs[0].base_model.task == "sequence_classification" else GenerationForm
    form = form_class(request.POST or None)
    request_id = None
    if request.method == "POST" and not problems and form.is_valid():
        request_id = ask_an_inference_worker(request, jobs, form.inputs())
    others = []
    if not problems:
        others = visible(request.user, Job.objects.filter(status=Job.Status.SUCCEEDED, base_model=jobs[0].base_model))
        others = others.exclude(pk__in=[job.pk for job in jobs]).order_by("-finished_at")[:20]
    context = {
        "jobs": jobs, "problems": problems, "form": form, "request_id": request_id, "others": others,
        "job_ids": ids_of(jobs), "rows": [(job, ids_of(jobs, leaving_out=job)) for job in jobs],
        "can_add": len(jobs) < MAX_JOBS, "wait_seconds": settings.INFERENCE_WAIT_SECONDS,
    }
    template = "jobs/playground_run.html" if request.htmx else "jobs/playground.html"
    return render(request, template, context)


@login_required
def playground_answers(request, request_id):
    """The answers to one of this user's requests, or how far it got; polled by the page until it is done."""
    asked = request.session.get(SESSION_KEY, {}).get(str(request_id))
    if asked is None:
        raise Http404("No playground request of yours has this id.")
    result = answer_in_playground.AsyncResult(str(request_id))
    waited = time.time() - asked["submitted_at"]
    context = {"request_id": request_id, "state": result.state, "done": True, "wait_seconds": settings.INFERENCE_WAIT_SECONDS}
    if result.state == "SUCCESS":
        context |= {"answers": result.result.get("answers"), "error": result.result.get("error"),
                    "worker": result.result.get("worker")}
    elif result.state == "FAILURE":
        context["error"] = f"the inference worker failed: {result.result}"
    elif result.state == "STARTED" and waited < settings.INFERENCE_ANSWER_SECONDS:
        context |= {"done": False, "worker": (result.info or {}).get("hostname")}
    elif result.state == "STARTED":
        context["error"] = (
            f"no answer after {settings.INFERENCE_ANSWER_SECONDS} s; the inference worker may have stopped. Ask again."
        )
    elif result.state == "PENDING" and waited < settings.INFERENCE_WAIT_SECONDS:
        context["done"] = False
    else:  # still waiting for a worker, or expired unanswered (REVOKED)
        context["no_worker"] = True
    return render(request, "jobs/playground_answers.html", context)


def requested_jobs(request):
    """The jobs named by ?jobs=3,5 (or ?jobs=3&jobs=5), in that order; another team's job is a 404."""
    ids = []
    for value in request.GET.getlist("jobs"):
        for part in filter(None, (part.strip() for part in value.split(","))):
            if not part.isdigit():
                raise Http404("Job ids are numbers.")
            if int(part) not in ids:
                ids.append(int(part))
    jobs = Job.objects.select_related("base_model").prefetch_related("artifacts")
    return [get_visible_or_404(request.user, jobs, pk=pk) for pk in ids]


def why_not_comparable(jobs):
    """What stops these jobs being asked together, in sentences for the user (none: they can be)."""
    problems = []
    for job in jobs:
        if job.status != Job.Status.SUCCEEDED:
            problems.append(f"{job.display_name} has not finished ({job.status}): the playground answers with a "
                            "finished job's adapter.")
        elif not any(artifact.kind == "adapter" for artifact in job.artifacts.all()):
            problems.append(f"{job.display_name} has no adapter artifact to answer with.")
    bases = {}
    for job in jobs:
        bases.setdefault(job.base_model.name, []).append(job.display_name)
    if len(bases) > 1:
        listed = "; ".join(f"{', '.join(names)} on {base}" for base, names in bases.items())
        problems.append(f"These jobs do not share a base model ({listed}). The playground compares fine-tuned "
                        "versions of one base model: open the jobs of one base model together.")
    if len(jobs) > MAX_JOBS:
        problems.append(f"At most {MAX_JOBS} jobs at once; this asks for {len(jobs)}.")
    return problems


def ids_of(jobs, leaving_out=None):
    """The ?jobs= value for these jobs."""
    return ",".join(str(job.pk) for job in jobs if job != leaving_out)


def finished_jobs_by_base_model(user):
    jobs = visible(user, Job.objects.filter(status=Job.Status.SUCCEEDED).select_related("base_model"))
    jobs = jobs.order_by("base_model__name", "-finished_at")
    return [(base, list(group)) for base, group in groupby(jobs, key=lambda job: job.base_model)]


def ask_an_inference_worker(request, jobs, inputs):
    """Queue the request for an inference worker; remember its id in the session; return the id."""
    # Unstarted by then, it expires: nobody is waiting for it any more (the page has said no worker took it).
    result = answer_in_playground.apply_async(args=[[job.pk for job in jobs], inputs], expires=settings.INFERENCE_WAIT_SECONDS)
    asked = request.session.get(SESSION_KEY, {})
    asked[result.id] = {"submitted_at": time.time()}
    request.session[SESSION_KEY] = dict(list(asked.items())[-REQUESTS_REMEMBERED:])
    return result.id


urlpatterns = [
    path("playground/", playground, name="playground"),
    path("playground/answers/<uuid:request_id>/", playground_answers, name="playground_answers"),
]
