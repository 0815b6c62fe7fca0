"""Running one claimed job: spawn the trainer child, report its progress, record the end.

The trainer is a child process (`python -m workers.training SPEC OUTDIR`) so a
crash, an out-of-memory or a cancel kills the child, never the worker, and the
GPU memory is freed when it exits. It talks to us in JSON lines on its stdout.

A job that asks for several GPUs runs the same engine under accelerate's
launcher, one process per GPU (DDP) on this worker's first GPUs; only rank 0
writes progress lines. The child runs in its own session and a cancel stops
its process group; torch's launcher starts each rank in a session of its own,
so the runner also keeps track of the processes under the child and stops
them one by one. A pause is asked for with a file, OUTDIR/PAUSE, which every
rank sees (a launcher would die of the SIGUSR1 that a lone trainer also
gets); the engine then finishes its step, saves a checkpoint, prints "paused"
and exits.
"""

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.utils import timezone

from jobs import lifecycle, placement
from jobs.model_card import model_card
from jobs.models import Artifact, Checkpoint, Job, Metric
from jobs.spec import JobSpec, TrainingRun
from workers.gpu import devices_for_job
from workers.training.__main__ import MEMORY_LIMIT_VARIABLE

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10
# Keys of the trainer's "finished" event that are stored on the Job as they are.
FINAL_MEASUREMENTS = (
    "train_loss", "eval_loss", "eval_accuracy", "eval_f1", "perplexity", "wall_time_s", "tokens_per_sec",
    "peak_memory_mb", "artifact_bytes", "latency_ms", "latency_merged_ms", "reference_loss_before",
    "reference_loss_after", "mfu",
)
# The file in OUTDIR whose presence asks the engine to pause after its current step (every rank checks it).
PAUSE_FILE = "PAUSE"
# Set for every trainer child: our GPU hosts need NVLink multicast (NVLS) off in NCCL and torch's symmetric memory.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
STDERR_TAIL_BYTES = 4000


def copy_dataset(dataset, workdir, stem):
    # The suffix tells the reader the container (CSV, TSV, JSON array or JSON Lines).
    path = workdir / (stem + (Path(dataset.original_filename).suffix.lower() or ".jsonl"))
    with dataset.file.open("rb") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    return str(path)


def prepare_workdir(job):
    """Copy the datasets (and the checkpoint to resume from) next to the spec: the engine reads local files only."""
    workdir = Path(settings.WORKER_RUNS_DIR) / f"job-{job.pk}"
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "out").mkdir(parents=True)
    run = TrainingRun(
        spec=JobSpec.model_validate(job.spec),
        model_path=job.base_model.path,
        dataset_path=copy_dataset(job.dataset, workdir, "dataset"),
        dataset_format=job.dataset.format,
        column_map=job.dataset.column_map,
        trust_remote_code=job.base_model.trust_remote_code,
    )
    if job.validation_dataset:
        run.eval_dataset_path = copy_dataset(job.validation_dataset, workdir, "validation")
        run.eval_dataset_format = job.validation_dataset.format
        run.eval_column_map = job.validation_dataset.column_map
    if job.reference_dataset:
        run.reference_dataset_path = copy_dataset(job.reference_dataset, workdir, "reference")
        run.reference_dataset_format = job.reference_dataset.format
        run.reference_column_map = job.reference_dataset.column_map
    if job.worker is not None and placement.shards_weights(job.worker, job.base_model, run.spec):
        run.shard_weights = True
        lifecycle.log_event(
            job, f"one GPU of {job.worker.hostname} would not hold this job whole: its weights and optimizer state "
            f"are sharded across its {run.spec.gpus} GPUs (FSDP)",
        )
    checkpoint = job.checkpoints.exclude(file="").order_by("-step").first()
    if checkpoint is not None:
        run.resume_from = str(unpack_checkpoint(checkpoint, workdir / "resume"))
        # Steps after the checkpoint (from a run that died before its next one) will run again.
        job.metrics.filter(step__gt=checkpoint.step).delete()
        Job.objects.filter(pk=job.pk).update(step=checkpoint.step)
        lifecycle.log_event(job, f"resuming from the checkpoint at step {checkpoint.step}")
    spec_path = workdir / "spec.json"
    spec_path.write_text(run.model_dump_json(indent=2))
    return workdir, spec_path


def trainer_command(spec_path, outdir, gpus, port=None):
    """The child's command line: the engine itself on one GPU, under accelerate's launcher (one process a GPU) on more."""
    engine = ["-m", "workers.training", str(spec_path), str(outdir)]
    if gpus == 1:
        return [sys.executable, *engine]
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    if port is not None:
        # Two workers of one host may each run a multi-GPU job: each needs its own rendezvous port.
        launcher += ["--main_process_port", str(port)]
    return launcher + engine


