"""Sweeps: one base JobSpec and a grid of values, expanded into a job per point of the grid.

A grid maps a dotted JobSpec path (`method.type`, `method.r`, `hyperparameters.learning_rate`,
`dataset`, ...) to the values to try. The rules, in the order they apply:

- The points of the grid are its cartesian product, per method: `method.type` (or the base
  spec's method when the grid has no `method.type`) picks the method, and every other key
  multiplies the points of the methods that have that setting.
- A `method.*` key that a point's method does not have (a LoRA rank for IA³ or adapters) is
  left out of that point, so the points that differed only in it are one point: methods
  {lora, adapter, ia3} × r {4, 8, 16} × learning rate {1e-4, 3e-4} is 6 LoRA + 2 adapter +
  2 IA³ = 10 jobs.
- A point of the base spec's method keeps the base's method settings; so does a point of a
  variant of it (LoRA, DoRA and QLoRA share LoRA's settings). Any other method starts from its
  own defaults, since the base's settings mean nothing to it.
- Every point is validated as a JobSpec before anything is created; a refusal names the grid
  key and the value.
"""

import copy
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

from django.conf import settings
from django.db import transaction
from pydantic import ValidationError

from .models import Job, Sweep, Team
from .spec import (
    METHOD_LABELS,
    AdapterConfig,
    DoraConfig,
    FullFineTuningConfig,
    Hyperparameters,
    Ia3Config,
    JobSpec,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoraConfig,
)
from .submission import QuotaExceeded, SubmissionError, submit_job

METHOD_CONFIGS = {
    config.model_fields["type"].default: config
    for config in (LoraConfig, QLoraConfig, DoraConfig, Ia3Config, AdapterConfig, PrefixTuningConfig,
                   PromptTuningConfig, FullFineTuningConfig)
}
# Sections of a JobSpec whose fields a grid key names with a dot; the other fields are named alone.
SECTIONS = ("method", "hyperparameters")
# Short names in job names, where the field's own name is long: "lora r=8 lr=3e-4".
SHORT_NAMES = {"learning_rate": "lr", "batch_size": "batch", "max_seq_length": "seq"}


class Objective(NamedTuple):
    label: str
    higher_is_better: bool
    decimals: int = 4

    @property
    def direction(self):
        return "higher is better" if self.higher_is_better else "lower is better"


# The Job fields a sweep can be judged by.
SWEEP_METRICS = {
    "eval_loss": Objective("eval loss", higher_is_better=False),
    "train_loss": Objective("train loss", higher_is_better=False),
    "eval_accuracy": Objective("eval accuracy", higher_is_better=True),
    "eval_f1": Objective("eval macro-F1", higher_is_better=True),
    "perplexity": Objective("perplexity", higher_is_better=False),
    "tokens_per_sec": Objective("tokens/s", higher_is_better=True, decimals=0),
    "peak_memory_mb": Objective("peak memory (MiB)", higher_is_better=False, decimals=0),
}


class GridError(SubmissionError):
    """The grid cannot make a sweep; `field` is the grid key at fault, None for the grid as a whole."""


@dataclass
class SweepPoint:
    values: dict  # grid key -> value, for the keys that apply to this point
    spec: JobSpec

    @property
    def description(self):
        return describe_point(self.values)


def format_value(value):
    """A grid value as people write it: 3e-4 rather than 0.0003."""
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(format_value(item) for item in value)
    return str(value)


def describe_point(values):
    parts = []
    for key, value in values.items():
        if key == "method.type":
            parts.append(value)
        else:
            field = key.rpartition(".")[2]
            parts.append(f"{SHORT_NAMES.get(field, field)}={format_value(value)}")
    return " ".join(parts)


