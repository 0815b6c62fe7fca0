"""Where a job goes: its GPU count and memory estimate against the workers', before it is queued.

A worker fits a job when it owns as many GPUs as the job asks for (a CPU-only
worker counts as one: it runs one-GPU jobs on its CPU) and each GPU holds the
estimate: whole, or, for a job of several GPUs that one would not hold, its weights
and optimizer state sharded across them (FSDP; the worker's runner then says so
in the TrainingRun). A job is refused at submission when no known worker (online or not:
an offline one may come back) could hold it. Otherwise it goes to the queue
whose online workers all fit it, preferring the queue whose workers have the
fewest GPUs, then the most such workers, then the smallest memory, so large
GPUs and multi-GPU workers stay free for the jobs that need them. When every
queue mixes workers that fit and workers that do not, the job goes to the
queue of the largest fitting worker, and a worker too small for it hands the
message back (workers.tasks.run_job).
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
    def __init__(self, estimate, largest_worker, gpus=1):
        self.estimate = estimate
        self.largest_worker = largest_worker
        super().__init__(describe_refusal(estimate, largest_worker, gpus))


class TooFewGpus(WontFit):
    def __init__(self, gpus, largest_worker):
        self.gpus = gpus
        self.estimate = None
        self.largest_worker = largest_worker
        Exception.__init__(self, describe_gpu_refusal(gpus, largest_worker))


def estimate_for(base_model, spec, device="cuda", shards=1):
    return estimate_peak_memory(base_model.architecture_info, spec, device, shards)


def has_gpus_for(worker, spec):
    return worker.gpu_slots >= spec.gpus


def can_shard(spec):
    """Whether the job could train sharded (FSDP): over several GPUs, and not QLoRA, whose 4-bit weights
    are not sharded (that method is the way to fit a model into one GPU)."""
    return spec.gpus > 1 and spec.method.type != "qlora"


def shards_weights(worker, base_model, spec):
    """Whether the job trains sharded on this worker: it could, and one of the worker's GPUs would not hold it whole."""
    if not can_shard(spec) or worker.device != "cuda":
        return False
    whole = estimate_for(base_model, spec)
    return whole is not None and not whole.fits(worker.capacity_mb)


def estimate_on(worker, base_model, spec):
    """The estimate per GPU, as the job would train on this worker: whole, or sharded where it must be."""
    shards = spec.gpus if shards_weights(worker, base_model, spec) else 1
    return estimate_for(base_model, spec, worker.device, shards)


def fits_in_memory(worker, base_model, spec):
    estimate = estimate_on(worker, base_model, spec)
    return estimate is None or estimate.fits(worker.capacity_mb)


def fits(worker, base_model, spec):
    return has_gpus_for(worker, spec) and fits_in_memory(worker, base_model, spec)


def place(base_model, spec):
    """Placement for a job, or WontFit (TooFewGpus for the GPU count) when no worker could ever hold it."""
    estimate = estimate_for(base_model, spec)
    workers = [worker for worker in Worker.objects.all() if worker.capacity_mb]
    if not workers:
        return Placement(DEFAULT_QUEUE, estimate, 0, 0)
    with_gpus = [worker for worker in workers if has_gpus_for(worker, spec)]
    if not with_gpus:
        raise TooFewGpus(spec.gpus, max(workers, key=lambda worker: worker.gpu_slots))
    if estimate is None and spec.gpus == 1:
        return Placement(DEFAULT_QUEUE, estimate, 0, len(workers))
    fitting = [worker for worker in with_gpus if fits_in_memory(worker, base_model, spec)]
    if not fitting:
        largest = max(with_gpus, key=lambda worker: worker.capacity_mb)
        raise WontFit(estimate_on(largest, base_model, spec), largest, spec.gpus)

    candidates = []
    for queue in sorted({name for worker in workers for name in worker.queue_names}):
        serving = [worker for worker in workers if queue in worker.queue_names]
        online = [worker for worker in serving if worker.is_online] or serving
        if all(worker in fitting for worker in online):
            candidates.append((
                max(worker.gpu_slots for worker in online), -len(online),
                min(worker.capacity_mb for worker in online), queue,
            ))
    if candidates:
        queue = min(candidates)[-1]
    else:
        queue = max(fitting, key=lambda worker: worker.capacity_mb).queue_names[0]
    return Placement(queue, estimate, len(fitting), len(workers))


def describe_refusal(estimate, largest_worker, gpus=1):
    device = "GPU" if largest_worker.device == "cuda" else "host"
    largest = "the largest worker" if gpus == 1 else f"the largest worker with {gpus} GPUs"
    return (
        f"this job needs about {gigabytes(estimate.needed_on_card_mb())} of {'GPU ' if estimate.device == 'cuda' else ''}memory "
        f"({describe_parts(estimate)}), and {largest}, {largest_worker.hostname}, has "
        f"{gigabytes(largest_worker.capacity_mb)} ({device}); try QLoRA, a smaller batch_size or "
        "max_seq_length, or fewer target modules"
    )


def describe_gpu_refusal(gpus, largest_worker):
    if largest_worker.gpu_count == 0:
        has = f"no GPU ({largest_worker.hostname} trains on its CPU, one process)"
    else:
        has = f"{largest_worker.gpu_count} ({largest_worker.hostname})"
    return f"this job asks for {gpus} GPUs; the largest worker here has {has}; ask for at most {largest_worker.gpu_slots}"


def describe_parts(estimate):
    return ", ".join(f"{name} {gigabytes(size)}" for name, size in estimate.parts_mb.items() if size >= 1)


def gigabytes(megabytes):
    return f"{megabytes / 1024:.1f} GB" if megabytes >= 1024 else f"{megabytes:.0f} MB"
