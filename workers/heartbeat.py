"""The worker's Worker row: registered when Celery is ready, refreshed by a heartbeat thread."""

import logging
import os
import threading

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from jobs.models import Worker

from .gpu import MB, gpu_load, read_gpu, software_versions

log = logging.getLogger(__name__)
_stop = threading.Event()


def host_memory_mb():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB


def register(hostname, queues):
    gpu = read_gpu()
    worker, _ = Worker.objects.update_or_create(
        hostname=hostname,
        defaults={
            "queues": ",".join(queues),
            "accelerator": gpu.get("gpu_name") or f"CPU ({os.cpu_count()} cores)",
            "gpu_name": gpu.get("gpu_name", ""),
            "gpu_count": gpu.get("gpu_count", 0),
            "gpu_memory_total_mb": gpu.get("gpu_memory_total_mb"),
            "gpu_memory_used_mb": gpu.get("gpu_memory_used_mb"),
            "gpu_utilisation_percent": gpu.get("gpu_utilisation_percent"),
            "memory_total_mb": host_memory_mb(),
            "software_versions": software_versions(),
            "pid": os.getpid(),
            "is_online": True,
            # A restarted worker consumes all its queues again, whatever it was told before.
            "is_draining": False,
            "started_at": timezone.now(),
            "last_heartbeat": timezone.now(),
            "current_job": None,
        },
    )
    return worker


def beat(hostname):
    Worker.objects.filter(hostname=hostname).update(last_heartbeat=timezone.now(), is_online=True, **gpu_load())


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
