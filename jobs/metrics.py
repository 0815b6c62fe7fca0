"""Prometheus metrics, read from the database at scrape time.

Counters kept in process memory would differ between gunicorn processes and vanish on restart;
the rows are the truth (DESIGN: the database is the source of truth), so each scrape reads them.
"""

from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily

from jobs.models import Job, Worker
from jobs.worker_control import queue_depths

MB = 1024 * 1024


def online_workers():
    """Workers that say they are online and have beaten recently enough for the reconciler to agree."""
    beating_since = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_SECONDS)
    return Worker.objects.filter(is_online=True, last_heartbeat__gte=beating_since)


class TuneDeckCollector:
    def collect(self):
        yield self.jobs_by_state()
        yield from self.queue_depth()
        yield from self.workers()
        yield self.running_job_throughput()
        yield self.running_job_mfu()

    def jobs_by_state(self):
        family = GaugeMetricFamily("tunedeck_jobs", "Jobs in each state", labels=["state"])
        counts = dict(Job.objects.order_by().values_list("status").annotate(Count("pk")))
        for state in Job.Status.values:
            family.add_metric([state], counts.get(state, 0))
        return family

    def queue_depth(self):
        depths = queue_depths()
        broker_up = GaugeMetricFamily("tunedeck_broker_up", "1 when the broker (Redis) answered this scrape")
        broker_up.add_metric([], depths is not None)
        yield broker_up
        family = GaugeMetricFamily("tunedeck_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue, depth in (depths or {}).items():
            family.add_metric([queue], depth)
        yield family

    def workers(self):
        labels = ["worker", "gpu"]
        online = GaugeMetricFamily("tunedeck_worker_online", "1 while the worker heart-beats", labels=labels)
        utilisation = GaugeMetricFamily(
            "tunedeck_worker_gpu_utilisation_ratio", "GPU utilisation (0-1) at the last heartbeat", labels=labels
        )
        used = GaugeMetricFamily(
            "tunedeck_worker_gpu_memory_used_bytes", "GPU memory in use at the last heartbeat", labels=labels
        )
        total = GaugeMetricFamily("tunedeck_worker_gpu_memory_total_bytes", "The GPU's memory", labels=labels)
        online_ids = set(online_workers().values_list("pk", flat=True))
        for worker in Worker.objects.all():
            worker_labels = [worker.hostname, worker.gpu_name]
            online.add_metric(worker_labels, worker.pk in online_ids)
            # A CPU-only worker has no GPU readings: no sample rather than a misleading zero.
            if worker.gpu_utilisation_percent is not None:
                utilisation.add_metric(worker_labels, worker.gpu_utilisation_percent / 100)
            if worker.gpu_memory_used_mb is not None:
                used.add_metric(worker_labels, worker.gpu_memory_used_mb * MB)
            if worker.gpu_memory_total_mb is not None:
                total.add_metric(worker_labels, worker.gpu_memory_total_mb * MB)
        yield from (online, utilisation, used, total)

    def running_job_throughput(self):
        family = GaugeMetricFamily(
            "tunedeck_job_tokens_per_second", "Training throughput of each running job", labels=["job", "team", "worker"]
        )
        running = Job.objects.filter(status=Job.Status.RUNNING, tokens_per_sec__isnull=False)
        for job_id, team, worker, tokens_per_sec in running.values_list("pk", "team__name", "worker__hostname", "tokens_per_sec"):
            family.add_metric([str(job_id), team, worker or ""], tokens_per_sec)
        return family

    def running_job_mfu(self):
        family = GaugeMetricFamily(
            "tunedeck_job_mfu_ratio", "Model FLOPs utilisation (0-1 of the GPUs' dense bf16 peak) of each running job",
            labels=["job", "team", "worker"],
        )
        running = Job.objects.filter(status=Job.Status.RUNNING, mfu__isnull=False)
        for job_id, team, worker, mfu in running.values_list("pk", "team__name", "worker__hostname", "mfu"):
            family.add_metric([str(job_id), team, worker or ""], mfu)
        return family


# Only TuneDeck's own series: the web process's CPU and memory are not what this endpoint is about.
registry = CollectorRegistry(auto_describe=False)
registry.register(TuneDeckCollector())
