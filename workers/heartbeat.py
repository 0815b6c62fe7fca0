"""The worker's Worker row: registered when Celery is ready, refreshed by a heartbeat thread."""

import importlib.metadata
import logging
import os
import threading

import pynvml
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from jobs.models import Worker

log = logging.getLogger(__name__)
_stop = threading.Event()
REPORTED_PACKAGES = ("torch", "transformers", "peft")
MB = 1024 * 1024


def software_versions():
    versions = {}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def served_gpu_index():
    """The GPU this worker trains on: the first one CUDA_VISIBLE_DEVICES lets it see (NVML ignores that variable)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def read_gpu():
    """Name, memory and utilisation of the served GPU; {} where there is no GPU (NVML cannot start)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(served_gpu_index())
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "gpu_name": pynvml.nvmlDeviceGetName(handle),
            "gpu_memory_total_mb": memory.total // MB,
            "gpu_memory_used_mb": memory.used // MB,
            "gpu_utilisation_percent": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        }
    except pynvml.NVMLError:
        log.exception("NVML started but could not read GPU %s", served_gpu_index())
        return {}
    finally:
        pynvml.nvmlShutdown()


def gpu_load():
    """What changes while the worker runs, for the heartbeat."""
    gpu = read_gpu()
    return {key: gpu[key] for key in ("gpu_memory_used_mb", "gpu_utilisation_percent") if key in gpu}


def register(hostname, queues):
    gpu = read_gpu()
    worker, _ = Worker.objects.update_or_create(
        hostname=hostname,
        defaults={
            "queues": ",".join(queues),
            "accelerator": gpu.get("gpu_name") or f"CPU ({os.cpu_count()} cores)",
            "gpu_name": gpu.get("gpu_name", ""),
            "gpu_memory_total_mb": gpu.get("gpu_memory_total_mb"),
            "gpu_memory_used_mb": gpu.get("gpu_memory_used_mb"),
            "gpu_utilisation_percent": gpu.get("gpu_utilisation_percent"),
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
