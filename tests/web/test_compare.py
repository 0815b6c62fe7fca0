"""The Compare page, and the job list and dashboard that refresh themselves while jobs run."""

import csv
import io
import json
import math
from datetime import timedelta

import pytest
from django.test import Client
from django.test.html import Element, parse_html
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, Metric
from jobs.spec import JobSpec
from jobs.uploads import store_dataset

# name -> (method section, measurements); chosen so that each measurement has a clear best.
RUNS = {
    "lora-r8": ({"type": "lora", "r": 8}, dict(
        trainable_params=1_000, peak_memory_mb=900, wall_time_s=60, tokens_per_sec=1_000, mfu=0.31, train_loss=1.2,
        eval_loss=1.3, perplexity=3.67, artifact_bytes=40_000, latency_ms=10, latency_merged_ms=8,
        reference_loss_before=2.0, reference_loss_after=2.1,
    )),
    "lora-r16": ({"type": "lora", "r": 16}, dict(
        trainable_params=2_000, peak_memory_mb=950, wall_time_s=65, tokens_per_sec=900, mfu=0.28, train_loss=1.1,
        eval_loss=1.25, perplexity=3.49, artifact_bytes=80_000, latency_ms=10, latency_merged_ms=8.5,
        reference_loss_before=2.0, reference_loss_after=2.3,
    )),
    "adapters": ({"type": "adapter", "bottleneck_size": 16}, dict(
        trainable_params=3_000, peak_memory_mb=1_100, wall_time_s=50, tokens_per_sec=1_200, mfu=0.36, train_loss=1.3,
        eval_loss=1.4, perplexity=4.06, artifact_bytes=120_000, latency_ms=14,
    )),
}
STEPS = 30


def create_run(team, user, catalogue, dataset, name, method, status="succeeded", steps=STEPS, pace=6, **measurements):
    """A job as a worker leaves it, with a loss curve of `steps` steps and an evaluation every 10.

    The curves fall fast, by a factor e every `pace` steps, then flatten, and end at the job's final losses.
    """
    spec = JobSpec(base_model="tiny-random-llama", dataset=dataset.pk, method=method,
                   hyperparameters={"max_steps": STEPS, "learning_rate": 0.001})
    now = timezone.now()
    job = Job.objects.create(
        team=team, created_by=user, name=name, base_model=catalogue["llama"], dataset=dataset,
        spec=spec.model_dump(mode="json"), status=status, step=steps, total_steps=STEPS, tokens_seen=64 * steps,
        total_params=100_000, estimated_memory_mb=1_000, started_at=now - timedelta(minutes=1),
        finished_at=None if status in Job.ACTIVE_STATUSES else now, **measurements,
    )
    train_loss, eval_loss = measurements.get("train_loss", 1.0), measurements.get("eval_loss", 1.2)

    def falling(final, step):
        return final + 2 * (math.exp(-step / pace) - math.exp(-STEPS / pace))

    Metric.objects.bulk_create(
        [Metric(job=job, step=step, train_loss=falling(train_loss, step) + 0.05 * math.sin(step) * (STEPS - step) / STEPS,
                tokens_seen=64 * step) for step in range(1, steps + 1)]
        + [Metric(job=job, step=step, eval_loss=falling(eval_loss, step)) for step in range(10, steps + 1, 10)]
    )
    return job


def create_compared_runs(user, catalogue):
    """The three finished runs of RUNS, in its order."""
    team = user.memberships.get().team
    dataset = store_dataset(team, user, "reverse.jsonl", b'{"prompt": "abc", "completion": "cba"}\n' * 8)
    return [create_run(team, user, catalogue, dataset, name, method, pace=4 + 3 * index, **measurements)
            for index, (name, (method, measurements)) in enumerate(RUNS.items())]


@pytest.fixture
def runs(team_user, catalogue, data_dirs):
    return create_compared_runs(team_user, catalogue)


@pytest.fixture
def alice(client, team_user):
    client.force_login(team_user)
    return client


