import hashlib
import json
import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Count, F, Q, Window
from django.db.models.functions import Greatest, Mod
from django.db.models.lookups import Exact
from django.utils import timezone

from .spec import CANNOT_MERGE_REASONS, METHOD_LABELS


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Empty means no limit.
    max_running_jobs = models.PositiveIntegerField(null=True, blank=True, help_text="jobs training at once")
    max_queued_jobs = models.PositiveIntegerField(null=True, blank=True, help_text="jobs waiting for a worker")

    def __str__(self):
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member"
        ADMIN = "admin"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership_per_team")]

    def __str__(self):
        return f"{self.user} in {self.team} ({self.role})"


class BaseModel(models.Model):
    """An entry of the catalogue of base models a job can start from."""

    class Architecture(models.TextChoices):
        LLAMA = "llama", "Llama-style decoder"
        BERT = "bert", "BERT-style encoder"

    name = models.CharField(max_length=200, unique=True)
    path = models.CharField(max_length=500, help_text="local directory or hub id, read with from_pretrained")
    task = models.CharField(max_length=40, choices=[("causal_lm_sft", "Causal LM"), ("sequence_classification", "Classification")])
    architecture = models.CharField(max_length=20, choices=Architecture.choices)
    description = models.TextField(blank=True)
    suggested_settings = models.JSONField(
        default=dict, blank=True, help_text="new-job form values that suit this model, e.g. {\"learning_rate\": 0.01}"
    )

    # What submission checks need without loading the model: hidden size, linear layer names.
    architecture_info = models.JSONField(default=dict, blank=True)
    # A model that ships its own Python code (auto_map in its config) runs that code on every worker that loads it.
    trust_remote_code = models.BooleanField(
        default=False, help_text="let workers run the Python code this model ships (its config's auto_map); only for "
        "code you have read and trust",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


def dataset_upload_path(dataset, filename):
    # Never the user's file name: paths are generated, so no upload can pick where it lands.
    return f"datasets/team-{dataset.team_id}/{uuid.uuid4().hex}"


class Dataset(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="datasets")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    name = models.CharField(max_length=200)
    original_filename = models.CharField(max_length=255)
    file = models.FileField(upload_to=dataset_upload_path)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    format = models.CharField(max_length=30, blank=True)
    column_map = models.JSONField(default=dict, blank=True)
    rows = models.IntegerField(default=0)
    is_valid = models.BooleanField(default=False)
    problems = models.JSONField(default=list, blank=True)
    problem_count = models.IntegerField(default=0)
    stats = models.JSONField(default=dict, blank=True)
    preview = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.name

    @property
    def kind(self):
        from .datasets import FORMATS

        return FORMATS[self.format][0] if self.format in FORMATS else None

    @property
    def problems_not_shown(self):
        return max(0, self.problem_count - len(self.problems))


def job_log_path(job, filename):
    return f"logs/team-{job.team_id}/job-{job.pk}/{uuid.uuid4().hex}.log"


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        PAUSED = "paused"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    name = models.CharField(max_length=200, blank=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="jobs")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="jobs")
    validation_dataset = models.ForeignKey(
        Dataset, on_delete=models.PROTECT, null=True, blank=True, related_name="validation_jobs"
    )
    # The forgetting check: text from the base model's own domain, its loss measured before and after.
    reference_dataset = models.ForeignKey(
        Dataset, on_delete=models.PROTECT, null=True, blank=True, related_name="reference_jobs"
    )
    sweep = models.ForeignKey("Sweep", on_delete=models.CASCADE, null=True, blank=True, related_name="jobs")
    sweep_point = models.JSONField(default=dict, blank=True, help_text='this job\'s values of the sweep\'s grid')
    spec = models.JSONField(help_text="a JobSpec, validated at submission")
    # Changed only through jobs.lifecycle, which checks the transition and writes a JobEvent.
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    priority = models.IntegerField(default=0)
    queue = models.CharField(max_length=50, default="training")
    worker = models.ForeignKey("Worker", on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    pause_requested_at = models.DateTimeField(null=True, blank=True)
    # What the job should take on a GPU, worked out at submission (workers.training.memory_estimate).
    estimated_memory_mb = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(null=True, blank=True)
    tokens_seen = models.BigIntegerField(default=0)
    tokens_per_sec = models.FloatField(null=True, blank=True)
    # Model FLOPs utilisation, 0-1 of the GPUs' dense bf16 peak: live while running, the whole run's when finished.
    mfu = models.FloatField(null=True, blank=True)
    train_loss = models.FloatField(null=True, blank=True)
    eval_loss = models.FloatField(null=True, blank=True)
    eval_accuracy = models.FloatField(null=True, blank=True)
    trainable_params = models.BigIntegerField(null=True, blank=True)
    total_params = models.BigIntegerField(null=True, blank=True)
    wall_time_s = models.FloatField(null=True, blank=True)
    # Measured by the worker at the end of the job, for the job page and the compare view.
    eval_f1 = models.FloatField(null=True, blank=True)
    perplexity = models.FloatField(null=True, blank=True)
    peak_memory_mb = models.FloatField(null=True, blank=True)
    artifact_bytes = models.BigIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    latency_merged_ms = models.FloatField(null=True, blank=True)
    reference_loss_before = models.FloatField(null=True, blank=True)
    reference_loss_after = models.FloatField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    # The trainer's own output (stderr), every run of the job one after another.
    log_file = models.FileField(upload_to=job_log_path, max_length=300, blank=True)
    log_size = models.BigIntegerField(default=0, help_text="bytes of log_file, for the team's storage use")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.display_name

    @property
    def display_name(self):
        return self.name or f"job-{self.pk}"

    @property
    def is_active(self):
        return self.status in self.ACTIVE_STATUSES

    @property
    def reference_loss_change(self):
        """The forgetting check's result: how much the loss on the base domain rose, in percent."""
        if self.reference_loss_before and self.reference_loss_after is not None:
            return 100 * (self.reference_loss_after - self.reference_loss_before) / self.reference_loss_before
        return None

    @property
    def spec_json(self):
        return json.dumps(self.spec, indent=2)

    @property
    def method_name(self):
        return self.spec.get("method", {}).get("type", "lora")

    @property
    def method_label(self):
        return METHOD_LABELS.get(self.method_name, self.method_name)

    @property
    def cannot_merge_reason(self):
        return CANNOT_MERGE_REASONS.get(self.method_name)

    @property
    def progress_percent(self):
        if not self.total_steps:
            return 0
        return min(100, round(100 * self.step / self.total_steps))

    @property
    def trainable_percent(self):
        if not self.trainable_params or not self.total_params:
            return None
        return 100 * self.trainable_params / self.total_params

    @property
    def eta(self):
        """Time left, extrapolated from the steps done so far."""
        if self.status != self.Status.RUNNING or not self.started_at or not self.step or not self.total_steps:
            return None
        elapsed = timezone.now() - self.started_at
        return elapsed / self.step * (self.total_steps - self.step)

    @property
    def duration(self):
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at


class Sweep(models.Model):
    """One base spec and a grid of values: a job per point of the grid, compared by one metric."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="sweeps")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    name = models.CharField(max_length=200, blank=True)
    base_spec = models.JSONField(help_text="the JobSpec every point starts from")
    grid = models.JSONField(help_text='dotted JobSpec field -> values, e.g. {"method.r": [4, 8]}')
    metric = models.CharField(max_length=40, default="eval_loss", help_text="what picks the best run")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.name or f"sweep-{self.pk}"


class JobEvent(models.Model):
    class Kind(models.TextChoices):
        STATUS = "status"
        INFO = "info"
        ERROR = "error"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.INFO)
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20, blank=True)
    message = models.TextField()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self):
        return f"{self.job_id} {self.kind}: {self.message}"


class MetricQuerySet(models.QuerySet):
    def loss_curve_points(self, max_points):
        """The rows that draw each job's train and eval loss: at most `max_points` of each per job.

        Picked in the database, evenly spread by position with the first and the last kept, so a
        job of 100,000 steps sends a few hundred rows, not all of them, and one query serves any
        number of jobs.
        """
        in_order = {"partition_by": [F("job_id")], "order_by": [F("step").asc(), F("id").asc()]}
        whole_job = {"partition_by": [F("job_id")]}
        rows = self.filter(Q(train_loss__isnull=False) | Q(eval_loss__isnull=False)).annotate(
            # Count(column) counts the rows where it is set: a row's place among its job's train (or eval) rows.
            train_place=Window(Count("train_loss"), **in_order),
            train_rows=Window(Count("train_loss"), **whole_job),
            eval_place=Window(Count("eval_loss"), **in_order),
            eval_rows=Window(Count("eval_loss"), **whole_job),
        )
        return rows.filter(
            Q(train_loss__isnull=False) & _every_nth_and_last("train_place", "train_rows", max_points)
            | Q(eval_loss__isnull=False) & _every_nth_and_last("eval_place", "eval_rows", max_points)
        ).order_by("job_id", "step", "id")


def _every_nth_and_last(place, rows, max_points):
    """Places 1, 1 + n, 1 + 2n, … and the last, at most max_points in all: n = ceil(rows / (max_points - 1))."""
    # Integer division in SQL, both operands being integers; at least 1, as PostgreSQL computes the modulo
    # for every row, even one whose other condition already decided, and a job with no eval rows has 0.
    stride = Greatest((F(rows) + (max_points - 2)) / (max_points - 1), 1)
    return Q(**{rows: F(place)}) | Q(Exact(Mod(F(place) - 1, stride), 0))


class Metric(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    step = models.IntegerField()
    epoch = models.FloatField(null=True)
    train_loss = models.FloatField(null=True)
    eval_loss = models.FloatField(null=True)
    eval_accuracy = models.FloatField(null=True)
    learning_rate = models.FloatField(null=True)
    tokens_per_sec = models.FloatField(null=True)
    mfu = models.FloatField(null=True)  # null on a CPU or a GPU whose peak the engine does not know
    tokens_seen = models.BigIntegerField(null=True)
    gpu_memory_mb = models.FloatField(null=True)
    cpu_memory_mb = models.FloatField(null=True)

    objects = MetricQuerySet.as_manager()

    class Meta:
        ordering = ["step", "id"]
        indexes = [models.Index(fields=["job", "step"])]


def artifact_upload_path(artifact, filename):
    return f"artifacts/team-{artifact.job.team_id}/job-{artifact.job_id}/{uuid.uuid4().hex}-{artifact.kind}.zip"


class Artifact(models.Model):
    class Kind(models.TextChoices):
        ADAPTER = "adapter", "Adapter (zip)"
        MERGED = "merged", "Merged model (zip)"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    file = models.FileField(upload_to=artifact_upload_path, max_length=300)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    @property
    def download_name(self):
        return f"{self.job.display_name}-{self.kind}.zip"


class Worker(models.Model):
    hostname = models.CharField(max_length=255, unique=True)
    queues = models.CharField(max_length=255, default="training")
    accelerator = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True)
    is_online = models.BooleanField(default=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_heartbeat = models.DateTimeField(default=timezone.now)
    current_job = models.ForeignKey(Job, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # Read through NVML; empty on a CPU-only worker.
    gpu_name = models.CharField(max_length=255, blank=True)
    # The GPUs this worker owns (NVML's count, within CUDA_VISIBLE_DEVICES); a multi-GPU job needs as many.
    gpu_count = models.PositiveSmallIntegerField(default=0)
    gpu_memory_total_mb = models.IntegerField(null=True, blank=True)
    gpu_memory_used_mb = models.IntegerField(null=True, blank=True)
    gpu_utilisation_percent = models.IntegerField(null=True, blank=True)
    memory_total_mb = models.IntegerField(null=True, blank=True, help_text="the host's RAM")
    software_versions = models.JSONField(default=dict, blank=True, help_text='e.g. {"torch": "2.8.0"}')
    # Set by staff: the worker finishes its current job and takes no new one until resumed.
    is_draining = models.BooleanField(default=False)

    class Meta:
        ordering = ["hostname"]

    def __str__(self):
        return self.hostname

    @property
    def queue_names(self):
        return [name for name in self.queues.split(",") if name]

    @property
    def device(self):
        return "cuda" if self.gpu_memory_total_mb else "cpu"

    @property
    def gpu_slots(self):
        """The most GPUs a job may ask for here: a CPU-only worker runs a one-GPU job on its CPU, as it always has."""
        return max(1, self.gpu_count)

    @property
    def capacity_mb(self):
        """The memory a job trains in here: the GPU's, or the host's on a CPU-only worker."""
        return self.gpu_memory_total_mb or self.memory_total_mb

    @property
    def seconds_since_heartbeat(self):
        return (timezone.now() - self.last_heartbeat) / timedelta(seconds=1)


def checkpoint_upload_path(checkpoint, filename):
    return f"checkpoints/team-{checkpoint.job.team_id}/job-{checkpoint.job_id}/{uuid.uuid4().hex}.zip"


class Checkpoint(models.Model):
    """A checkpoint the trainer wrote: the adapter so far plus the state to resume training from.

    `path` is where the trainer wrote it, relative to the job's output directory;
    `file` is its zip in storage, where any worker can resume from it (emptied for
    all but the last few, see settings.CHECKPOINT_FILES_KEPT).
    """

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.IntegerField()
    path = models.CharField(max_length=300)
    file = models.FileField(upload_to=checkpoint_upload_path, max_length=300, blank=True)
    size = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["step", "id"]

    def __str__(self):
        return f"{self.job} at step {self.step}"


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token for the API. Only the sha256 of the token is stored; the user sees it once."""

    TOKEN_START = "td-"
    PREFIX_LENGTH = 10  # "td-" and 7 characters: enough to tell tokens apart in the list

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=PREFIX_LENGTH)
    hashed_secret = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, user, name):
        """Create a token; return the row and the token itself, which is not kept anywhere."""
        token = cls.TOKEN_START + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, prefix=token[: cls.PREFIX_LENGTH], hashed_secret=hash_token(token))
        return row, token

    @property
    def is_revoked(self):
        return self.revoked_at is not None

    def revoke(self):
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])
