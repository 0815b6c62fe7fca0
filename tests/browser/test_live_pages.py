"""Pages that change under the user's eyes: the Workers page and the new-job form's memory estimate."""

import pytest
from playwright.sync_api import expect

from jobs.models import Worker
from tests.browser.conftest import outside_the_event_loop

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

GB = 1024


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_user("root", password="staff-pass-42", is_staff=True)


@pytest.fixture
def gpu_workers(db):
    return [
        Worker.objects.create(hostname="small@gpu1", queues="gpu-16g", gpu_memory_total_mb=16 * GB,
                              gpu_name="NVIDIA L4", accelerator="NVIDIA L4"),
        Worker.objects.create(hostname="big@gpu2", queues="gpu-80g", gpu_memory_total_mb=80 * GB,
                              gpu_name="NVIDIA H100", accelerator="NVIDIA H100"),
    ]


def log_in(page, url, username, password):
    page.goto(f"{url}/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_the_workers_page_shows_changes_without_a_reload(live_server, staff_user, gpu_workers, page):
    log_in(page, live_server.url, "root", "staff-pass-42")
    page.goto(f"{live_server.url}/workers/")
    row = page.locator("#worker-%d" % gpu_workers[1].pk)
    expect(row).to_contain_text("online")
    page.evaluate("window.notReloaded = true")

    outside_the_event_loop(
        lambda: Worker.objects.filter(hostname="big@gpu2").update(is_draining=True, gpu_utilisation_percent=87)
    )
    expect(row).to_contain_text("draining", timeout=8000)
    expect(row).to_contain_text("87%")
    assert page.evaluate("window.notReloaded") is True


def test_the_memory_estimate_follows_the_form(live_server, team_user, llama_1b_shape, gpu_workers, page):
    log_in(page, live_server.url, "alice", "wonderland-42")
    page.goto(f"{live_server.url}/jobs/new/")
    page.get_by_label("Base model").select_option("llama-1b-shape")
    page.get_by_label("Batch size").fill("1")
    estimate = page.locator("#memory-estimate")
    expect(estimate).to_contain_text("2 of 2 workers here can run it")

    page.get_by_label("Method").select_option("full")
    page.get_by_label("Batch size").fill("64")
    page.get_by_label("Max seq length").fill("4096")
    expect(estimate).to_contain_text("No worker here has enough memory")