def compare_url(jobs, **query):
    url = reverse("compare") + "?jobs=" + ",".join(str(job.pk) for job in jobs)
    return url + "".join(f"&{key}={value}" for key, value in query.items())


def elements(node, tag):
    if isinstance(node, Element):
        if node.name == tag:
            yield node
        for child in node.children:
            yield from elements(child, tag)


def text(node):
    if isinstance(node, str):
        return node
    return " ".join(" ".join(text(child) for child in node.children).split())


def classes(node):
    return dict(node.attributes).get("class", "").split()


def table_rows(page):
    """The compare table as {row label: (the row's classes, [(cell text, cell classes), ...])}."""
    table = next(table for table in elements(parse_html(page), "table") if "compare" in classes(table))
    rows = {}
    for row in elements(table, "tr"):
        header, *cells = [cell for cell in row.children if isinstance(cell, Element)]
        label = text(header).split(" lower is better")[0].split(" higher is better")[0]
        rows[label] = (classes(row), [(text(cell), classes(cell)) for cell in cells])
    return rows


def best_runs(rows, label):
    return [name for name, (_, cell_classes) in zip(RUNS, rows[label][1]) if "best" in cell_classes]


def test_settings_that_differ_are_highlighted_and_a_parameter_a_method_lacks_shows_a_dash(alice, runs):
    rows = table_rows(alice.get(compare_url(runs)).content.decode())

    assert "differs" in rows["Method"][0]
    assert [cell for cell, _ in rows["Method"][1]] == ["LoRA", "LoRA", "Bottleneck adapters"]
    assert "differs" in rows["method.r"][0]
    assert [cell for cell, _ in rows["method.r"][1]] == ["8", "16", "–"]
    assert [cell for cell, _ in rows["method.bottleneck_size"][1]] == ["–", "–", "16"]
    for same in ("Base model", "Dataset", "hyperparameters.learning_rate", "hyperparameters.max_steps"):
        assert "differs" not in rows[same][0], same
    assert [cell for cell, _ in rows["hyperparameters.learning_rate"][1]] == ["0.001"] * 3


def test_the_best_run_is_marked_for_each_measurement(alice, runs):
    rows = table_rows(alice.get(compare_url(runs)).content.decode())

    assert best_runs(rows, "Peak memory (MiB)") == ["lora-r8"]
    assert best_runs(rows, "Wall time") == ["adapters"]
    assert best_runs(rows, "Tokens/s") == ["adapters"]
    assert best_runs(rows, "MFU (share of the GPUs' bf16 peak)") == ["adapters"]
    assert [cell for cell, _ in rows["MFU (share of the GPUs' bf16 peak)"][1]] == ["31%", "28%", "36% ★"]
    assert best_runs(rows, "Final train loss") == ["lora-r16"]
    assert best_runs(rows, "Eval loss") == ["lora-r16"]
    assert best_runs(rows, "Perplexity") == ["lora-r16"]
    assert best_runs(rows, "Artifact size") == ["lora-r8"]
    assert best_runs(rows, "Inference latency, unmerged (ms per batch)") == ["lora-r8", "lora-r16"]  # a tie
    assert best_runs(rows, "Inference latency, merged (ms per batch)") == ["lora-r8"]
    assert best_runs(rows, "Reference loss change (forgetting)") == ["lora-r8"]
    # Counts are facts, not merits; and no run measured accuracy.
    assert best_runs(rows, "Trainable parameters") == []
    assert best_runs(rows, "Eval accuracy") == []

    assert [cell for cell, _ in rows["Peak memory (MiB)"][1]] == ["900 ★", "950", "1,100"]
    assert [cell for cell, _ in rows["Trainable share of all parameters"][1]] == ["1%", "2%", "3%"]
    assert [cell for cell, _ in rows["Inference latency, merged (ms per batch)"][1]] == ["8.0 ★", "8.5", "cannot merge"]
    assert [cell for cell, _ in rows["Reference loss change (forgetting)"][1]] == ["+0.1000 ★", "+0.3000", "–"]


