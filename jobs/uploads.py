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


def shown_filename(filename):
    """The upload's name as pages show it. It names nothing on disk (storage paths are generated), but it is
    stored, so without the control characters (NUL, lone surrogates) that PostgreSQL refuses."""
    return "".join(character for character in filename if character.isprintable()) or "upload"


def store_dataset(team, user, filename, data, name="", fmt=None, column_map=None):
    """Validate and keep the file, valid or not: the detail page shows what is wrong with it."""
    column_map = column_map or {}
    report = datasets.validate(data, filename, fmt=fmt, column_map=column_map, limits=upload_limits())
    shown = shown_filename(filename)
    dataset = Dataset(
        team=team,
        uploaded_by=user,
        name=name or shown[: Dataset._meta.get_field("name").max_length],
        original_filename=shown[: Dataset._meta.get_field("original_filename").max_length],
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
