"""What a worker can tell about its GPU and software, read through NVML: no Django, no torch."""

import importlib.metadata
import logging
import os

import pynvml

log = logging.getLogger(__name__)
REPORTED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")
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
