from datetime import timedelta

from django.utils import timezone

from jobs.models import Worker
from workers.reconciler import mark_silent_workers_offline


def test_workers_silent_for_too_long_are_marked_offline(db, settings):
    settings.WORKER_OFFLINE_AFTER_SECONDS = 60
    now = timezone.now()
    Worker.objects.create(hostname="alive@h", last_heartbeat=now - timedelta(seconds=5))
    Worker.objects.create(hostname="silent@h", last_heartbeat=now - timedelta(seconds=120))
    assert mark_silent_workers_offline() == 1
    assert dict(Worker.objects.values_list("hostname", "is_online")) == {"alive@h": True, "silent@h": False}