def test_the_loss_curves_of_the_runs_are_overlaid_with_a_legend(alice, runs):
    page = parse_html(alice.get(compare_url(runs)).content.decode())
    charts = {dict(svg.attributes)["aria-label"]: svg for svg in elements(page, "svg")}

    assert set(charts) == {"train loss by step", "train loss by tokens seen", "eval loss by step", "eval loss by tokens seen"}
    for label, chart in charts.items():
        lines = [line for line in elements(chart, "polyline") if "series" in classes(line)]
        assert [text(line) for line in lines] == list(RUNS), label
    # Three evaluations per run, each a dot.
    assert len(list(elements(charts["eval loss by tokens seen"], "circle"))) == 3 * 3
    legends = [text(legend) for legend in elements(page, "p") if "legend" in classes(legend)]
    assert legends == ["lora-r8 lora-r16 adapters"] * 4


def test_metrics_of_all_runs_are_read_in_a_bounded_number_of_queries(alice, team_user, catalogue, data_dirs,
                                                                      django_assert_max_num_queries):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)
    five = [create_run(team, team_user, catalogue, dataset, f"run-{n}", {"type": "lora", "r": 2 ** n}, steps=STEPS)
            for n in range(5)]
    Metric.objects.bulk_create([Metric(job=job, step=STEPS + step, train_loss=1.0, tokens_seen=64 * (STEPS + step))
                                for job in five for step in range(1, 400)])

    # The session, the user, the jobs and their metrics: the same for 5 runs as for 2.
    with django_assert_max_num_queries(4):
        page = alice.get(compare_url(five)).content.decode()
    assert page.count('class="series series-') == 4 * 5


def test_the_job_lists_form_leads_to_one_shareable_address(alice, runs):
    response = alice.get(reverse("compare"), {"jobs": [runs[0].pk, runs[2].pk]})
    assert response.status_code == 302
    assert response["Location"] == compare_url([runs[0], runs[2]])
    assert [cell for cell, _ in table_rows(alice.get(response["Location"]).content.decode())["Method"][1]] == [
        "LoRA", "Bottleneck adapters",
    ]


def test_the_table_downloads_as_csv(alice, runs):
    response = alice.get(compare_url(runs, format="csv"))

    assert response["Content-Disposition"] == f'attachment; filename="compare-jobs-{runs[0].pk}-{runs[1].pk}-{runs[2].pk}.csv"'
    rows = {row[0]: row[2:] for row in csv.reader(io.StringIO(response.content.decode()))}
    assert rows["key"] == list(RUNS)
    assert rows["id"] == [str(job.pk) for job in runs]
    assert rows["method.r"] == ["8", "16", ""]
    assert rows["peak_memory_mb"] == ["900.0", "950.0", "1100.0"]
    assert rows["latency_merged_ms"] == ["8.0", "8.5", ""]


def test_the_table_downloads_as_json(alice, runs):
    response = alice.get(compare_url(runs, format="json"))

    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith('.json"')
    table = json.loads(response.content)
    assert [job["name"] for job in table["jobs"]] == list(RUNS)
    rows = {row["key"]: row for row in table["rows"]}
    assert rows["method.r"] == {"section": "settings", "key": "method.r", "label": "method.r",
                                      "values": [8, 16, None], "differs": True}
    assert rows["eval_loss"]["values"] == [1.3, 1.25, 1.4]
    assert rows["eval_loss"]["better"] == "lower" and rows["eval_loss"]["best"] == [runs[1].pk]
    assert rows["tokens_per_sec"]["best"] == [runs[2].pk]


