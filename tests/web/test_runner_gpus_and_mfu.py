"""The worker's runner with a stand-in trainer: the launch of a multi-GPU job, the PAUSE file, and MFU.

tests/web/fake_trainer.py speaks the engine's progress protocol, so what is tested here is the
runner's side: the command and environment it starts the child with, the pause it asks for, and
where the progress lines' mfu ends up (Metric rows, the job, its page, the CSV, the API, the card).
"""

import io
import json
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from django.urls import reverse

from jobs import lifecycle
from jobs.models import ApiToken, BaseModel, Job, Worker
from jobs.spec import JobSpec
from jobs.uploads import store_dataset
from workers import runner

from tests.web import fake_trainer

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
ROWS = b'{"prompt": "2+2=", "completion": "4"}\n' * 8


@pytest.fixture
def launched(monkeypatch, settings):
    """Every trainer command the runner builds, while the fake trainer runs in its place."""
    settings.WORKER_REPORT_SECONDS = 0.1
    built = []
    real_command = runner.trainer_command

    def fake_command(spec_path, outdir, gpus, port=None):
        built.append(real_command(spec_path, outdir, gpus, port))
        return [sys.executable, str(FAKE_TRAINER), str(spec_path), str(outdir)]

    monkeypatch.setattr(runner, "trainer_command", fake_command)
    return built


@pytest.fixture
def start_job(team_user, data_dirs):
    """start_job(gpus) -> a running job of that many GPUs, as a worker has just claimed it."""
    team = team_user.memberships.get().team
    base = BaseModel.objects.create(name="tiny", path="/nowhere", task="causal_lm_sft", architecture="llama")
    dataset = store_dataset(team, team_user, "qa.jsonl", ROWS)
    worker = Worker.objects.create(hostname="gpus@test", gpu_name="NVIDIA H100", gpu_count=4,
                                   gpu_memory_total_mb=81_559)

    def start(gpus):
        spec = JobSpec(base_model=base.name, dataset=dataset.pk, gpus=gpus)
        job = Job.objects.create(team=team, created_by=team_user, base_model=base, dataset=dataset,
                                 spec=spec.model_dump(mode="json"))
        return lifecycle.transition(job, Job.Status.RUNNING, "claimed by the test", worker=worker)

    return start


def outdir_of(job, settings):
    return Path(settings.WORKER_RUNS_DIR) / f"job-{job.pk}" / "out"


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_pause_request_creates_the_pause_file_and_the_job_pauses(
    gpus, start_job, launched, monkeypatch, settings
):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "pause")
    job = lifecycle.request_pause(start_job(gpus))
    assert job.status == "running" and job.pause_requested_at

    job = runner.run_claimed_job(job)

    assert job.status == "paused", job.error_message
    outdir = outdir_of(job, settings)
    assert (outdir / runner.PAUSE_FILE).exists()
    # A launcher would die of SIGUSR1: only a lone trainer gets it, beside the file.
    assert (outdir / "SIGUSR1").exists() == (gpus == 1)
    assert job.events.filter(message__startswith=f"paused at step {job.step}").exists()


def test_a_two_gpu_job_is_launched_under_accelerate_on_the_workers_first_two_gpus(
    start_job, launched, monkeypatch, settings
):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "finish")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    job = runner.run_claimed_job(start_job(2))

    assert job.status == "succeeded", job.error_message
    [command] = launched
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert command[command.index("--num_processes") + 1] == "2"
    outdir = outdir_of(job, settings)
    assert command[-4:] == ["-m", "workers.training", str(outdir.parent / "spec.json"), str(outdir)]
    port = int(command[command.index("--main_process_port") + 1])
    assert 0 < port < 65536
    launch = json.loads((outdir / "launch.json").read_text())
    assert launch["env"] == {"CUDA_VISIBLE_DEVICES": "3,5", "NCCL_NVLS_ENABLE": "0",
                             "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_a_one_gpu_job_runs_the_engine_itself_with_multicast_off_and_its_devices_untouched(
    start_job, launched, monkeypatch, settings
):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "finish")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    job = runner.run_claimed_job(start_job(1))

    assert job.status == "succeeded", job.error_message
    assert launched[0][1:3] == ["-m", "workers.training"]
    launch = json.loads((outdir_of(job, settings) / "launch.json").read_text())
    assert launch["env"] == {"CUDA_VISIBLE_DEVICES": "6", "NCCL_NVLS_ENABLE": "0",
                             "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_a_cancel_stops_the_ranks_a_launcher_started_in_sessions_of_their_own(
    start_job, launched, monkeypatch, settings
):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "launcher")
    monkeypatch.setattr(runner, "STOP_GRACE_SECONDS", 1)
    job = lifecycle.request_cancel(start_job(2))
    rank_pid_file = outdir_of(job, settings) / "rank.pid"
    # The runner sees the cancel once the rank runs (a cancel before that has nothing under the launcher to find).
    real_requests = runner.stop_requests
    monkeypatch.setattr(runner, "stop_requests", lambda job: real_requests(job) | (
        {} if rank_pid_file.exists() else {"cancel_requested_at": None}))
    started = time.monotonic()

    job = runner.run_claimed_job(job)

    assert job.status == "cancelled", job.error_message
    assert time.monotonic() - started < fake_trainer.RANK_SECONDS / 2  # stopped, not left to finish
    # Out of the launcher's process group and deaf to SIGTERM, the rank still ended (by SIGKILL).
    assert_ended(int(rank_pid_file.read_text()))


