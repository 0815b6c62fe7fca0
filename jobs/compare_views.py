"""The Compare page: chosen runs side by side — what was set, what was measured, and their curves.

The selection lives in the query string (`/compare/?jobs=3,5,8`), so a comparison is a link to
share; the job list's form and the sweeps page both lead here.
"""

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from django.contrib.auth.decorators import login_required
from django.db.models import F, Max, Window
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import path, reverse

from .charts import MAX_POINTS_PER_LINE, SERIES_COLOURS, overlay_chart
from .models import Job, Metric
from .teams import visible
from .templatetags.tunedeck import percent, short_duration


LARGEST_ID = 2**63 - 1  # a BigAutoField's; a larger number would fail in the database, not just match nothing


class BadSelection(ValueError):
    pass


def selected_job_ids(query):
    """Job ids from `?jobs=3,5,8` or `?jobs=3&jobs=5`, in the order given, each once."""
    ids = []
    for value in query.getlist("jobs"):
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isascii() or not part.isdigit() or int(part) > LARGEST_ID:
                raise BadSelection(f"“{part}” is not a job id: give job numbers, e.g. ?jobs=3,5")
            if int(part) not in ids:
                ids.append(int(part))
    return ids


# Rows of the table. Settings rows (what was chosen) are highlighted where the runs differ;
# measurement rows (what came out) mark the best run where "better" says which way is better.

ABSENT = object()  # a setting this run's spec does not have, e.g. method.r of an adapter run


@dataclass
class Row:
    section: str  # "settings" or "measurements"
    key: str
    label: str
    values: list  # one per run, as exported
    cells: list  # one per run: {"text": shown, "best": bool}
    better: str | None = None  # "lower", "higher" or None
    differs: bool = False
    best: list = field(default_factory=list)  # ids of the best runs


@dataclass(frozen=True)
class Measurement:
    key: str
    label: str
    value: Callable[[Job], object]
    show: Callable[[object], str] = str
    better: str | None = None
    # What a run without the value shows, where "–" would hide a reason.
    absent: Callable[[Job], str] = lambda job: "–"


def _number(digits):
    return lambda value: f"{value:,.{digits}f}"


def _forgetting(job):
    if job.reference_loss_before is None or job.reference_loss_after is None:
        return None
    return job.reference_loss_after - job.reference_loss_before


MEASUREMENTS = [
    Measurement("status", "Status", lambda job: job.status),
    Measurement("step", "Steps", lambda job: job.step, _number(0)),
    Measurement("trainable_params", "Trainable parameters", lambda job: job.trainable_params, _number(0)),
    Measurement("trainable_percent", "Trainable share of all parameters", lambda job: job.trainable_percent,
                lambda share: f"{share:.3g}%"),
    Measurement("peak_memory_mb", "Peak memory (MiB)", lambda job: job.peak_memory_mb, _number(0), "lower"),
    Measurement("estimated_memory_mb", "Estimated memory before queueing (MiB)",
                lambda job: job.estimated_memory_mb, _number(0)),
    Measurement("wall_time_s", "Wall time", lambda job: job.wall_time_s,
                lambda seconds: short_duration(timedelta(seconds=seconds)), "lower"),
    Measurement("tokens_per_sec", "Tokens/s", lambda job: job.tokens_per_sec, _number(0), "higher"),
    Measurement("mfu", "MFU (share of the GPUs' bf16 peak)", lambda job: job.mfu, percent, "higher"),
    Measurement("train_loss", "Final train loss", lambda job: job.train_loss, _number(4), "lower"),
    Measurement("eval_loss", "Eval loss", lambda job: job.eval_loss, _number(4), "lower"),
    Measurement("eval_accuracy", "Eval accuracy", lambda job: job.eval_accuracy, _number(3), "higher"),
    Measurement("eval_f1", "Eval macro-F1", lambda job: job.eval_f1, _number(3), "higher"),
    Measurement("perplexity", "Perplexity", lambda job: job.perplexity, _number(2), "lower"),
    Measurement("artifact_bytes", "Artifact size", lambda job: job.artifact_bytes, filesizeformat, "lower"),
    Measurement("latency_ms", "Inference latency, unmerged (ms per batch)", lambda job: job.latency_ms,
                _number(1), "lower"),
    Measurement("latency_merged_ms", "Inference latency, merged (ms per batch)", lambda job: job.latency_merged_ms,
                _number(1), "lower", absent=lambda job: "cannot merge" if job.cannot_merge_reason else "–"),
    # The forgetting check: the loss on text of the base model's own domain, before and after training.
    # "Before" is the base model's, not the run's doing, so it has no best.
    Measurement("reference_loss_before", "Reference loss before training", lambda job: job.reference_loss_before,
                _number(4)),
    Measurement("reference_loss_after", "Reference loss after training", lambda job: job.reference_loss_after,
                _number(4), "lower"),
    Measurement("reference_loss_change", "Reference loss change (forgetting)", _forgetting,
                lambda change: f"{change:+,.4f}", "lower"),
]

