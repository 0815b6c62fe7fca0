import threading
from pathlib import Path

import pytest
from django.db import connection
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def page():
    """A page in Debian's chromium. Take it as a test's last fixture: Playwright runs an event loop in
    this thread, and Django refuses database work inside one (see `outside_the_event_loop`)."""
    assert Path(CHROMIUM).exists(), f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
        yield context.new_page()
        browser.close()


def outside_the_event_loop(work):
    """Run database work from a browser test, in a thread of its own, and return its result."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as error:  # noqa: BLE001 - raised again in the test's thread
            result["error"] = error
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")
