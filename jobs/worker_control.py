"""Telling workers what to consume, through Celery's remote control, and reading the queues in Redis."""

from django.conf import settings
from kombu.exceptions import ChannelError, OperationalError

from .models import Job, Worker

REPLY_TIMEOUT_S = 3


class WorkerDidNotAnswer(Exception):
    pass


def _broadcast_to(worker, command, queue):
    from webapp.celery import app

    replies = getattr(app.control, command)(queue, destination=[worker.hostname], reply=True, timeout=REPLY_TIMEOUT_S)
    if not replies:
        raise WorkerDidNotAnswer(f"{worker.hostname} did not answer {command} {queue!r}; is it running?")


def drain(worker):
    """Stop `worker` taking new jobs; the job it runs goes on to its end."""
    for queue in worker.queue_names:
        _broadcast_to(worker, "cancel_consumer", queue)
    Worker.objects.filter(pk=worker.pk).update(is_draining=True)


def resume(worker):
    for queue in worker.queue_names:
        _broadcast_to(worker, "add_consumer", queue)
    Worker.objects.filter(pk=worker.pk).update(is_draining=False)


def known_queues():
    names = {settings.CELERY_TASK_DEFAULT_QUEUE}
    for worker in Worker.objects.filter(is_online=True):
        names.update(worker.queue_names)
    names.update(Job.objects.filter(status=Job.Status.QUEUED).values_list("queue", flat=True))
    return sorted(names)


def queue_depths():
    """Messages waiting in each queue, {name: count}; None when the broker cannot be reached.

    A queue is one Redis list per message priority; the transport's passive declare adds them up,
    and answers "not found" for a queue with no waiting message (Redis drops empty lists).
    """
    from webapp.celery import app

    depths = {}
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            for name in known_queues():
                try:
                    depths[name] = channel.queue_declare(queue=name, passive=True).message_count
                except ChannelError:
                    depths[name] = 0
    except (OSError, OperationalError):
        return None
    return depths
