"""A sweep as a person makes one: the form tells the grid's size, the sweep page lists its jobs, Compare all."""

import re

import pytest
from playwright.sync_api import expect

from jobs import lifecycle
from jobs.models import Job, Worker
from jobs.uploads import store_dataset
from jobs.worker_control import queue_depths
from tests.browser.conftest import outside_the_event_loop

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

RUNS = ["rank-lr · r=4 lr=1e-4", "rank-lr · r=4 lr=3e-4", "rank-lr · r=8 lr=1e-4", "rank-lr · r=8 lr=3e-4"]


@pytest.fixture
def broker(redis_url, settings):
    """The test Redis as Celery's broker, emptied: the sweep's jobs are sent there, and no worker takes them."""
    from webapp.celery import app

    settings.CELERY_BROKER_URL = redis_url
    app.conf.broker_url = redis_url
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    return app


@pytest.fixture
def dataset(team_user, data_dirs):
    team = team_user.memberships.get().team
    return store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 8, name="sums")


def test_a_two_by_two_sweep_queues_four_jobs_and_compares_them(live_server, team_user, catalogue, dataset, broker, page):
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-42")
    page.get_by_role("button", name="Log in").click()

    page.get_by_role("link", name="New sweep").click()
    page.get_by_label("Sweep name").fill("rank-lr")
    page.get_by_label("Base model").select_option("tiny-random-llama")
    page.get_by_label(re.compile("^Dataset")).select_option(label="sums")
    page.get_by_label("Max steps").fill("5")
    page.get_by_label("Ranks r").fill("4, 8")
    size = page.locator("#sweep-size")
    expect(size).to_contain_text("2 jobs")
    page.get_by_label("Learning rates").fill("1e-4, 3e-4")
    expect(size).to_contain_text("4 jobs")
    page.get_by_role("button", name="Queue sweep").click()

    expect(page.get_by_role("heading", name="rank-lr")).to_be_visible()
    rows = page.locator("table.sweep-jobs tbody tr")
    expect(rows).to_have_count(4)
    for run in RUNS:
        expect(rows.filter(has_text=run)).to_contain_text("queued")
    assert outside_the_event_loop(lambda: Job.objects.filter(sweep__name="rank-lr", status="queued").count()) == 4
    assert outside_the_event_loop(queue_depths)["training"] == 4

    # No reload from here on: the page follows its jobs while any is queued or running.
    page.evaluate("window.notReloaded = true")

    def start_the_first_run():
        job = Job.objects.get(name=RUNS[0])
        lifecycle.claim(job.pk, Worker.objects.create(hostname="gpu0@box"))
        Job.objects.filter(pk=job.pk).update(step=2, total_steps=5)

    outside_the_event_loop(start_the_first_run)
    expect(rows.filter(has_text=RUNS[0])).to_contain_text("running", timeout=8000)
    expect(rows.filter(has_text=RUNS[0])).to_contain_text("2/5")
    assert page.evaluate("window.notReloaded") is True

    page.get_by_role("link", name="Compare all").click()
    expect(page).to_have_url(re.compile(r"/compare/\?jobs=\d+,\d+,\d+,\d+$"))
    expect(page.get_by_role("heading", name="Compare runs")).to_be_visible()
    for run in RUNS:
        expect(page.get_by_role("link", name=run).first).to_be_visible()
