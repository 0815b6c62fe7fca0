"""TUNEDECK_LOG_FORMAT=json: one JSON object per line, naming the job that a worker is running.

Log collectors (Loki, CloudWatch, Elasticsearch) index fields, so "every line of job 42" is a query
instead of a grep through interleaved worker output.
"""

import contextvars
import json
import logging
from contextlib import contextmanager
from datetime import UTC, datetime

# Set while a worker handles one job; a context variable, so the heartbeat thread's lines stay unnamed.
current_job_id = contextvars.ContextVar("current_job_id", default=None)


@contextmanager
def job_logging_context(job_id):
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        job_id = current_job_id.get()
        if job_id is not None:
            line["job_id"] = job_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
