"""The locust clients of bench/load.py: each sends GET requests to one endpoint, back to back.

Started by bench/load.py, which passes the endpoint and the credentials in the environment:
LOAD_PATH (the path and query), LOAD_NAME (its name in the figures), and either
LOAD_SESSIONS (session keys of a logged-in user, comma-separated, one per client in turn)
or LOAD_TOKEN (an API token).
"""

import itertools
import os

from locust import FastHttpUser, constant, task

PATH = os.environ["LOAD_PATH"]
NAME = os.environ["LOAD_NAME"]
SESSIONS = itertools.cycle(os.environ.get("LOAD_SESSIONS", "").split(",")) if os.environ.get("LOAD_SESSIONS") else None
TOKEN = os.environ.get("LOAD_TOKEN")


class Client(FastHttpUser):
    # A closed loop: each client sends its next request as soon as the last one is answered.
    wait_time = constant(0)

    def on_start(self):
        self.headers = {"Cookie": f"sessionid={next(SESSIONS)}"} if SESSIONS else {"Authorization": f"Bearer {TOKEN}"}

    @task
    def get(self):
        # Not following redirects: a lost session would otherwise count as a fast 200 from the login page.
        with self.client.get(PATH, headers=self.headers, name=NAME, allow_redirects=False, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"answered {response.status_code}")
