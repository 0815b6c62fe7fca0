"""Faults caused for real: a worker killed mid-training, Redis restarted empty, a message redelivered.

Each test fails if the guarantee breaks: the job ends as planned, each step is trained
and recorded once, and nothing runs twice.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from django.db import transaction

from jobs.models import Checkpoint, Job, JobEvent, Metric
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset
from jobs import demo_data
from tests.conftest import JOB_TIMEOUT, wait_for, wait_until_registered
from webapp.celery import app
from workers import reconciler

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REDIS_SERVER = "/usr/bin/redis-server"


@pytest.fixture
def submit(team_user, catalogue, data_dirs, tmp_path):
    team = team_user.memberships.get().team
    path = demo_data.write_instruction_set(tmp_path / "reverse.jsonl", rows=200)
    dataset = store_dataset(team, team_user, "reverse.jsonl", path.read_bytes())

    def submit_one(name, steps, checkpoint_every=5):
        spec = JobSpec(
            base_model="tiny-random-llama", dataset=dataset.pk,
            method={"type": "lora", "r": 8, "dropout": 0.0, "target_modules": "all_linear"},
            hyperparameters={"max_steps": steps, "batch_size": 8, "learning_rate": 0.01, "max_seq_length": 64,
                             "checkpoint_every": checkpoint_every, "eval_fraction": 0.05, "seed": 3},
        )
        with transaction.atomic():
            return submit_job(team, team_user, spec, name=name)

    return submit_one


def status_of(job):
    job.refresh_from_db()
    return job.status


def times_started(job):
    return JobEvent.objects.filter(job=job, to_status="running").count()


def recorded_steps(job):
    return list(Metric.objects.filter(job=job, train_loss__isnull=False).order_by("step").values_list("step", flat=True))


def process_tree(pid):
    """`pid` and every process under it, read from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def test_a_worker_killed_mid_training_is_replaced_and_the_job_resumes_from_its_checkpoint(
    submit, start_worker, settings
):
    settings.WORKER_OFFLINE_AFTER_SECONDS = 4  # the worker beats every 2 s in tests
    first = start_worker("doomed")
    wait_until_registered(first)
    job = submit("long", steps=40)
    wait_for(
        lambda: Checkpoint.objects.filter(job=job, step__gte=10).exclude(file="").exists() and status_of(job) and job.step >= 12,
        JOB_TIMEOUT, f"two checkpoints and a few steps more\n{first.log()}",
    )
    for pid in process_tree(first.process.pid):  # the worker, its pool process and the trainer
        os.kill(pid, signal.SIGKILL)
    killed_at = Job.objects.get(pk=job.pk).step
    resume_step = Checkpoint.objects.filter(job=job).exclude(file="").order_by("-step").first().step

    wait_for(lambda: reconciler.reconcile().requeued or status_of(job) == "queued", 30, "the reconciler to requeue the job")
    assert status_of(job) == "queued"
    second = start_worker("replacement")
    wait_for(lambda: status_of(job) in ("succeeded", "failed", "cancelled"), JOB_TIMEOUT, f"the job to finish\n{second.log()}")

    assert job.status == "succeeded", job.error_message
    assert job.step == job.total_steps == 40, "the planned step count, not more"
    assert recorded_steps(job) == list(range(1, 41)), "each step recorded once"
    messages = list(job.events.values_list("message", flat=True))
    assert any(message.startswith(f"requeued at step {killed_at}: doomed") for message in messages)
    assert f"resuming from the checkpoint at step {resume_step}" in messages
    losses = dict(Metric.objects.filter(job=job, train_loss__isnull=False).values_list("step", "train_loss"))
    assert losses[resume_step + 1] < 0.85 * losses[1], "the loss curve continues where it was, not from scratch"
    assert times_started(job) == 2