def test_a_rank_left_running_by_a_killed_launcher_is_stopped(start_job, launched, monkeypatch, settings):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "orphan")
    started = time.monotonic()

    job = runner.run_claimed_job(start_job(2))

    # Not left to hold the pipe (and its GPU) until it ends on its own, RANK_SECONDS later.
    assert time.monotonic() - started < fake_trainer.RANK_SECONDS / 2
    assert job.status == "failed" and "exited with code 1" in job.error_message
    assert_ended(int((outdir_of(job, settings) / "rank.pid").read_text()))


def assert_ended(pid):
    try:
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


def test_mfu_from_the_progress_lines_is_stored_and_shown(start_job, launched, monkeypatch, client, team_user):
    monkeypatch.setenv("FAKE_TRAINER_MODE", "finish")
    job = runner.run_claimed_job(start_job(1))
    assert job.status == "succeeded", job.error_message

    # Each step's line gives its Metric row; the finished line gives the job's summary.
    assert list(job.metrics.values_list("step", "mfu")) == [(1, 0.41), (2, 0.42), (3, 0.43)]
    assert job.mfu == 0.412
    client.force_login(team_user)
    page = client.get(reverse("job_detail", args=[job.pk])).content.decode()
    assert '<dd id="mfu">41%</dd>' in page
    csv_lines = client.get(reverse("job_metrics_csv", args=[job.pk])).content.decode().splitlines()
    header = csv_lines[0].split(",")
    assert [line.split(",")[header.index("mfu")] for line in csv_lines[1:]] == ["0.41", "0.42", "0.43"]

    _, token = ApiToken.issue(team_user, "tests")
    api = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert client.get(f"/api/jobs/{job.pk}", **api).json()["mfu"] == 0.412
    assert [row["mfu"] for row in client.get(f"/api/jobs/{job.pk}/metrics", **api).json()] == [0.41, 0.42, 0.43]

    artifact = job.artifacts.get()
    with artifact.file.open("rb") as file, zipfile.ZipFile(io.BytesIO(file.read())) as archive:
        card = archive.read("README.md").decode()
    assert "| model FLOPs utilisation (share of the GPUs' dense bf16 peak) | 0.412 |" in card


def test_a_step_line_sets_the_running_jobs_live_mfu_and_a_cpu_step_leaves_it_empty(start_job, client, team_user):
    job = start_job(1)
    reporter = runner.ProgressReporter(job, Path("/nowhere"))
    reporter.handle({"event": "step", "step": 1, "train_loss": 2.0, "tokens_per_sec": 900.0, "mfu": 0.37})
    reporter.flush()
    job.refresh_from_db()
    assert job.mfu == 0.37
    client.force_login(team_user)
    assert '<dd id="mfu">37%</dd>' in client.get(reverse("job_live", args=[job.pk])).content.decode()

    reporter.handle({"event": "step", "step": 2, "train_loss": 1.9, "tokens_per_sec": 900.0, "mfu": None})
    reporter.flush()
    assert '<dd id="mfu">–</dd>' in client.get(reverse("job_live", args=[job.pk])).content.decode()
