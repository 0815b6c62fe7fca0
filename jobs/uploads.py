"""Storing an uploaded dataset file with its validation report (form, API and demo seed)."""

import hashlib

from django.conf import settings
from django.core.files.base import ContentFile

from . import datasets
from .models import Dataset


def upload_limits():
    return datasets.Limits(
        max_bytes=settings.DATASET_MAX_BYTES,
        max_rows=settings.DATASET_MAX_ROWS,
        max_line_chars=settings.DATASET_MAX_LINE_CHARS,
    )


def store_dataset(team, user, filename, data, name="", fmt=None, column_map=None):
    """Validate and keep the file, valid or not: the detail page shows what is wrong with it."""
    column_map = column_map or {}
    report = datasets.validate(data, filename, fmt=fmt, column_map=column_map, limits=upload_limits())
    dataset = Dataset(
        team=team,
        uploaded_by=user,
        name=name or filename,
        original_filename=filename[:255],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format=report.format or "",
        column_map=column_map,
        rows=report.rows,
        is_valid=report.is_valid,
        problems=[{"line": problem.line, "message": problem.message} for problem in report.problems],
        problem_count=report.problem_count,
        stats=report.stats,
        preview=report.preview,
    )
    dataset.file.save("upload", ContentFile(data), save=False)
    dataset.save()
    return dataset
