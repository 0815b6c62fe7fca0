"""The worker's Worker row: registered when Celery is ready, refreshed by a heartbeat thread."""

import logging
import os
import shutil
import subprocess
import threading

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from jobs.models import Worker

log = logging.getLogger(__name__)
_stop = threading.Event()


def describe_accelerator():
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
            if out:
                return "; ".join(line.strip() for line in out.splitlines())
        except (subprocess.SubprocessError, OSError):
            pass
    return f"CPU ({os.cpu_count()} cores)"


def register(hostname, queues):
    worker, _ = Worker.objects.update_or_create(
        hostname=hostname,
        defaults={
            "queues": ",".join(queues),
            "accelerator": describe_accelerator(),
            "pid": os.getpid(),
            "is_online": True,
            "started_at": timezone.now(),
            "last_heartbeat": timezone.now(),
            "current_job": None,
        },
    )
    return worker


def beat(hostname):
    Worker.objects.filter(hostname=hostname).update(last_heartbeat=timezone.now(), is_online=True)


def start(hostname, queues):
    register(hostname, queues)

    def loop():
        while not _stop.wait(settings.WORKER_HEARTBEAT_SECONDS):
            try:
                close_old_connections()
                beat(hostname)
            except Exception:  # a database hiccup must not kill the heartbeat for good
                log.exception("heartbeat of %s failed", hostname)

    threading.Thread(target=loop, name="tunedeck-heartbeat", daemon=True).start()


def stop(hostname):
    _stop.set()
    Worker.objects.filter(hostname=hostname).update(is_online=False, current_job=None)