# Spec keys that the table shows by name in its first rows instead of by id.
SHOWN_BY_NAME = {"base_model", "dataset", "validation_dataset", "reference_dataset", "method.type"}


def flatten(spec, prefix=""):
    """A JobSpec dict as dotted keys: {"method": {"r": 8}} -> {"method.r": 8}."""
    flat = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show_setting(value):
    if value is ABSENT:
        return "–"
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def _setting_row(key, label, values):
    return Row(
        section="settings", key=key, label=label,
        values=[None if value is ABSENT else value for value in values],
        cells=[{"text": _show_setting(value), "best": False} for value in values],
        differs=any(value != values[0] for value in values),
    )


def setting_rows(jobs):
    def dataset_name(dataset):
        return dataset.name if dataset else None

    rows = [
        _setting_row("base_model", "Base model", [job.base_model.name for job in jobs]),
        _setting_row("method", "Method", [job.method_label for job in jobs]),
        _setting_row("dataset", "Dataset", [job.dataset.name for job in jobs]),
        _setting_row("validation_dataset", "Validation dataset", [dataset_name(job.validation_dataset) for job in jobs]),
        _setting_row("reference_dataset", "Reference dataset", [dataset_name(job.reference_dataset) for job in jobs]),
    ]
    specs = [flatten(job.spec) for job in jobs]
    # Method parameters first, then hyperparameters, then the rest; each in the order of the specs.
    keys = list(dict.fromkeys(key for spec in specs for key in spec if key not in SHOWN_BY_NAME))
    keys.sort(key=lambda key: (not key.startswith("method."), not key.startswith("hyperparameters.")))
    rows += [_setting_row(key, key, [spec.get(key, ABSENT) for spec in specs]) for key in keys]
    return rows


