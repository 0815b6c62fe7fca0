"""Pages and API lists take a bounded number of queries: as many for 30 jobs as for 3, and as many
for a run of 2,000 steps as for one of 20.

Each test reads a page with a few jobs (or a short run), then with many more (or a long run), and
asserts that both readings took the same number of queries, within the page's bound.
"""

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from jobs.charts import MAX_POINTS_PER_LINE
from jobs.models import ApiToken, BaseModel, Dataset, Job, JobEvent, Metric, Worker
from jobs.spec import JobSpec

FEW, MANY = 3, 30
SHORT_RUN, LONG_RUN = 20, 2_000
EVAL_EVERY = 10
# Cycled over the jobs, so that every page has running, queued and finished jobs to show.
STATUSES = ["running", "queued", "succeeded", "failed", "cancelled", "paused"]


@pytest.fixture
def base_models(db):
    # Catalogue rows only: no page here loads a model.
    return [
        BaseModel.objects.create(name=f"model-{n}", path=f"/models/{n}", task="causal_lm_sft", architecture="llama")
        for n in range(2)
    ]


@pytest.fixture
def add_jobs(team_user, base_models):
    """add_jobs(count, steps=SHORT_RUN) -> new jobs as workers leave them: each with its own datasets,
    a loss curve of `steps` steps with an evaluation every EVAL_EVERY, an event, and a worker when running."""
    team = team_user.memberships.get().team

    def add(count, steps=SHORT_RUN):
        jobs = []
        for n in range(Job.objects.count(), Job.objects.count() + count):
            status = STATUSES[n % len(STATUSES)]
            dataset, reference = [
                Dataset.objects.create(team=team, uploaded_by=team_user, name=f"{kind}-{n}", original_filename="d.jsonl",
                                       file=f"datasets/{kind}-{n}", size=1, sha256="0" * 64, format="prompt_completion",
                                       is_valid=True)
                for kind in ("data", "reference")
            ]
            worker = Worker.objects.create(hostname=f"worker-{n}@gpu") if status == "running" else None
            base_model = base_models[n % 2]
            job = Job.objects.create(
                team=team, created_by=team_user, name=f"job-{n}", base_model=base_model, dataset=dataset,
                validation_dataset=dataset, reference_dataset=reference, status=status, worker=worker,
                spec=JobSpec(base_model=base_model.name, dataset=dataset.pk).model_dump(mode="json"),
                step=steps, total_steps=2 * steps, train_loss=1.0, tokens_seen=64 * steps,
                started_at=timezone.now() - timedelta(minutes=5),
                finished_at=None if status in ("running", "queued", "paused") else timezone.now(),
            )
            if worker:
                Worker.objects.filter(pk=worker.pk).update(current_job=job)
            Metric.objects.bulk_create(
                [Metric(job=job, step=step, train_loss=2 - step / steps, tokens_seen=64 * step)
                 for step in range(1, steps + 1)]
                + [Metric(job=job, step=step, eval_loss=2.1 - step / steps)
                   for step in range(EVAL_EVERY, steps + 1, EVAL_EVERY)]
            )
            JobEvent.objects.create(job=job, kind="status", to_status=status, message=f"job-{n} is {status}")
            jobs.append(job)
        return jobs

    return add


@pytest.fixture
def alice(client, team_user):
    client.force_login(team_user)
    return client


@pytest.fixture
def alices_script(team_user):
    _, token = ApiToken.issue(team_user, "tests")
    return Client(headers={"Authorization": f"Bearer {token}"})


def queries_to_read(client, url, bound, django_assert_max_num_queries, **headers):
    with django_assert_max_num_queries(bound) as captured:
        response = client.get(url, headers=headers)
    assert response.status_code == 200, response.content[:300]
    return len(captured)


# The session, the user, then per page: the jobs (and the team, or the workers, or the job's own rows).
@pytest.mark.parametrize("url, headers, bound", [
    ("/jobs/", {}, 3),
    ("/jobs/?status=running", {}, 3),
    ("/jobs/", {"HX-Request": "true"}, 3),  # the rows, refreshed every 2 s while jobs run
    ("/", {}, 7),  # 7: the active jobs drawn (at most 25) and how many more there are
    ("/", {"HX-Request": "true"}, 7),
])
def test_the_job_list_and_the_dashboard_take_as_many_queries_for_30_jobs_as_for_3(
    alice, add_jobs, url, headers, bound, django_assert_max_num_queries,
):
    add_jobs(FEW)
    for_few = queries_to_read(alice, url, bound, django_assert_max_num_queries, **headers)
    add_jobs(MANY - FEW)
    for_many = queries_to_read(alice, url, bound, django_assert_max_num_queries, **headers)
    assert for_many == for_few


