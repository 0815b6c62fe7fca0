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


def visible_devices(environ=os.environ):
    """The GPUs CUDA_VISIBLE_DEVICES lets this process use, as it names them; None when it is unset (all of them).

    CUDA reads the list up to its first invalid entry, so an empty or negative entry ends it here too.
    """
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    names = []
    for name in value.split(","):
        name = name.strip()
        if not name or name.startswith("-"):
            break
        names.append(name)
    return names


def count_visible(device_count, environ=os.environ):
    """How many of the host's `device_count` GPUs this process may use (NVML ignores CUDA_VISIBLE_DEVICES)."""
    names = visible_devices(environ)
    if names is None:
        return device_count
    usable = 0
    for name in names:
        if name.isdigit() and int(name) >= device_count:
            break  # an index past the last GPU ends CUDA's list too
        usable += 1  # an index, or a GPU-/MIG- UUID
    return min(usable, device_count)


def devices_for_job(gpus, environ=os.environ):
    """CUDA_VISIBLE_DEVICES for a child that trains on `gpus` GPUs: the first ones this worker owns."""
    names = visible_devices(environ)
    if names is None:
        names = [str(index) for index in range(gpus)]
    return ",".join(names[:gpus])


def served_gpu_index():
    """The GPU this worker trains on: the first one CUDA_VISIBLE_DEVICES lets it see (NVML ignores that variable)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def read_gpu():
    """Name, memory and utilisation of the served GPU, and how many GPUs this worker owns; {} where there is no GPU
    (NVML cannot start)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(served_gpu_index())
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "gpu_name": pynvml.nvmlDeviceGetName(handle),
            "gpu_count": count_visible(pynvml.nvmlDeviceGetCount()),
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
