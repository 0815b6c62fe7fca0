"""Comparing runs in Debian's chromium: pick them on the job list, read the table and the curves."""

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.web.test_compare import RUNS, create_compared_runs, create_run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "compare.png"
BEST_BACKGROUND = "rgb(220, 252, 231)"  # td.best in static/tunedeck.css


@pytest.fixture
def runs(team_user, catalogue, data_dirs):
    finished = create_compared_runs(team_user, catalogue)
    # Another run still training keeps the job list refreshing itself while the boxes are ticked.
    team = team_user.memberships.get().team
    create_run(team, team_user, catalogue, finished[0].dataset, "still-training", {"type": "lora", "r": 4},
               status="running", steps=12)
    return finished


def log_in(page, url):
    page.goto(f"{url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-42")
    page.get_by_role("button", name="Log in").click()


def test_pick_three_runs_on_the_job_list_and_compare_them(live_server, team_user, runs, page):
    log_in(page, live_server.url)
    page.goto(f"{live_server.url}/jobs/")
    for name in RUNS:
        page.get_by_label(f"compare {name}").check()

    # The rows are redrawn while still-training runs; the ticks survive a redraw.
    with page.expect_response(lambda response: response.request.headers.get("hx-request") == "true"):
        pass
    for name in RUNS:
        expect(page.get_by_label(f"compare {name}")).to_be_checked()
    expect(page.get_by_label("compare still-training")).not_to_be_checked()

    page.get_by_role("button", name="Compare selected").click()
    # The runs come in the job list's order, newest first, and the address names them.
    shown = list(reversed(runs))
    expect(page).to_have_url(f"{live_server.url}/compare/?jobs=" + ",".join(str(job.pk) for job in shown))
    expect(page.get_by_role("heading", name="Compare runs")).to_be_visible()
    expect(page.locator("table.compare thead th.run")).to_have_text([re.compile(rf"^\s*{job.name}\s") for job in shown])

    def row(name):
        return page.locator("table.compare tr", has=page.get_by_role("rowheader", name=name))

    # lora-r8 took the least memory, lora-r16 reached the lowest eval loss.
    lora_r8, lora_r16, _ = runs
    least_memory = row("Peak memory (MiB)").locator("td").nth(shown.index(lora_r8))
    expect(least_memory).to_have_class(re.compile(r"\bbest\b"))
    expect(least_memory).to_have_css("background-color", BEST_BACKGROUND)
    expect(least_memory).to_have_text("900 ★")
    expect(row("Peak memory (MiB)").locator("td.best")).to_have_count(1)
    expect(row("Eval loss").locator("td").nth(shown.index(lora_r16))).to_have_class(re.compile(r"\bbest\b"))
    expect(row("Eval loss").locator("td.best")).to_have_text(["1.2500 ★"])

    loss_by_step = page.get_by_role("img", name="train loss by step")
    expect(loss_by_step.locator("polyline.series")).to_have_count(3)
    expect(page.get_by_role("img", name="train loss by tokens seen").locator("polyline.series")).to_have_count(3)
    legend = page.locator("figure", has=loss_by_step).locator(".legend")
    expect(legend).to_have_text(re.compile(r"adapters\s+lora-r16\s+lora-r8"))

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
