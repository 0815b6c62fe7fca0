"""Sweeps: a base job and a grid, queued as one job per point, watched and compared on the sweep page.

No worker here: the jobs are checked as rows, their messages to Redis as on-commit callbacks.
"""

import json

import pytest
from django.test import Client
from django.urls import reverse

from jobs import lifecycle
from jobs.models import ApiToken, Job, Sweep, Worker
from jobs.spec import JobSpec
from jobs.sweeps import submit_sweep
from jobs.uploads import store_dataset

THE_EXAMPLE_GRID = {"methods": ["lora", "adapter", "ia3"], "ranks": "4, 8, 16", "learning_rates": "1e-4, 3e-4"}


@pytest.fixture
def team(team_user):
    return team_user.memberships.get().team


@pytest.fixture
def dataset(team, team_user, data_dirs):
    return store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4)


@pytest.fixture
def alice(team_user):
    client = Client()
    client.force_login(team_user)
    return client


def sweep_form(dataset, name="grid-demo", **grid):
    """The new-sweep form as a browser posts it: the base job's fields, then the grid's."""
    return {
        "name": name, "metric": "eval_loss", "base_model": "tiny-random-llama", "dataset": dataset.pk,
        "method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "bias": "none", "target_preset": "attention_qv",
        "epochs": 1, "max_steps": 5, "batch_size": 2, "learning_rate": 2e-4, "max_seq_length": 64,
        "warmup_steps": 0, "eval_fraction": 0.25, "checkpoint_every": 50, "seed": 1,
        "methods": [], "ranks": "", "learning_rates": "", "grid_json": "",
    } | grid