# The session, the user, the job with its model, datasets, worker and author, its curve's points,
# events, artifacts and checkpoints.
@pytest.mark.parametrize("route", ["job_detail", "job_live"])
def test_a_job_page_takes_as_many_queries_for_a_long_run_as_for_a_short_one(
    alice, add_jobs, route, django_assert_max_num_queries,
):
    short_run, long_run = add_jobs(1, steps=SHORT_RUN)[0], add_jobs(1, steps=LONG_RUN)[0]
    for_short = queries_to_read(alice, reverse(route, args=[short_run.pk]), 7, django_assert_max_num_queries)
    for_long = queries_to_read(alice, reverse(route, args=[long_run.pk]), 7, django_assert_max_num_queries)
    assert for_long == for_short


def test_the_compare_page_takes_as_many_queries_for_5_long_runs_as_for_2_short_ones(
    alice, add_jobs, django_assert_max_num_queries,
):
    short_runs, long_runs = add_jobs(2, steps=SHORT_RUN), add_jobs(5, steps=LONG_RUN)
    for_two = queries_to_read(alice, "/compare/?jobs=" + ",".join(str(job.pk) for job in short_runs), 4,
                              django_assert_max_num_queries)
    for_five = queries_to_read(alice, "/compare/?jobs=" + ",".join(str(job.pk) for job in long_runs), 4,
                               django_assert_max_num_queries)
    assert for_five == for_two


# The token (and its last use), then ninja's count and one page; or OpenAI's page with one more row.
@pytest.mark.parametrize("url, bound", [("/api/jobs?limit=50", 4), ("/v1/fine_tuning/jobs?limit=50", 3)])
def test_the_api_job_lists_take_as_many_queries_for_30_jobs_as_for_3(
    alices_script, add_jobs, url, bound, django_assert_max_num_queries,
):
    add_jobs(FEW)
    for_few = queries_to_read(alices_script, url, bound, django_assert_max_num_queries)
    add_jobs(MANY - FEW)
    for_many = queries_to_read(alices_script, url, bound, django_assert_max_num_queries)
    assert for_many == for_few


def plotted_x(polyline):
    return [float(point.split(",")[0]) for point in polyline.split()]


def test_the_loss_curve_of_a_long_run_spans_the_whole_run_in_at_most_a_chart_width_of_points(alice, add_jobs):
    long_run = add_jobs(1, steps=LONG_RUN)[0]
    page = alice.get(reverse("job_live", args=[long_run.pk])).content.decode()

    train = plotted_x(re.search(r'<polyline points="([^"]*)" class="train"', page).group(1))
    evals = plotted_x(re.search(r'<polyline points="([^"]*)" class="eval"', page).group(1))
    assert 400 < len(train) <= MAX_POINTS_PER_LINE
    assert len(evals) == LONG_RUN // EVAL_EVERY  # 200 evaluations: fewer than a chart's width, all drawn
    # From the first step to the last, at the same spacing all along.
    first_step_x, last_step_x = train[0], train[-1]
    assert first_step_x < 50 and last_step_x == max(train) and evals[-1] == last_step_x
    gaps = {round(b - a, 1) for a, b in zip(train, train[1:-1])}
    assert max(gaps) - min(gaps) <= 0.2


def test_the_compare_page_draws_long_runs_end_to_end(alice, add_jobs):
    runs = add_jobs(2, steps=LONG_RUN)
    page = alice.get("/compare/?jobs=" + ",".join(str(job.pk) for job in runs)).content.decode()

    lines = re.findall(r'<polyline[^>]*points="([^"]*)"', page)
    assert len(lines) == 4 * 2  # train and eval loss, by step and by tokens, for each run
    for line in lines:
        x = plotted_x(line)
        assert len(x) <= MAX_POINTS_PER_LINE and x[-1] == max(x)


def test_the_dashboard_draws_the_running_jobs_and_the_head_of_a_long_queue(alice, add_jobs):
    jobs = add_jobs(MANY)
    Job.objects.update(status="queued", finished_at=None)
    Job.objects.filter(pk=jobs[-1].pk).update(status="running")
    page = alice.get("/").content.decode()
    rows = page.split('id="dashboard-live"')[1].split("Recent results")[0]
    drawn = [int(pk) for pk in re.findall(r'href="/jobs/(\d+)/"', rows)]
    assert len(drawn) == 25 and drawn[0] == jobs[-1].pk, "the running job comes first, then the queue's head"
    assert f"and {MANY - 25} more waiting" in rows