def trainer_environment(gpus, environ=os.environ):
    env = environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | MULTICAST_OFF
    if settings.TRAINER_MEMORY_LIMIT_MB:
        env[MEMORY_LIMIT_VARIABLE] = str(settings.TRAINER_MEMORY_LIMIT_MB)
    if gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = devices_for_job(gpus, environ)
    return env


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_trainer(spec_path, outdir, stderr_file, gpus=1):
    return subprocess.Popen(
        trainer_command(spec_path, outdir, gpus, port=free_port() if gpus > 1 else None),
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        cwd=settings.BASE_DIR,
        env=trainer_environment(gpus),
        start_new_session=True,  # its own process group, so a stop reaches its children (the ranks) too
    )


def processes_under(process):
    """Every process the trainer started, however deep; [] once it has exited (its children then belong to init)."""
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []


def signal_each(processes, signum):
    for child in processes:
        try:
            child.send_signal(signum)  # psutil refuses a pid that now names another process
        except psutil.Error:
            pass


def signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def stop_trainer(process, known=()):
    """SIGTERM, then SIGKILL after a grace period, to the trainer's process group and to every process under it.

    The group holds a lone trainer and whatever it starts; a launcher's ranks are in sessions of their
    own (torch's launcher starts them so), so they are signalled one by one, `known` ones included:
    those seen under the trainer earlier, should the launcher have died and left them to init.
    """
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    under = list({*known, *processes_under(process)})
    signal_group(process, signal.SIGTERM)
    signal_each(under, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(under, timeout=max(0, deadline - time.monotonic()))
    signal_each(alive, signal.SIGKILL)


def request_pause(process, outdir, gpus):
    """Ask the trainer to pause after its current step: by the PAUSE file, and a lone trainer by SIGUSR1 too."""
    (outdir / PAUSE_FILE).touch()
    if gpus == 1:
        # The signal `python -m workers.training` documents; a launcher of several ranks would die of it.
        os.kill(process.pid, signal.SIGUSR1)


def read_lines_into(stream, lines):
    for raw in stream:
        lines.put(raw)
    lines.put(None)


class ProgressReporter:
    """Turns progress events into Metric rows and Job fields, writing at most once per interval."""

    def __init__(self, job, workdir):
        self.job = job
        self.workdir = workdir
        self.outdir = workdir / "out"
        self.started = False
        self.paused = None
        self.pending_metrics = []
        self.job_fields = {}
        self.finished = None
        self.error = None
        self.artifact_dirs = {}  # kind -> directory relative to OUTDIR

    def handle(self, event):
        kind = event.get("event")
        if kind == "started":
            self.started = True
            self.job_fields.update(
                total_steps=event["total_steps"],
                trainable_params=event["trainable_params"],
                total_params=event["total_params"],
            )
            resumed_from = event.get("resumed_from_step")
            steps = f"steps {resumed_from + 1}–{event['total_steps']}" if resumed_from else f"{event['total_steps']} steps"
            gpus = event.get("gpus") or 0
            device = f"{gpus} × {event['device']}" if gpus > 1 else event["device"]
            lifecycle.log_event(
                self.job, f"training {event['train_rows']} rows ({event['eval_rows']} held out) for {steps} on {device}",
            )
        elif kind == "step":
            self.pending_metrics.append(
                Metric(
                    job=self.job,
                    step=event["step"],
                    epoch=event.get("epoch"),
                    train_loss=event.get("train_loss"),
                    learning_rate=event.get("learning_rate"),
                    tokens_per_sec=event.get("tokens_per_sec"),
                    mfu=event.get("mfu"),
                    tokens_seen=event.get("tokens_seen"),
                    gpu_memory_mb=event.get("gpu_memory_mb"),
                    cpu_memory_mb=event.get("cpu_memory_mb"),
                )
            )
            self.job_fields.update(
                step=event["step"],
                train_loss=event.get("train_loss"),
                tokens_per_sec=event.get("tokens_per_sec"),
                mfu=event.get("mfu"),
                tokens_seen=event.get("tokens_seen") or 0,
            )
        elif kind == "eval":
            self.pending_metrics.append(
                Metric(
                    job=self.job,
                    step=event["step"],
                    eval_loss=event.get("eval_loss"),
                    eval_accuracy=event.get("eval_accuracy"),
                )
            )
            self.job_fields.update(eval_loss=event.get("eval_loss"), eval_accuracy=event.get("eval_accuracy"))
        elif kind == "checkpoint":
            self.flush()  # the steps before the checkpoint are on record before it is
            store_checkpoint(self.job, event["step"], event["path"], self.outdir, self.workdir)
        elif kind == "paused":
            self.paused = event
        elif kind == "artifact" and event.get("kind") in Artifact.Kind.values:
            self.artifact_dirs[event["kind"]] = event["path"]
        elif kind == "finished":
            self.finished = event
            self.job_fields.update(step=event["steps"])
            self.job_fields.update({name: event.get(name) for name in FINAL_MEASUREMENTS if name in event})
        elif kind == "error":
            self.error = event.get("message", "the trainer failed")
        elif kind == "log":
            lifecycle.log_event(self.job, event.get("message", ""))

    def flush(self):
        if self.pending_metrics:
            Metric.objects.bulk_create(self.pending_metrics)
            self.pending_metrics = []
        if self.job_fields:
            Job.objects.filter(pk=self.job.pk).update(**self.job_fields)
            self.job_fields = {}


def stop_requests(job):
    return Job.objects.filter(pk=job.pk).values("cancel_requested_at", "pause_requested_at").get()


def stderr_tail(path):
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - STDERR_TAIL_BYTES))
        return file.read().decode("utf-8", "replace").strip()