def post_sweep(client, data, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        response = client.post(reverse("sweep_new"), data)
    return response, enqueued


def form_errors(response):
    form = response.context["form"]
    return {field: [str(error) for error in errors] for field, errors in form.errors.items()}


def test_the_example_grid_queues_ten_jobs_as_rank_means_nothing_to_adapters_and_ia3(
    alice, catalogue, dataset, django_capture_on_commit_callbacks
):
    response, enqueued = post_sweep(alice, sweep_form(dataset, **THE_EXAMPLE_GRID), django_capture_on_commit_callbacks)

    sweep = Sweep.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("sweep_detail", args=[sweep.pk])
    jobs = {job.name: job for job in sweep.jobs.all()}
    assert len(jobs) == 10 and len(enqueued) == 10
    assert sorted(job.method_name for job in jobs.values()) == ["adapter"] * 2 + ["ia3"] * 2 + ["lora"] * 6
    assert {job.status for job in jobs.values()} == {"queued"}

    lora = jobs["grid-demo · lora r=8 lr=3e-4"]
    assert lora.sweep_point == {"method.type": "lora", "method.r": 8, "hyperparameters.learning_rate": 3e-4}
    assert lora.spec["method"]["r"] == 8 and lora.spec["hyperparameters"]["learning_rate"] == 3e-4
    # The base job's LoRA settings carry over; adapters start from their own defaults.
    assert lora.spec["method"]["alpha"] == 16 and lora.spec["hyperparameters"]["max_steps"] == 5
    adapter = jobs["grid-demo · adapter lr=1e-4"]
    assert adapter.sweep_point == {"method.type": "adapter", "hyperparameters.learning_rate": 1e-4}
    assert adapter.spec["method"] == JobSpec(base_model="x", dataset=1, method={"type": "adapter"}).method.model_dump()
    assert "grid-demo · ia3 lr=3e-4" in jobs


def test_the_form_shows_the_grid_size_as_it_is_filled_in(alice, catalogue, dataset):
    response = alice.get(reverse("sweep_preview"), sweep_form(dataset, **THE_EXAMPLE_GRID))
    text = response.content.decode()
    assert "10 jobs</strong>: 6 LoRA + 2 Bottleneck adapters + 2 IA³." in text
    assert "method.r does not apply to Bottleneck adapters or IA³" in text

    # Before the base job is complete the size is known already.
    incomplete = sweep_form(dataset, ranks="4, 8", learning_rates="1e-4, 3e-4") | {"max_seq_length": ""}
    text = alice.get(reverse("sweep_preview"), incomplete).content.decode()
    assert "4 jobs</strong>." in text and "once the base job is complete" in text

    page = alice.get(reverse("sweep_new")).content.decode()
    assert f'hx-get="{reverse("sweep_preview")}"' in page and "6 LoRA + 2 adapter + 2 IA³ = 10 jobs" in page


@pytest.mark.parametrize("grid, field, message", [
    ({"ranks": "0, 8"}, "ranks", "method.r = 0: must be ≥ 1"),
    ({"learning_rates": "1e-4, 2"}, "learning_rates", "hyperparameters.learning_rate = 2: must be ≤ 1"),
    ({"grid_json": '{"hyperparameters.batch_size": [4, -1]}'}, "grid_json", "hyperparameters.batch_size = -1: must be ≥ 1"),
    ({"ranks": "4, eight"}, "ranks", "'eight' is not a whole number"),
])
def test_an_invalid_value_is_refused_naming_the_key_and_the_value(
    alice, catalogue, dataset, grid, field, message, django_capture_on_commit_callbacks
):
    response, enqueued = post_sweep(alice, sweep_form(dataset, **grid), django_capture_on_commit_callbacks)
    assert response.status_code == 200 and form_errors(response)[field] == [message]
    assert not Sweep.objects.exists() and not Job.objects.exists() and not enqueued


@pytest.mark.parametrize("grid_json, message", [
    ('{"method.rank": [4, 8]}', "method.rank: no method has a setting named 'rank'"),
    ('{"hyperparameters.lr": [0.1]}', "hyperparameters.lr: not a hyperparameter"),
    ('{"optimizer": ["adam"]}', "optimizer: not a field of a JobSpec"),
])
def test_a_grid_key_no_method_or_spec_has_is_refused_naming_it(
    alice, catalogue, dataset, grid_json, message, django_capture_on_commit_callbacks
):
    response, _ = post_sweep(alice, sweep_form(dataset, grid_json=grid_json), django_capture_on_commit_callbacks)
    assert form_errors(response)["grid_json"][0].startswith(message)
    assert not Sweep.objects.exists() and not Job.objects.exists()


def test_a_rank_for_methods_that_have_none_is_refused_rather_than_ignored(
    alice, catalogue, dataset, django_capture_on_commit_callbacks
):
    response, _ = post_sweep(alice, sweep_form(dataset, methods=["adapter", "ia3"], ranks="4, 8"),
                             django_capture_on_commit_callbacks)
    assert form_errors(response)["ranks"] == ["method.r: applies to none of this sweep's methods (Bottleneck adapters, IA³)"]


def test_a_grid_beyond_the_cap_is_refused_with_its_size(alice, catalogue, dataset, settings, django_capture_on_commit_callbacks):
    settings.TUNEDECK_SWEEP_MAX_JOBS = 8
    too_big = sweep_form(dataset, ranks="4, 8, 16", learning_rates="1e-4, 2e-4, 3e-4")
    message = "this grid makes 9 jobs; a sweep may have at most 8 (TUNEDECK_SWEEP_MAX_JOBS)"
    assert message in alice.get(reverse("sweep_preview"), too_big).content.decode()
    response, _ = post_sweep(alice, too_big, django_capture_on_commit_callbacks)
    assert form_errors(response)["__all__"] == [message]
    assert not Sweep.objects.exists() and not Job.objects.exists()

    # Merged points do not count: 3 methods × 3 ranks would be 9, but it is 3 LoRA + 1 adapter + 1 IA³.
    response, _ = post_sweep(alice, sweep_form(dataset, methods=["lora", "adapter", "ia3"], ranks="4, 8, 16"),
                             django_capture_on_commit_callbacks)
    assert response.status_code == 302 and Job.objects.count() == 5


def test_a_sweep_beyond_the_queued_jobs_quota_is_refused_whole(
    alice, api, team, team_user, catalogue, dataset, django_capture_on_commit_callbacks
):
    team.max_queued_jobs = 4
    team.save()
    with django_capture_on_commit_callbacks(execute=False):
        Job.objects.create(team=team, base_model=catalogue["llama"], dataset=dataset,
                           spec=JobSpec(base_model="tiny-random-llama", dataset=dataset.pk).model_dump(mode="json"))

    message = ("this sweep has 4 jobs and team acme already has 1 queued; its quota is 4 queued jobs, so 3 more fit: "
               "make the grid smaller or wait for jobs to start")
    grid = sweep_form(dataset, ranks="4, 8", learning_rates="1e-4, 3e-4")
    assert "1 queued job and a quota of 4: 3 more fit, so this sweep would be refused" in (
        alice.get(reverse("sweep_preview"), grid).content.decode())
    response, enqueued = post_sweep(alice, grid, django_capture_on_commit_callbacks)
    assert form_errors(response)["__all__"] == [message] and not enqueued

    body = {"base_spec": {"base_model": "tiny-random-llama", "dataset": dataset.pk},
            "grid": {"method.r": [4, 8], "hyperparameters.learning_rate": [1e-4, 3e-4]}}
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        refused = api.post("/api/sweeps", json.dumps(body), content_type="application/json")
    assert refused.status_code == 429 and refused.json() == {"detail": message} and not enqueued
    assert not Sweep.objects.exists() and Job.objects.count() == 1

    # Three fit.
    response, enqueued = post_sweep(alice, sweep_form(dataset, ranks="4, 8, 16"), django_capture_on_commit_callbacks)
    assert response.status_code == 302 and len(enqueued) == 3 and Job.objects.count() == 4


@pytest.fixture
def two_rank_sweep(team, team_user, catalogue, dataset, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        return submit_sweep(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=dataset.pk),
                            {"method.r": [4, 8, 16]}, metric="eval_loss", name="ranks")


def finish(job, **measured):
    running = lifecycle.claim(job.pk, Worker.objects.get_or_create(hostname="w@h")[0])
    lifecycle.transition(running, "succeeded", "done", step=5, total_steps=5, **measured)


def test_the_sweep_page_follows_its_jobs_and_marks_the_best_run(alice, two_rank_sweep):
    r4, r8, r16 = two_rank_sweep.jobs.order_by("id")
    url = reverse("sweep_detail", args=[two_rank_sweep.pk])
    page = alice.get(url).content.decode()
    assert "ranks · r=4" in page and "ranks · r=16" in page and 'hx-trigger="every 2s"' in page
    assert f'href="/compare/?jobs={r4.pk},{r8.pk},{r16.pk}">Compare all</a>' in page
    assert "No finished run has reported its eval loss yet" in page

    finish(r4, eval_loss=1.25)
    finish(r8, eval_loss=0.75)
    lifecycle.claim(r16.pk, Worker.objects.get())
    Job.objects.filter(pk=r16.pk).update(step=2, total_steps=5, eval_loss=0.5)  # still running: not a result yet
    live = alice.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert live.startswith('<div id="sweep-live"') and 'hx-trigger="every 2s"' in live
    assert "2/5" in live and "Best run by eval loss: " in live
    assert f'<tr id="sweep-job-{r8.pk}" class="best">' in live and live.count('class="best"') == 1

    lifecycle.transition(Job.objects.get(pk=r16.pk), "failed", "out of memory")
    live = alice.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in live  # nothing active: the page stops asking

    listing = alice.get(reverse("sweep_list")).content.decode()
    assert f'href="{url}">ranks</a>' in listing


def test_another_teams_sweep_answers_404(client, other_team_user, two_rank_sweep):
    client.force_login(other_team_user)
    assert client.get(reverse("sweep_detail", args=[two_rank_sweep.pk])).status_code == 404
    assert client.get(reverse("sweep_detail", args=[two_rank_sweep.pk]), HTTP_HX_REQUEST="true").status_code == 404
    assert "ranks" not in client.get(reverse("sweep_list")).content.decode()
    _, token = ApiToken.issue(other_team_user, "bob's")
    bob_api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert bob_api.get(f"/api/sweeps/{two_rank_sweep.pk}").status_code == 404


def test_a_sweep_is_created_and_followed_through_the_rest_api(api, catalogue, dataset, django_capture_on_commit_callbacks):
    body = {
        "name": "api-sweep", "metric": "eval_accuracy",
        "base_spec": {"base_model": "tiny-random-llama", "dataset": dataset.pk, "hyperparameters": {"max_steps": 3}},
        "grid": {"method.type": ["lora", "ia3"], "method.r": [4, 8], "hyperparameters.batch_size": [2, 4]},
    }
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        created = api.post("/api/sweeps", json.dumps(body), content_type="application/json")
    assert created.status_code == 201, created.content
    sweep = created.json()
    assert sweep["name"] == "api-sweep" and sweep["metric"] == "eval_accuracy" and sweep["higher_is_better"]
    assert len(sweep["jobs"]) == 6 and len(enqueued) == 6  # 2 × 2 LoRA + 2 IA³
    assert sweep["jobs"][0]["sweep_point"] == {"method.type": "lora", "method.r": 4, "hyperparameters.batch_size": 2}
    assert sweep["jobs"][-1]["name"] == "api-sweep · ia3 batch=4"
    assert sweep["best_job"] is None

    read = api.get(f"/api/sweeps/{sweep['id']}").json()
    assert [job["id"] for job in read["jobs"]] == [job["id"] for job in sweep["jobs"]]
    assert {job["status"] for job in read["jobs"]} == {"queued"} and read["grid"] == body["grid"]


@pytest.mark.parametrize("grid, location, message", [
    ({"method.r": [0, 8]}, ["body", "grid", "method.r"], "method.r = 0: must be ≥ 1"),
    ({"method.rank": [8]}, ["body", "grid", "method.rank"], "method.rank: no method has a setting named 'rank'"),
    ({"method.r": list(range(1, 66))}, ["body", "grid"],
     "this grid makes 65 jobs; a sweep may have at most 64 (TUNEDECK_SWEEP_MAX_JOBS)"),
])
def test_a_grid_the_api_cannot_sweep_is_a_422_naming_the_key(
    api, catalogue, dataset, grid, location, message, django_capture_on_commit_callbacks
):
    body = {"base_spec": {"base_model": "tiny-random-llama", "dataset": dataset.pk}, "grid": grid}
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post("/api/sweeps", json.dumps(body), content_type="application/json")
    assert response.status_code == 422 and response.json()["detail"] == [{"loc": location, "msg": message}]
    assert not Sweep.objects.exists() and not Job.objects.exists()


def test_a_point_the_catalogue_refuses_refuses_the_sweep_naming_the_point(
    api, catalogue, dataset, django_capture_on_commit_callbacks
):
    body = {"base_spec": {"base_model": "tiny-random-llama", "dataset": dataset.pk},
            "grid": {"dataset": [dataset.pk, 9999]}}
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        response = api.post("/api/sweeps", json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and response.json()["field"] == "dataset"
    assert response.json()["detail"] == "dataset=9999: no dataset with id 9999 in team acme"
    assert not Sweep.objects.exists() and not Job.objects.exists() and not enqueued
