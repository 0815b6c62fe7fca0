"""The official `openai` client, unchanged, against a live TuneDeck and a real Celery worker."""

import hashlib
import io
import json
import urllib.request
import zipfile

import openai
import pytest

from jobs import demo_data
from jobs.models import ApiToken, Checkpoint, Job, Metric
from tests.conftest import JOB_TIMEOUT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TERMINAL = ("succeeded", "failed", "cancelled")
# The tiny model's catalogue entry suggests lr 0.01: 50 x the API's base rate of 2e-4.
TINY_MODEL_LR_MULTIPLIER = 50
SHORT_TRAINING = {"max_seq_length": 64, "checkpoint_every": 5}


@pytest.fixture
def client(live_server, team_user):
    _, token = ApiToken.issue(team_user, "openai client")
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=token, max_retries=0)


def job_number(openai_job):
    return int(openai_job.id.removeprefix("ftjob-"))


def wait_until_finished(client, job_id):
    return wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and job,
        JOB_TIMEOUT, f"{job_id} to finish",
    )


# The database fixtures come before the worker, which starts a process on that database.
def test_upload_train_watch_checkpoints_and_cancel(live_server, team_user, catalogue, celery_worker, client, tmp_path):
    path = demo_data.write_instruction_set(tmp_path / "reverse.jsonl", rows=100)
    with open(path, "rb") as file:
        training_file = client.files.create(file=file, purpose="fine-tune")
    assert training_file.status == "processed" and training_file.filename == "reverse.jsonl"
    assert client.files.retrieve(training_file.id).bytes == path.stat().st_size
    assert client.files.content(training_file.id).content == path.read_bytes()

    bad_path = tmp_path / "bad.jsonl"
    bad_path.write_text('{"prompt": "a", "completion": "b"}\nnot json at all\n')
    with open(bad_path, "rb") as file, pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=file, purpose="fine-tune")
    assert "line 2" in refused.value.message and refused.value.param == "file"
    bad_file = next(file for file in client.files.list() if file.status == "error")
    assert "line 2" in bad_file.status_details

    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="tiny-random-llama", training_file=training_file.id, extra_body={"adapter": {"type": "lora", "r": 0}}
        )
    assert refused.value.param == "adapter.r"
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="gpt-5", training_file=training_file.id)
    assert refused.value.param == "model" and "tiny-random-llama" in refused.value.message

    job = client.fine_tuning.jobs.create(
        model="tiny-random-llama",
        training_file=training_file.id,
        suffix="reverse",
        seed=7,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": TINY_MODEL_LR_MULTIPLIER},
        extra_body={
            "adapter": {"type": "lora", "r": 8, "target_modules": "all_linear"},
            "extra_hyperparameters": SHORT_TRAINING,
        },
    )
    assert job.status == "queued" and job.model == "tiny-random-llama" and job.training_file == training_file.id
    assert job.hyperparameters.learning_rate_multiplier == TINY_MODEL_LR_MULTIPLIER and job.seed == 7

    wait_for(
        lambda: any(event.type == "metrics" for event in client.fine_tuning.jobs.list_events(job.id)),
        JOB_TIMEOUT, f"training steps in the events\n{celery_worker.log()}",
    )
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[-1].message.startswith("queued by alice")  # newest first
    assert [event.created_at for event in events] == sorted((event.created_at for event in events), reverse=True)

    done = wait_until_finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-random-llama:acme:reverse:job-{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.error is None
    losses = [event.data["train_loss"] for event in client.fine_tuning.jobs.list_events(job.id, limit=100)
              if event.type == "metrics"][::-1]
    assert losses[-1] < losses[0], "the loss should fall"

    # The adapter comes through the native API, with the same token.
    def native_api(path):
        request = urllib.request.Request(f"{live_server.url}/api{path}", headers={"Authorization": f"Bearer {client.api_key}"})
        with urllib.request.urlopen(request) as response:
            return response.read()

    artifacts = json.loads(native_api(f"/jobs/{job_number(job)}/artifacts"))
    [adapter] = [artifact for artifact in artifacts if artifact["kind"] == "adapter"]
    download = native_api(f"/artifacts/{adapter['id']}/download")
    assert hashlib.sha256(download).hexdigest() == adapter["sha256"]
    with zipfile.ZipFile(io.BytesIO(download)) as archive:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(archive.namelist())

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [checkpoint.step_number for checkpoint in checkpoints] == [10, 5]
    assert checkpoints[0].fine_tuning_job_id == job.id
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model)

    with pytest.raises(openai.ConflictError):
        client.files.delete(training_file.id)
    assert client.files.delete(bad_file.id).deleted

    long_job = client.fine_tuning.jobs.create(
        model="tiny-random-llama",
        training_file=training_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1}}},
        extra_body={"extra_hyperparameters": SHORT_TRAINING | {"max_steps": 100_000}},
    )
    wait_for(lambda: client.fine_tuning.jobs.retrieve(long_job.id).status == "running", JOB_TIMEOUT, "the long job to start")
    wait_for(lambda: Job.objects.get(pk=job_number(long_job)).step >= 3, JOB_TIMEOUT, "a few steps of the long job")
    client.fine_tuning.jobs.pause(long_job.id)
    paused = wait_for(
        lambda: (found := client.fine_tuning.jobs.retrieve(long_job.id)).status in ("paused", *TERMINAL) and found,
        JOB_TIMEOUT, f"the long job to pause\n{celery_worker.log()}",
    )
    assert paused.status == "paused", paused.error
    paused_at = client.fine_tuning.jobs.checkpoints.list(long_job.id).data[0].step_number
    assert paused_at == Job.objects.get(pk=job_number(long_job)).step >= 3

    assert client.fine_tuning.jobs.resume(long_job.id).status == "queued"
    wait_for(
        lambda: Job.objects.get(pk=job_number(long_job)).step > paused_at, JOB_TIMEOUT,
        f"the resumed job to train past step {paused_at}\n{celery_worker.log()}",
    )
    messages = [event.message for event in client.fine_tuning.jobs.list_events(long_job.id, limit=100)]
    assert f"resuming from the checkpoint at step {paused_at}" in messages
    resumed_steps = Metric.objects.filter(job_id=job_number(long_job), train_loss__isnull=False).values_list("step", flat=True)
    assert sorted(resumed_steps) == list(range(1, max(resumed_steps) + 1)), "each step once, none lost or repeated"
    client.fine_tuning.jobs.cancel(long_job.id)
    assert wait_until_finished(client, long_job.id).status == "cancelled"
    # Cancelling keeps the checkpoints, files and all, for downloading or a later retention policy.
    kept = Checkpoint.objects.filter(job_id=job_number(long_job)).exclude(file="")
    assert kept.exists() and all(checkpoint.file.storage.exists(checkpoint.file.name) for checkpoint in kept)

    first_page = client.fine_tuning.jobs.list(limit=1)
    assert [listed.id for listed in first_page.data] == [long_job.id] and first_page.has_more
    second_page = client.fine_tuning.jobs.list(limit=1, after=long_job.id)
    assert [listed.id for listed in second_page.data] == [job.id] and not second_page.has_more
    assert [listed.id for listed in client.fine_tuning.jobs.list(limit=1)] == [long_job.id, job.id]
