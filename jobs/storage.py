"""What files in storage are worth keeping: a team's use, the files of deleted rows, and retention.

Works the same on the local filesystem and on S3-compatible storage: only the storage API is used,
never a local path.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone

from .lifecycle import TERMINAL_STATUSES
from .models import Artifact, Checkpoint, Dataset, Job, Team

log = logging.getLogger(__name__)

# The folders of storage whose every file is named by a row (see the upload paths in jobs/models.py).
GENERATED_PREFIXES = ("datasets", "artifacts", "checkpoints", "logs")
# A file is written before the row that names it (store_artifact reads it back first), so an unnamed
# file this young may be one still being stored, not an orphan.
ORPHAN_GRACE = timedelta(days=1)


def storage_use(team):
    """Bytes the team keeps in storage, by kind, from the sizes recorded in the database (one query)."""

    def total(rows, team_field, size_field="size"):
        per_team = rows.filter(**{team_field: OuterRef("pk")}).order_by().values(team_field)
        return Coalesce(Subquery(per_team.annotate(total=Sum(size_field)).values("total")), Value(0))

    # Named *_bytes in the query: Team already has relations called datasets and jobs.
    use = Team.objects.filter(pk=team.pk).values(
        datasets_bytes=total(Dataset.objects.exclude(file=""), "team"),
        artifacts_bytes=total(Artifact.objects.exclude(file=""), "job__team"),
        # A checkpoint let go keeps its row and size, not its file.
        checkpoints_bytes=total(Checkpoint.objects.exclude(file=""), "job__team"),
        logs_bytes=total(Job.objects.exclude(log_file=""), "team", "log_size"),
    ).get()
    use = {name.removesuffix("_bytes"): size for name, size in use.items()}
    use["total"] = sum(use.values())
    return use


def delete_file_after_commit(field_file):
    """Delete a file from storage once the deletion of its row is committed (a rolled-back delete keeps it)."""
    if field_file:
        storage, name = field_file.storage, field_file.name
        transaction.on_commit(lambda: storage.delete(name))


@receiver(post_delete, sender=Dataset)
@receiver(post_delete, sender=Artifact)
@receiver(post_delete, sender=Checkpoint)
def _delete_stored_file(sender, instance, **kwargs):
    delete_file_after_commit(instance.file)


@receiver(post_delete, sender=Job)
def _delete_stored_log(sender, instance, **kwargs):
    # A job's artifacts and checkpoints go with it (cascade), each through the receiver above.
    delete_file_after_commit(instance.log_file)


def let_go_of_old_checkpoints(days):
    """Empty the checkpoint files of jobs that finished more than `days` ago; the rows stay, as history."""
    cutoff = timezone.now() - timedelta(days=days)
    old = Checkpoint.objects.exclude(file="").filter(job__status__in=TERMINAL_STATUSES, job__finished_at__lt=cutoff)
    released = 0
    for checkpoint in old.iterator():
        checkpoint.file.delete(save=False)
        Checkpoint.objects.filter(pk=checkpoint.pk).update(file="")
        released += 1
    return released


def stored_names(prefix):
    """Every file name under `prefix` in storage, walking its folders (S3 lists them as common prefixes)."""
    try:
        folders, files = default_storage.listdir(prefix)
    except FileNotFoundError:  # a local folder exists only once a file was stored under it
        return
    for name in files:
        yield f"{prefix}/{name}"
    for folder in folders:
        yield from stored_names(f"{prefix}/{folder}")


def delete_orphaned_files():
    """Delete files under the generated prefixes that no row names (left by a crash or a delete that failed)."""
    named = set()
    for model, field in ((Dataset, "file"), (Artifact, "file"), (Checkpoint, "file"), (Job, "log_file")):
        named.update(model.objects.exclude(**{field: ""}).values_list(field, flat=True))
    cutoff = timezone.now() - ORPHAN_GRACE
    deleted = 0
    for prefix in GENERATED_PREFIXES:
        for name in stored_names(prefix):
            if name not in named and default_storage.get_modified_time(name) < cutoff:
                default_storage.delete(name)
                deleted += 1
    return deleted


def apply_retention():
    """The periodic sweep: old checkpoint files of finished jobs, then orphaned files. Returns what it did."""
    days = settings.CHECKPOINT_RETENTION_DAYS
    checkpoints = let_go_of_old_checkpoints(days) if days else 0
    orphans = delete_orphaned_files()
    if checkpoints or orphans:
        log.info("retention: %d checkpoint files let go, %d orphaned files deleted", checkpoints, orphans)
    return {"checkpoint_files_deleted": checkpoints, "orphaned_files_deleted": orphans}