def check_grid_key(key):
    section, dot, field = key.partition(".")
    if section == "method" and dot:
        if not any(field in config.model_fields for config in METHOD_CONFIGS.values()):
            raise GridError(key, f"{key}: no method has a setting named {field!r}")
    elif section == "hyperparameters" and dot:
        if field not in Hyperparameters.model_fields:
            raise GridError(key, f"{key}: not a hyperparameter; they are: {', '.join(Hyperparameters.model_fields)}")
    elif section in SECTIONS:
        raise GridError(key, f"{key}: give a field of it, e.g. {section}.{'r' if section == 'method' else 'learning_rate'}")
    elif dot or section not in JobSpec.model_fields:
        raise GridError(key, f"{key}: not a field of a JobSpec")


def applies(key, method_type):
    section, _, field = key.partition(".")
    return section != "method" or field in METHOD_CONFIGS[method_type].model_fields


def distinct(values):
    # By equality, not by JSON text: 8 and 8.0 make the same job.
    kept = []
    for value in values:
        if value not in kept:
            kept.append(value)
    return kept


def clean_grid(grid):
    """The grid with its keys checked and repeated values dropped; raises GridError."""
    if not isinstance(grid, dict) or not grid:
        raise GridError(None, "give at least one grid key with the values to try")
    cleaned = {}
    for key, values in grid.items():
        check_grid_key(key)
        if not isinstance(values, list) or not values:
            raise GridError(key, f"{key}: give a list of at least one value")
        cleaned[key] = distinct(values)
    for method_type in cleaned.get("method.type", []):
        if not isinstance(method_type, str) or method_type not in METHOD_CONFIGS:
            raise GridError("method.type", f"method.type = {method_type}: not a method; the methods are: "
                                           f"{', '.join(METHOD_CONFIGS)}")
    return cleaned


def points_per_method(base_method_type, grid):
    """How many jobs the grid makes for each of its methods; raises GridError beyond the cap.

    Counted, not enumerated, so that a huge grid is refused before it is built.
    """
    methods = grid.get("method.type", [base_method_type])
    for key in grid:
        if not any(applies(key, method_type) for method_type in methods):
            labels = ", ".join(METHOD_LABELS[method_type] for method_type in methods)
            raise GridError(key, f"{key}: applies to none of this sweep's methods ({labels})")
    counts = {
        method_type: math.prod(len(values) for key, values in grid.items()
                               if key != "method.type" and applies(key, method_type))
        for method_type in methods
    }
    total = sum(counts.values())
    if total > settings.TUNEDECK_SWEEP_MAX_JOBS:
        raise GridError(None, f"this grid makes {total} jobs; a sweep may have at most "
                              f"{settings.TUNEDECK_SWEEP_MAX_JOBS} (TUNEDECK_SWEEP_MAX_JOBS)")
    return counts


def left_out_keys(base_method_type, grid):
    """Grid key -> the labels of the methods whose points leave it out, for the form to explain the count."""
    methods = grid.get("method.type", [base_method_type])
    left_out = {key: [METHOD_LABELS[method_type] for method_type in methods if not applies(key, method_type)]
                for key in grid}
    return {key: labels for key, labels in left_out.items() if labels}


def method_settings_for(base_method, method_type):
    """The base's method section, carried over to a point of `method_type` where it means the same."""
    base_config = METHOD_CONFIGS[base_method["type"]]
    config = METHOD_CONFIGS[method_type]
    if not (issubclass(config, base_config) or issubclass(base_config, config)):
        return {"type": method_type}
    shared = base_config.model_fields.keys() & config.model_fields.keys()
    return {name: value for name, value in base_method.items() if name in shared} | {"type": method_type}


def spec_data_for(base_data, values):
    data = copy.deepcopy(base_data)
    data["method"] = method_settings_for(base_data["method"], values.get("method.type", base_data["method"]["type"]))
    for key, value in values.items():
        section, dot, field = key.partition(".")
        if dot:
            data[section][field] = value
        else:
            data[section] = value
    return data