def test_another_teams_job_is_not_found(runs, other_team_user):
    bob = Client()
    bob.force_login(other_team_user)
    for query in ({}, {"format": "csv"}, {"format": "json"}):
        assert bob.get(compare_url(runs, **query)).status_code == 404

    # Nor mixed in with a job of bob's own.
    own = create_run(other_team_user.memberships.get().team, other_team_user, {"llama": runs[0].base_model},
                     runs[0].dataset, "bobs-run", {"type": "lora"})
    assert bob.get(compare_url([own, runs[0]])).status_code == 404


@pytest.mark.parametrize("query, status, message", [
    ("?jobs=abc", 400, "“abc” is not a job id"),
    ("?jobs=3,abc", 400, "“abc” is not a job id"),
    ("?jobs=3,-4", 400, "“-4” is not a job id"),
    ("?jobs=3,99999999999999999999", 400, "“99999999999999999999” is not a job id"),
    ("?jobs=", 200, "Pick two or more jobs to compare"),
    ("", 200, "Pick two or more jobs to compare"),
])
def test_a_selection_that_cannot_be_compared_gets_a_clear_message(alice, query, status, message):
    response = alice.get(reverse("compare") + query)
    assert response.status_code == status
    assert message in response.content.decode()


def test_one_job_is_not_a_comparison(alice, runs):
    response = alice.get(compare_url(runs[:1]))
    assert response.status_code == 200
    assert "Pick two or more jobs to compare" in response.content.decode()
    assert "<table" not in response.content.decode()


def polls(page, every="2s"):
    return f'hx-trigger="every {every}"' in page


def test_the_compare_page_refreshes_while_a_run_is_active_and_stops_when_none_is(alice, runs):
    url = compare_url(runs)
    assert not polls(alice.get(url).content.decode())

    Job.objects.filter(pk=runs[2].pk).update(status="running", step=12, finished_at=None)
    page = alice.get(url).content.decode()
    assert polls(page) and f'hx-get="{url}"' in page
    # The refresh gets only the live part, with the run's progress.
    live = alice.get(url, headers={"HX-Request": "true"}).content.decode()
    assert live.lstrip().startswith('<div id="compare-live"') and "12/30" in live and polls(live)

    Job.objects.filter(pk=runs[2].pk).update(status="succeeded", step=30)
    assert not polls(alice.get(url, headers={"HX-Request": "true"}).content.decode())


@pytest.fixture
def one_run(team_user, catalogue, data_dirs):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)
    return create_run(team, team_user, catalogue, dataset, "live-one", {"type": "lora"}, status="running", steps=10)


@pytest.mark.parametrize("page_name, live_part", [("job_list", 'id="job-rows"'), ("dashboard", 'id="dashboard-live"')])
def test_the_job_list_and_dashboard_refresh_while_a_job_runs_and_stop_when_none_does(alice, one_run, page_name, live_part):
    url = reverse(page_name)
    page = alice.get(url).content.decode()
    assert live_part in page and polls(page)
    assert "10/30" in page and "ETA" in page
    # What htmx fetches: the live part alone, still polling while the job runs.
    live = alice.get(url, headers={"HX-Request": "true"}).content.decode()
    assert live_part in live and "<html" not in live and polls(live)

    Job.objects.filter(pk=one_run.pk).update(status="succeeded", step=30, finished_at=timezone.now())
    live = alice.get(url, headers={"HX-Request": "true"}).content.decode()
    assert live_part in live and "hx-trigger" not in live
    assert "hx-trigger" not in alice.get(url).content.decode()


def test_the_job_list_has_a_compare_form(alice, runs):
    page = parse_html(alice.get(reverse("job_list")).content.decode())
    form = next(form for form in elements(page, "form") if dict(form.attributes).get("action") == reverse("compare"))
    assert dict(form.attributes)["method"] == "get"
    boxes = [dict(box.attributes) for box in elements(form, "input") if dict(box.attributes).get("type") == "checkbox"]
    assert sorted(int(box["value"]) for box in boxes) == sorted(job.pk for job in runs)
    assert {box["name"] for box in boxes} == {"jobs"}
    assert "Compare selected" in text(form)