def run_claimed_job(job):
    claimed_by = job.worker_id
    workdir, spec_path = prepare_workdir(job)
    outdir = workdir / "out"
    gpus = JobSpec.model_validate(job.spec).gpus
    reporter = ProgressReporter(job, workdir)
    cancelled = paused = False
    with open(workdir / "trainer.log", "wb") as stderr_file:
        process = start_trainer(spec_path, outdir, stderr_file, gpus)
        lines = queue.Queue()
        threading.Thread(target=read_lines_into, args=(process.stdout, lines), daemon=True).start()
        ranks = []  # a launcher's processes, as last seen: it may die before them
        next_report = time.monotonic() + settings.WORKER_REPORT_SECONDS
        while True:
            try:
                raw = lines.get(timeout=0.25)
            except queue.Empty:
                raw = b""
            if raw is None:
                break
            if raw.strip():
                try:
                    reporter.handle(json.loads(raw))
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("job %s: unreadable progress line %r", job.pk, raw[:200])
            if time.monotonic() >= next_report:
                reporter.flush()
                next_report = time.monotonic() + settings.WORKER_REPORT_SECONDS
                if gpus > 1:
                    ranks = processes_under(process) or ranks
                    if process.poll() is not None:
                        # The launcher ends after its ranks; one still running is an orphan (its launcher was
                        # killed) that would hold the pipe and its GPU. Its lines so far stay readable.
                        signal_each([rank for rank in ranks if rank.is_running()], signal.SIGKILL)
                requests = stop_requests(job)
                if not cancelled and requests["cancel_requested_at"]:
                    cancelled = True
                    stop_trainer(process, ranks)
                # Not before "started": until then the trainer may not yet handle the signal.
                elif not paused and reporter.started and requests["pause_requested_at"]:
                    paused = True
                    # The trainer finishes its step, saves a checkpoint and exits on its own.
                    request_pause(process, outdir, gpus)
        returncode = process.wait()
    # A rank still running after its launcher ended would keep its GPU's memory from the next job.
    signal_each([rank for rank in ranks if rank.is_running()], signal.SIGKILL)
    reporter.flush()
    job.refresh_from_db()
    if job.status != Job.Status.RUNNING or job.worker_id != claimed_by:
        # The reconciler took the job from us (our heartbeat stopped for too long); its new run decides.
        log.warning("job %s was handed elsewhere while this worker ran it; leaving it be", job.pk)
        return job
    store_log(job, workdir / "trainer.log")

    if cancelled or (job.cancel_requested_at and returncode != 0):
        lifecycle.transition(job, Job.Status.CANCELLED, f"cancelled at step {job.step}; the trainer was stopped")
    elif returncode == 0 and reporter.paused:
        lifecycle.transition(
            job, Job.Status.PAUSED, f"paused at step {reporter.paused['step']}; resuming continues from there"
        )
    elif returncode == 0 and reporter.finished and Artifact.Kind.ADAPTER in reporter.artifact_dirs:
        stored = []
        try:
            for kind, directory in reporter.artifact_dirs.items():
                stored.append(store_artifact(job, kind, outdir / directory, workdir))
        except OSError as exc:
            # A failed job offers no download, not even the artifacts that were stored before the error.
            for artifact in stored:
                artifact.file.delete(save=False)
                artifact.delete()
            reason = f"could not store the artifacts: {exc}"
            lifecycle.transition(job, Job.Status.FAILED, f"failed: {reason}", error_message=reason)
            return job
        lifecycle.transition(job, Job.Status.SUCCEEDED, f"finished {job.step} steps, train loss {job.train_loss:.4f}")
    else:
        reason = reporter.error or explain_exit(returncode, workdir / "trainer.log")
        lifecycle.transition(job, Job.Status.FAILED, f"failed: {reason}", error_message=reason)
    return job