def explain_refusal(error, values):
    """A pydantic error of one point, as '<grid key> = <value>: <reason>' where a grid key is at fault."""
    location = list(error["loc"])
    if location[:1] == ["method"] and len(location) > 1 and location[1] in METHOD_CONFIGS:
        del location[1]  # the discriminator's tag: the field is method.r, whatever the method
    key = ".".join(str(part) for part in location)
    limit = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"),
             "less_than_equal": ("≤", "le"), "less_than": ("<", "lt")}.get(error["type"])
    reason = f"must be {limit[0]} {format_value(error['ctx'][limit[1]])}" if limit else error["msg"].removeprefix("Value error, ")
    if key in values:
        return key, f"{key} = {format_value(values[key])}: {reason}"
    where = f"{key}: " if key else ""
    return None, f"{describe_point(values)}: {where}{reason}"


def expand_grid(base_spec: JobSpec, grid):
    """Every point of the grid as a validated JobSpec; raises GridError naming the key and value at fault."""
    grid = clean_grid(grid)
    base_data = base_spec.model_dump(mode="json")
    base_method_type = base_data["method"]["type"]
    counts = points_per_method(base_method_type, grid)
    points = []
    for method_type in counts:
        keys = [key for key in grid if applies(key, method_type)]
        choices = [[method_type] if key == "method.type" else grid[key] for key in keys]
        for combination in itertools.product(*choices):
            values = dict(zip(keys, combination))
            try:
                spec = JobSpec.model_validate(spec_data_for(base_data, values))
            except ValidationError as refusal:
                raise GridError(*explain_refusal(refusal.errors()[0], values)) from None
            points.append(SweepPoint(values, spec))
    return points


def check_sweep_quota(team, job_count):
    if team.max_queued_jobs is None:
        return
    queued = Job.objects.filter(team=team, status=Job.Status.QUEUED).count()
    if queued + job_count > team.max_queued_jobs:
        room = max(0, team.max_queued_jobs - queued)
        raise QuotaExceeded(
            f"this sweep has {job_count} jobs and team {team.name} already has {queued} queued; its quota is "
            f"{team.max_queued_jobs} queued jobs, so {room} more fit: make the grid smaller or wait for jobs to start"
        )


def job_name(sweep, point):
    name = f"{sweep} · {point.description}"
    max_length = Job._meta.get_field("name").max_length
    return name if len(name) <= max_length else name[: max_length - 1] + "…"


def submit_sweep(team, user, base_spec: JobSpec, grid, metric="eval_loss", name=""):
    """Queue a job per point of the grid, all or none, each enqueued when the transaction commits."""
    if metric not in SWEEP_METRICS:
        raise SubmissionError("metric", f"{metric!r} is not a sweep metric; they are: {', '.join(SWEEP_METRICS)}")
    grid = clean_grid(grid)
    points = expand_grid(base_spec, grid)
    with transaction.atomic():
        # Two sweeps of one team submitted at once must not both fit the quota with the same free room.
        team = Team.objects.select_for_update().get(pk=team.pk)
        check_sweep_quota(team, len(points))
        sweep = Sweep.objects.create(
            team=team, created_by=user, name=name, base_spec=base_spec.model_dump(mode="json"),
            grid=grid, metric=metric,
        )
        for point in points:
            try:
                job = submit_job(team, user, point.spec, name=job_name(sweep, point))
            except QuotaExceeded:
                raise
            except SubmissionError as refusal:
                raise SubmissionError(refusal.field, f"{point.description}: {refusal.message}") from None
            job.sweep = sweep
            job.sweep_point = point.values
            job.save(update_fields=["sweep", "sweep_point"])
    return sweep


def best_job(sweep, jobs):
    """The finished job with the best value of the sweep's metric, or None while none has one."""
    objective = SWEEP_METRICS[sweep.metric]
    scored = [job for job in jobs if job.status == Job.Status.SUCCEEDED and getattr(job, sweep.metric) is not None]
    if not scored:
        return None
    pick = max if objective.higher_is_better else min
    return pick(scored, key=lambda job: getattr(job, sweep.metric))