@pytest.fixture
def own_redis(settings):
    """A Redis server of this test's own, so that it can be killed and started again empty."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10, "Redis to listen")
        return process

    server = {"process": start(), "url": f"redis://127.0.0.1:{port}/0"}
    settings.CELERY_BROKER_URL = server["url"]
    app.conf.broker_url = server["url"]
    # The app keeps the connection and producer pools it made for an earlier test's Redis.
    app._pool = None
    app.amqp._producer_pool = None

    def restart_empty():
        server["process"].kill()
        server["process"].wait()
        server["process"] = start()

    server["restart_empty"] = restart_empty
    yield server
    server["process"].kill()
    app._pool = None
    app.amqp._producer_pool = None


def test_after_redis_restarts_empty_the_running_job_finishes_and_the_queued_one_is_sent_again(
    submit, start_worker, own_redis, settings
):
    settings.QUEUED_MESSAGE_GRACE_SECONDS = 0
    worker = start_worker("steady", env_overrides={"REDIS_URL": own_redis["url"]})
    wait_until_registered(worker)
    running = submit("running through it", steps=40)
    wait_for(lambda: status_of(running) == "running" and running.step >= 3, JOB_TIMEOUT, f"the first job to run\n{worker.log()}")
    waiting = submit("waiting behind it", steps=5)
    assert reconciler.job_ids_in_broker() == {running.pk, waiting.pk}

    own_redis["restart_empty"]()
    assert reconciler.job_ids_in_broker() == set()
    wait_for(lambda: status_of(running) != "running", JOB_TIMEOUT, f"the running job to end\n{worker.log()}")
    assert running.status == "succeeded" and running.step == 40, running.error_message

    assert reconciler.reconcile().messages_resent == [waiting.pk]
    wait_for(lambda: status_of(waiting) not in ("queued", "running"), JOB_TIMEOUT, f"the resent job to run\n{worker.log()}")
    assert waiting.status == "succeeded", waiting.error_message
    assert times_started(running) == times_started(waiting) == 1, "nothing ran twice"
    assert recorded_steps(running) == list(range(1, 41)) and recorded_steps(waiting) == list(range(1, 6))


def test_a_message_redelivered_after_the_visibility_timeout_does_not_start_the_job_twice(submit, start_worker):
    short_visibility = {"CELERY_VISIBILITY_TIMEOUT": "3", "CELERY_RESTORE_INTERVAL": "1", "CELERY_RESTORE_THROTTLE": "1"}
    busy = start_worker("busy", env_overrides=short_visibility)
    wait_until_registered(busy)
    job = submit("outlasts the timeout", steps=60, checkpoint_every=100)
    wait_for(lambda: status_of(job) == "running", JOB_TIMEOUT, f"the job to start\n{busy.log()}")
    idle = start_worker("idle", env_overrides=short_visibility)
    wait_until_registered(idle)

    wait_for(lambda: "not claimable" in idle.log(), 60, f"the idle worker to get the redelivered message\n{idle.log()}")
    wait_for(lambda: status_of(job) != "running", JOB_TIMEOUT, f"the job to finish\n{busy.log()}")
    assert job.status == "succeeded" and job.worker.hostname == busy.hostname
    assert times_started(job) == 1 and recorded_steps(job) == list(range(1, 61))


def test_a_job_out_of_memory_fails_saying_what_to_try_and_the_worker_takes_the_next_one(
    team_user, catalogue, data_dirs, tmp_path, start_worker
):
    # About 1.3 GB of address space for a small job on the tiny model, about 2 GB for a batch of 256.
    worker = start_worker("capped", env_overrides={"TRAINER_MEMORY_LIMIT_MB": "1600"})
    wait_until_registered(worker)
    team = team_user.memberships.get().team
    path = demo_data.write_instruction_set(tmp_path / "reverse.jsonl", rows=300)
    dataset = store_dataset(team, team_user, "reverse.jsonl", path.read_bytes())

    def submit(name, batch_size):
        spec = JobSpec(base_model="tiny-random-llama", dataset=dataset.pk,
                       hyperparameters={"max_steps": 2, "batch_size": batch_size, "eval_fraction": 0})
        with transaction.atomic():
            return submit_job(team, team_user, spec, name=name)

    too_big, small = submit("too big", 256), submit("small", 8)
    wait_for(lambda: status_of(small) not in ("queued", "running"), JOB_TIMEOUT, f"both jobs to end\n{worker.log()}")
    too_big.refresh_from_db()
    assert too_big.status == "failed"
    assert too_big.error_message.startswith("out of CPU memory within the worker's limit of 1600 MB: try QLoRA")
    assert "smaller batch_size" in too_big.error_message and "gradient_checkpointing" in too_big.error_message
    assert small.status == "succeeded", small.error_message
    assert worker.process.poll() is None, "the worker stays up"


def test_a_storage_error_while_saving_the_adapter_fails_the_job_and_offers_no_download(
    submit, start_worker, data_dirs, client, team_user
):
    worker = start_worker("unlucky-storage")
    wait_until_registered(worker)
    job = submit("nowhere to put it", steps=3, checkpoint_every=100)
    # Where storage would put this job's artifacts is a file, not a directory: saving fails for real.
    blocked = Path(data_dirs["MEDIA_ROOT"]) / "artifacts" / f"team-{job.team_id}" / f"job-{job.pk}"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    wait_for(lambda: status_of(job) not in ("queued", "running"), JOB_TIMEOUT, f"the job to end\n{worker.log()}")

    assert job.status == "failed" and job.error_message.startswith("could not store the artifacts:")
    assert not job.artifacts.exists()
    client.force_login(team_user)
    assert "Download" not in client.get(f"/jobs/{job.pk}/").content.decode().split("Metrics (CSV)")[0]
    assert worker.process.poll() is None


def test_a_web_server_killed_and_started_again_has_lost_nothing(team_user, catalogue, data_dirs, redis_url, tmp_path):
    """The web process keeps no state of its own: everything a user sees comes from the database."""
    import json
    import sys
    import urllib.request

    from jobs.models import ApiToken
    from tests.conftest import REPO, worker_database_url

    _, token = ApiToken.issue(team_user, "restart test")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | data_dirs | {"DATABASE_URL": worker_database_url(), "REDIS_URL": redis_url}

    def start_server():
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "web.log", "ab"),
        )
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "the web server to listen")
        return server

    def api(path, body=None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api{path}", data=body and json.dumps(body).encode(), method="POST" if body else "GET",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    server = start_server()
    dataset_id = store_dataset(team_user.memberships.get().team, team_user, "qa.jsonl",
                               b'{"prompt": "2+2=", "completion": "4"}\n' * 4).pk
    created = api("/jobs", {"base_model": "tiny-random-llama", "dataset": dataset_id})
    server.kill()
    server.wait()

    server = start_server()
    try:
        assert api(f"/jobs/{created['id']}") == created
        assert [job["id"] for job in api("/jobs")["items"]] == [created["id"]]
    finally:
        server.kill()
        server.wait()
