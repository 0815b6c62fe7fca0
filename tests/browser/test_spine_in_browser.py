"""A person's path through the spine, in Debian's chromium driven by Playwright."""

import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import expect

from jobs import demo_data
from tests.conftest import JOB_TIMEOUT

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "job-page.png"


# `page` comes last: Playwright runs an event loop in this thread, and the fixtures
# before it use the database, which Django refuses to do inside an event loop.
def test_log_in_upload_submit_watch_and_download(live_server, team_user, catalogue, celery_worker, tmp_path, page):
    dataset_file = tmp_path / "reverse-words.jsonl"
    demo_data.write_instruction_set(dataset_file, rows=200)

    page.goto(f"{live_server.url}/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-42")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

    page.get_by_role("link", name="Datasets").click()
    page.get_by_label("File").set_input_files(str(dataset_file))
    page.get_by_role("button", name="Upload and validate").click()
    expect(page.get_by_text("200 rows in prompt_completion format").first).to_be_visible()

    page.get_by_role("link", name="Fine-tune on it").click()
    page.get_by_label("Name").fill("browser-demo")
    page.get_by_label("Target modules").select_option("all_linear")
    page.get_by_label("Max steps").fill("30")
    page.get_by_label("Learning rate").fill("0.01")
    page.get_by_label("Max seq length").fill("64")
    page.get_by_label("Checkpoint every").fill("10")
    page.get_by_role("button", name="Queue job").click()
    expect(page.get_by_role("heading", name="browser-demo")).to_be_visible()

    # No reload from here on: the page refreshes itself while the job runs.
    expect(page.locator("#job-live .status")).to_have_text("running", timeout=JOB_TIMEOUT * 1000)
    expect(page.locator("#job-live .status")).to_have_text("succeeded", timeout=JOB_TIMEOUT * 1000)
    expect(page.locator(".step")).to_have_text("step 30/30")
    expect(page.locator("svg.chart polyline.train")).to_be_visible()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download Adapter").click()
    saved = tmp_path / "adapter.zip"
    download_info.value.save_as(saved)
    assert download_info.value.suggested_filename == "browser-demo-adapter.zip"
    with zipfile.ZipFile(saved) as archive:
        assert set(archive.namelist()) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert "PeftModel.from_pretrained" in archive.read("README.md").decode()

