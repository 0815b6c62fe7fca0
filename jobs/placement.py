"""Where a job goes: its memory estimate against the workers' memory, before it is queued.

A job is refused at submission when no known worker (online or not: an offline
one may come back) could hold it. Otherwise it goes to the queue whose online
workers all fit it, preferring the queue with the most such workers, then the
one with the smallest memory, so large GPUs stay free for the jobs that need
them. When every queue mixes workers that fit and workers that do not, the job
goes to the queue of the largest fitting worker, and a worker too small for it
hands the message back (workers.tasks.run_job).
"""

from dataclasses import dataclass

from workers.training.memory_estimate import estimate_peak_memory

from .models import Worker

DEFAULT_QUEUE = "training"


@dataclass
class Placement:
    queue: str
    estimate: object  # MemoryEstimate for a GPU, or None when the model has no recorded shapes
    workers_that_fit: int
    workers_known: int


class WontFit(Exception):
    def __init__(self, estimate, largest_worker):
        self.estimate = estimate
        self.largest_worker = largest_worker
        super().__init__(describe_refusal(estimate, largest_worker))


def estimate_for(base_model, spec, device="cuda"):
    return estimate_peak_memory(base_model.architecture_info, spec, device)


def fits(worker, base_model, spec):
    estimate = estimate_for(base_model, spec, worker.device)
    return estimate is None or estimate.fits(worker.capacity_mb)


def place(base_model, spec):
    """Placement for a job, or WontFit when no worker could ever hold it."""
    estimate = estimate_for(base_model, spec)
    workers = [worker for worker in Worker.objects.all() if worker.capacity_mb]
    if estimate is None or not workers:
        return Placement(DEFAULT_QUEUE, estimate, 0, len(workers))
    fitting = [worker for worker in workers if fits(worker, base_model, spec)]
    if not fitting:
        largest = max(workers, key=lambda worker: worker.capacity_mb)
        raise WontFit(estimate_for(base_model, spec, largest.device), largest)

    candidates = []
    for queue in sorted({name for worker in workers for name in worker.queue_names}):
        serving = [worker for worker in workers if queue in worker.queue_names]
        online = [worker for worker in serving if worker.is_online] or serving
        if all(worker in fitting for worker in online):
            candidates.append((-len(online), min(worker.capacity_mb for worker in online), queue))
    if candidates:
        queue = min(candidates)[2]
    else:
        queue = max(fitting, key=lambda worker: worker.capacity_mb).queue_names[0]
    return Placement(queue, estimate, len(fitting), len(workers))


def describe_refusal(estimate, largest_worker):
    device = "GPU" if largest_worker.device == "cuda" else "host"
    return (
        f"this job needs about {gigabytes(estimate.needed_on_card_mb())} of {'GPU ' if estimate.device == 'cuda' else ''}memory "
        f"({describe_parts(estimate)}), and the largest worker, {largest_worker.hostname}, has "
        f"{gigabytes(largest_worker.capacity_mb)} ({device}); try QLoRA, a smaller batch_size or "
        "max_seq_length, or fewer target modules"
    )


def describe_parts(estimate):
    return ", ".join(f"{name} {gigabytes(size)}" for name, size in estimate.parts_mb.items() if size >= 1)


def gigabytes(megabytes):
    return f"{megabytes / 1024:.1f} GB" if megabytes >= 1024 else f"{megabytes:.0f} MB"
