from django.core.management.base import BaseCommand

from workers.reconciler import reconcile


class Command(BaseCommand):
    help = "Mark silent workers offline, requeue the jobs they held, and resend messages Redis lost."

    def handle(self, *args, **options):
        self.stdout.write(str(reconcile()))
