"""A job that asks for two GPUs, run by the worker's runner for real: accelerate's launcher, two engine
processes (on the CPU here, with gloo: the same launch a GPU worker makes, without the GPUs), a pause
asked for by the PAUSE file, and a resume that finishes it."""

import pytest
from django.urls import reverse

from jobs import demo_data, lifecycle
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset
from workers import runner

pytestmark = [pytest.mark.integration]


def test_a_two_process_job_pauses_by_the_pause_file_and_resumes_to_the_end(
    team_user, catalogue, data_dirs, tmp_path, settings, monkeypatch, client, django_capture_on_commit_callbacks
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a small machine
    launched = []
    real_command = runner.trainer_command

    def command(*args, **kwargs):
        launched.append(real_command(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(runner, "trainer_command", command)
    settings.WORKER_REPORT_SECONDS = 0.2
    team = team_user.memberships.get().team
    path = demo_data.write_instruction_set(tmp_path / "string-operations.jsonl", rows=200)
    dataset = store_dataset(team, team_user, path.name, path.read_bytes())
    spec = JobSpec.model_validate({
        "base_model": catalogue["llama"].name, "dataset": dataset.pk, "gpus": 2,
        "method": {"type": "lora", "r": 8, "target_modules": "all_linear"},
        "hyperparameters": {"max_steps": 30, "batch_size": 4, "learning_rate": 0.01, "max_seq_length": 64,
                            "eval_fraction": 0, "checkpoint_every": 1000, "seed": 3},
    })
    # No worker is known, so the job is queued on the default queue; its message is not sent: this test is the worker.
    with django_capture_on_commit_callbacks(execute=False):
        job = submit_job(team, team_user, spec, name="two processes")
    job = lifecycle.request_pause(lifecycle.transition(job, "running", "started by the test"))

    job = runner.run_claimed_job(job)

    assert job.status == "paused", f"{job.error_message}\n{list(job.events.values_list('message', flat=True))}"
    assert launched[0][1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    outdir = tmp_path / "runs" / f"job-{job.pk}" / "out"
    assert (outdir / runner.PAUSE_FILE).exists()
    assert not (outdir / "adapter").exists()
    paused_at = job.step
    assert 0 < paused_at < 30 and job.checkpoints.get().step == paused_at

    with django_capture_on_commit_callbacks(execute=False):
        job = lifecycle.resume(job)
    job = runner.run_claimed_job(lifecycle.transition(job, "running", "resumed by the test"))

    assert job.status == "succeeded", job.error_message
    assert job.step == 30 and job.tokens_per_sec and job.mfu is None  # no GPU, no MFU
    assert job.events.filter(message=f"resuming from the checkpoint at step {paused_at}").exists()
    client.force_login(team_user)
    assert '<dd id="mfu">–</dd>' in client.get(reverse("job_detail", args=[job.pk])).content.decode()
