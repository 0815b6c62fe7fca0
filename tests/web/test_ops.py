"""What operators read: /healthz, /metrics, JSON log lines, and static files served without DEBUG."""

import json
import logging
import socket
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import BaseModel, Dataset, Job, Team, Worker
from webapp.log_format import JsonFormatter, job_logging_context


@pytest.fixture
def broker(settings, redis_url):
    from webapp.celery import app

    settings.CELERY_BROKER_URL = redis_url
    app.conf.broker_url = redis_url  # the queue depths are read through the Celery app
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()  # no message left by another test in this session's Redis
    return redis_url


def samples(metrics_text):
    """{(name, {label: value}): value} of every sample in a Prometheus exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


def closed_port():
    """A local port nobody listens on: bound, then let go."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def add_worker(hostname, **fields):
    return Worker.objects.create(hostname=hostname, queues="training", **fields)


def test_healthz_says_ok_and_counts_the_workers_that_beat(db, broker):
    add_worker("gpu0@a", gpu_name="NVIDIA H100")
    add_worker("gpu1@a", last_heartbeat=timezone.now() - timedelta(hours=1))  # silent: not counted
    add_worker("gpu2@a", is_online=False)

    response = Client().get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"database": "ok", "redis": "ok", "workers_online": 1}


def test_healthz_answers_503_naming_redis_when_nobody_listens(db, settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"

    response = Client().get("/healthz")

    assert response.status_code == 503
    assert response.json() == {"database": "ok", "redis": "unreachable", "workers_online": 0}


@pytest.fixture
def jobs_in_every_state(team_user):
    team = Team.objects.get(name="acme")
    base = BaseModel.objects.create(name="tiny", path="/nowhere", task="causal_lm_sft", architecture="llama")
    dataset = Dataset.objects.create(team=team, name="d", original_filename="d.jsonl", file="datasets/d", size=1,
                                     sha256="0" * 64, format="prompt_completion", is_valid=True)
    worker = add_worker("gpu0@metrics", gpu_name="NVIDIA H100", gpu_utilisation_percent=87,
                        gpu_memory_used_mb=40_000, gpu_memory_total_mb=81_559)

    def job(status, **fields):
        return Job.objects.create(team=team, base_model=base, dataset=dataset, name=status, status=status, spec={}, **fields)

    job("queued"), job("queued"), job("failed")
    running = job("running", worker=worker, tokens_per_sec=1234.5, mfu=0.41)
    return running


def test_metrics_expose_jobs_workers_and_throughput_from_the_rows(broker, jobs_in_every_state):
    response = Client().get("/metrics")  # the test client's REMOTE_ADDR is 127.0.0.1

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=")
    gpu = (("gpu", "NVIDIA H100"), ("worker", "gpu0@metrics"))
    values = samples(response.content.decode())
    assert {state: values["tunedeck_jobs", (("state", state),)] for state in ("queued", "running", "failed", "succeeded")} == {
        "queued": 2, "running": 1, "failed": 1, "succeeded": 0}
    assert values["tunedeck_broker_up", ()] == 1 and values["tunedeck_queue_depth", (("queue", "training"),)] == 0
    assert values["tunedeck_worker_online", gpu] == 1
    assert values["tunedeck_worker_gpu_utilisation_ratio", gpu] == 0.87
    assert values["tunedeck_worker_gpu_memory_used_bytes", gpu] == 40_000 * 1024 * 1024
    assert values["tunedeck_worker_gpu_memory_total_bytes", gpu] == 81_559 * 1024 * 1024
    job = jobs_in_every_state
    assert values["tunedeck_job_tokens_per_second", (("job", str(job.pk)), ("team", "acme"), ("worker", "gpu0@metrics"))] == 1234.5
    assert values["tunedeck_job_mfu_ratio", (("job", str(job.pk)), ("team", "acme"), ("worker", "gpu0@metrics"))] == 0.41

    # Read at scrape time: a job that finishes is counted as such on the next scrape.
    Job.objects.filter(pk=job.pk).update(status="succeeded")
    values = samples(Client().get("/metrics").content.decode())
    assert values["tunedeck_jobs", (("state", "running"),)] == 0 and values["tunedeck_jobs", (("state", "succeeded"),)] == 1
    assert not any(name in ("tunedeck_job_tokens_per_second", "tunedeck_job_mfu_ratio") for name, _ in values)


def test_metrics_without_a_token_are_for_this_machine_only(db, broker):
    assert Client(REMOTE_ADDR="10.0.0.7").get("/metrics").status_code == 401
    # Through a reverse proxy on this machine the address is local, but the request is not.
    assert Client(HTTP_X_FORWARDED_FOR="203.0.113.9").get("/metrics").status_code == 401


def test_metrics_with_a_token_need_it_from_everywhere(db, broker, settings):
    settings.TUNEDECK_METRICS_TOKEN = "scrape-me-7f3a"
    assert Client().get("/metrics").status_code == 401
    assert Client(HTTP_AUTHORIZATION="Bearer wrong").get("/metrics").status_code == 401
    assert Client(HTTP_AUTHORIZATION="scrape-me-7f3a").get("/metrics").status_code == 401
    allowed = Client(REMOTE_ADDR="10.0.0.7", HTTP_AUTHORIZATION="Bearer scrape-me-7f3a").get("/metrics")
    assert allowed.status_code == 200 and b"tunedeck_jobs{" in allowed.content


def test_json_log_lines_carry_the_job_id_while_a_job_runs(capsys):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("workers.runner")
    logger.addHandler(handler)
    try:
        with job_logging_context(42):
            logger.warning("job %s: unreadable progress line %r", 42, b"{")
        logger.warning("between jobs")
    finally:
        logger.removeHandler(handler)

    during, after = [json.loads(line) for line in capsys.readouterr().err.splitlines()[-2:]]
    assert during["job_id"] == 42 and during["level"] == "WARNING" and during["logger"] == "workers.runner"
    assert during["message"] == "job 42: unreadable progress line b'{'"
    assert "job_id" not in after and after["message"] == "between jobs"


def test_whitenoise_serves_static_files_without_debug(settings, tmp_path):
    settings.DEBUG = False
    settings.STATIC_ROOT = tmp_path / "static"
    call_command("collectstatic", interactive=False, verbosity=0)
    css = next(path for path in settings.STATIC_ROOT.rglob("*.css") if "admin" not in path.parts)
    url = "/static/" + css.relative_to(settings.STATIC_ROOT).as_posix()

    response = Client().get(url)  # a new client loads the middleware, which indexes STATIC_ROOT

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == css.read_bytes()
    assert "max-age" in response["Cache-Control"]
