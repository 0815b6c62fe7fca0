from django.core.management.base import BaseCommand

from jobs.storage import apply_retention


class Command(BaseCommand):
    help = ("Delete the checkpoint files of jobs finished more than TUNEDECK_CHECKPOINT_RETENTION_DAYS ago, "
            "and files in storage that no row names (older than a day).")

    def handle(self, *args, **options):
        done = apply_retention()
        self.stdout.write(f"{done['checkpoint_files_deleted']} checkpoint files deleted, "
                          f"{done['orphaned_files_deleted']} orphaned files deleted")
