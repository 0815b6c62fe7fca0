"""The playground in Debian's chromium: a base model and two LoRA adapters answer one prompt side by side.

Real parts throughout: the jobs were trained by the engine, the answers come from an inference
worker process over Redis, and the page shows them without a reload.
"""

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
ANSWER_TIMEOUT_MS = 120_000


@pytest.fixture
def two_lora_jobs(finished_job):
    return finished_job("upper-r8", seed=1, r=8), finished_job("upper-r16", seed=2, r=16)


def test_a_base_model_and_two_adapters_answer_side_by_side_and_the_second_ask_swaps(
    live_server, team_user, two_lora_jobs, inference_worker, page
):
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-42")
    page.get_by_role("button", name="Log in").click()

    page.goto(f"{live_server.url}/jobs/{two_lora_jobs[0].pk}/")
    page.get_by_role("link", name="Try it in the playground").click()
    page.get_by_role("link", name=re.compile(r"\+ upper-r16")).click()
    expect(page.get_by_role("heading", name=re.compile("Playground"))).to_contain_text("2 fine-tuned versions")

    page.evaluate("window.notReloaded = true")
    page.get_by_label("Prompt").fill("upper: tunedeck\n")
    # A value out of range comes back as an error on its field (past the browser's own check of `max`).
    max_new_tokens = page.get_by_label("Max new tokens")
    max_new_tokens.evaluate("field => field.removeAttribute('max')")
    max_new_tokens.fill("600")
    ask = page.get_by_role("button", name="Ask the base model and 2 fine-tuned versions")
    ask.click()
    expect(page.locator(".errorlist")).to_have_text("Max new tokens must be a whole number from 1 to 512.")
    expect(page.get_by_label("Prompt")).to_have_value("upper: tunedeck\n")

    page.get_by_label("Max new tokens").fill("12")
    page.get_by_label("Temperature").fill("0.7")
    page.get_by_label("Seed").fill("2")
    ask.click()

    answers = page.locator("#playground-answers .answer")
    expect(answers).to_have_count(3, timeout=ANSWER_TIMEOUT_MS)
    expect(answers.nth(0)).to_contain_text("tiny-random-llama")
    expect(answers.nth(0).locator(".readiness")).to_contain_text(re.compile(r"^loaded base model in \d+"))
    for adapter, name in ((answers.nth(1), "upper-r8"), (answers.nth(2), "upper-r16")):
        expect(adapter).to_contain_text(name)
        expect(adapter.locator(".readiness")).to_contain_text("swapped in from its artifact")
        expect(adapter.locator(".timing")).to_contain_text(re.compile(r"generated \d+ tokens? in"))
    expect(answers.nth(0).locator(".completion")).not_to_be_empty()

    # The same prompt again: the base model stayed loaded in the worker, the adapters are swapped.
    ask.click()
    expect(answers.nth(0).locator(".readiness")).to_have_text("base model already loaded", timeout=ANSWER_TIMEOUT_MS)
    for adapter in (answers.nth(1), answers.nth(2)):
        expect(adapter.locator(".readiness")).to_contain_text(re.compile(r"swapped to this adapter|already loaded"))
        expect(adapter.locator(".readiness")).not_to_contain_text("loaded base model")
    assert page.evaluate("window.notReloaded") is True

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