def _comparable(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measurement_rows(jobs):
    rows = []
    for measurement in MEASUREMENTS:
        values = [measurement.value(job) for job in jobs]
        best = set()
        present = [value for value in values if _comparable(value)]
        # Best among two or more runs that differ; a tie of all of them tells nothing.
        if measurement.better and len(present) >= 2 and len(set(present)) > 1:
            target = min(present) if measurement.better == "lower" else max(present)
            best = {index for index, value in enumerate(values) if _comparable(value) and value == target}
        rows.append(Row(
            section="measurements", key=measurement.key, label=measurement.label, values=values, better=measurement.better,
            cells=[
                {"text": measurement.absent(job) if value is None else measurement.show(value), "best": index in best}
                for index, (job, value) in enumerate(zip(jobs, values))
            ],
            best=[jobs[index].pk for index in sorted(best)],
        ))
    return rows


def curve_charts(jobs):
    """Overlaid loss curves by step and by tokens seen, from the Metric rows of all runs in one query.

    The database picks the rows each line needs (charts.MAX_POINTS_PER_LINE a line), so long runs send
    a few hundred rows each, not one per step.
    """
    curves = defaultdict(lambda: defaultdict(list))
    rows = (Metric.objects.filter(job__in=jobs).loss_curve_points(MAX_POINTS_PER_LINE)
            # The tokens seen by a row's step, which an evaluation row does not record itself.
            .annotate(tokens_at_step=Window(Max("tokens_seen"), partition_by=[F("job_id"), F("step")]))
            .values_list("job_id", "step", "train_loss", "eval_loss", "tokens_at_step"))
    for job_id, step, train_loss, eval_loss, tokens_at_step in rows:
        if train_loss is not None:
            curves[job_id]["train_by_step"].append((step, train_loss))
            curves[job_id]["train_by_tokens"].append((tokens_at_step, train_loss))
        if eval_loss is not None:
            # An evaluation ran after the training step of the same number: tokens_at_step is that step's count.
            curves[job_id]["eval_by_step"].append((step, eval_loss))
            curves[job_id]["eval_by_tokens"].append((tokens_at_step, eval_loss))

    charts = []
    for title, curve, markers in (
        ("Train loss by step", "train_by_step", False),
        ("Train loss by tokens seen", "train_by_tokens", False),
        ("Eval loss by step", "eval_by_step", True),
        ("Eval loss by tokens seen", "eval_by_tokens", True),
    ):
        drawing = overlay_chart([(job.display_name, curves[job.pk][curve]) for job in jobs], markers=markers)
        if drawing:
            charts.append(drawing | {"title": title})
    return charts


def _export(jobs, rows, fmt):
    filename = "compare-jobs-" + "-".join(str(job.pk) for job in jobs)
    if fmt == "json":
        body = json.dumps({
            "jobs": [{"id": job.pk, "name": job.display_name, "url": reverse("job_detail", args=[job.pk])}
                     for job in jobs],
            "rows": [
                {"section": row.section, "key": row.key, "label": row.label, "values": row.values}
                | ({"differs": row.differs} if row.section == "settings" else {"better": row.better, "best": row.best})
                for row in rows
            ],
        }, indent=2)
        response = HttpResponse(body, content_type="application/json")
    else:
        response = HttpResponse(content_type="text/csv")
        writer = csv.writer(response)
        writer.writerow(["key", "label", *(job.display_name for job in jobs)])
        writer.writerow(["id", "Job id", *(job.pk for job in jobs)])
        for row in rows:
            writer.writerow([row.key, row.label, *("" if value is None else value for value in row.values)])
    response["Content-Disposition"] = f'attachment; filename="{filename}.{fmt}"'
    return response


@login_required
def compare(request):
    if len(request.GET.getlist("jobs")) > 1:
        # The job list's form sends jobs=3&jobs=5; the page lives at one address, ?jobs=3,5.
        query = request.GET.copy()
        query["jobs"] = ",".join(request.GET.getlist("jobs"))
        return redirect(f"{reverse('compare')}?{query.urlencode(safe=',')}")
    try:
        ids = selected_job_ids(request.GET)
    except BadSelection as problem:
        return render(request, "jobs/compare.html", {"problem": str(problem)}, status=400)
    if len(ids) < 2:
        return render(request, "jobs/compare.html", {
            "problem": "Pick two or more jobs to compare: tick them on the Jobs page and press “Compare selected”.",
        })

    found = visible(request.user, Job.objects.select_related(
        "base_model", "dataset", "validation_dataset", "reference_dataset",
    )).in_bulk(ids)
    missing = [pk for pk in ids if pk not in found]
    if missing:
        # Another team's job is not found either, so its existence does not leak.
        raise Http404(f"No job {missing[0]}.")
    jobs = [found[pk] for pk in ids]

    settings, measurements = setting_rows(jobs), measurement_rows(jobs)
    fmt = request.GET.get("format")
    if fmt in ("csv", "json"):
        return _export(jobs, settings + measurements, fmt)
    context = {
        # Each run's colour, the same in the table's header and in every chart.
        "columns": [{"job": job, "colour": f"series-{index % SERIES_COLOURS}"} for index, job in enumerate(jobs)],
        "job_ids": ",".join(str(job.pk) for job in jobs),
        "settings": settings,
        "measurements": measurements,
        "charts": curve_charts(jobs),
        "any_active": any(job.is_active for job in jobs),
    }
    template = "jobs/compare_live.html" if request.htmx else "jobs/compare.html"
    return render(request, template, context)


urlpatterns = [
    path("compare/", compare, name="compare"),
]