def explain_exit(returncode, log_path):
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (killed; out of memory?)" if name == "SIGKILL" else ""
        return f"the trainer was stopped by {name}{hint}"
    tail = stderr_tail(log_path)
    return f"the trainer exited with code {returncode}" + (f":\n{tail[-1500:]}" if tail else "")


def zip_directory(directory, zip_path, readme=None):
    """Zip a directory; `readme` (a function of the README the directory holds, if any) writes README.md."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not (readme and path.relative_to(directory).as_posix() == "README.md"):
                archive.write(path, path.relative_to(directory).as_posix())
        if readme:
            own_readme = directory / "README.md"
            archive.writestr("README.md", readme(own_readme.read_text() if own_readme.exists() else ""))
    return zip_path


def store_artifact(job, kind, directory, workdir):
    """Zip an output directory with its model card, checksum it, and save it through the storage API."""
    job.refresh_from_db()  # the card shows the final measurements
    zip_path = zip_directory(directory, workdir / f"{kind}.zip", readme=lambda own: model_card(job, kind, own))
    with open(zip_path, "rb") as file:
        artifact = Artifact(job=job, kind=kind, size=zip_path.stat().st_size, sha256=sha256_of(file))
    try:
        with open(zip_path, "rb") as file:
            artifact.file.save(f"{kind}.zip", File(file), save=False)
        # Read back what storage holds: a short write or a corrupt upload must not be offered.
        with artifact.file.open("rb") as stored:
            stored_digest = sha256_of(stored)
        if stored_digest != artifact.sha256:
            raise OSError(f"the stored {kind} does not match what was written (sha256 differs)")
    except OSError:
        if artifact.file.name:
            artifact.file.delete(save=False)
        raise
    artifact.save()  # only now can anyone see it
    lifecycle.log_event(
        job, f"{artifact.get_kind_display()} stored ({artifact.size:,} bytes, sha256 {artifact.sha256[:12]}…)"
    )
    return artifact


def sha256_of(readable):
    digest = hashlib.sha256()
    for chunk in iter(lambda: readable.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def store_log(job, log_path):
    """Add this run's trainer output to the job's log in storage (a resumed job has several runs)."""
    earlier = b""
    if job.log_file:
        with job.log_file.open("rb") as file:
            earlier = file.read()
        job.log_file.delete(save=False)
    worker = job.worker.hostname if job.worker else "a worker"
    header = f"=== run on {worker}, ended {timezone.now():%Y-%m-%d %H:%M:%S} UTC at step {job.step} ===\n".encode()
    content = earlier + header + log_path.read_bytes()
    job.log_file.save("trainer.log", ContentFile(content), save=False)
    Job.objects.filter(pk=job.pk).update(log_file=job.log_file.name, log_size=len(content))


def store_checkpoint(job, step, path, outdir, workdir):
    """Put a checkpoint in storage, where any worker can resume from it; keep the files of the last few only."""
    zip_path = zip_directory(outdir / path, workdir / "checkpoint.zip")
    checkpoint = Checkpoint(job=job, step=step, path=path, size=zip_path.stat().st_size)
    with open(zip_path, "rb") as file:
        checkpoint.file.save("checkpoint.zip", File(file), save=False)
    checkpoint.save()
    zip_path.unlink()
    for old in job.checkpoints.exclude(file="").order_by("-step", "-id")[settings.CHECKPOINT_FILES_KEPT :]:
        old.file.delete(save=False)
        Checkpoint.objects.filter(pk=old.pk).update(file="")
    lifecycle.log_event(job, f"checkpoint saved at step {step} ({checkpoint.size:,} bytes)")
    return checkpoint


def unpack_checkpoint(checkpoint, directory):
    directory.mkdir(parents=True)
    with checkpoint.file.open("rb") as file, zipfile.ZipFile(file) as archive:
        for member in archive.infolist():
            # Written by store_checkpoint, but a path from storage must still stay inside `directory`.
            target = (directory / member.filename).resolve()
            if not target.is_relative_to(directory.resolve()):
                raise ValueError(f"checkpoint {checkpoint.pk} holds a path outside its directory: {member.filename}")
        archive.extractall(directory)
    return directory
