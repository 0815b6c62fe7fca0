"""Jobs that ask for several GPUs: accepted by the form and both APIs, routed to workers that own that many,
refused at the door when no worker does, and handed back by a worker with too few."""

import json

import pytest

from jobs.models import BaseModel, Job, Worker
from jobs.spec import TrainingRun
from jobs.uploads import store_dataset
from workers import runner, tasks

GB = 1024
PROMPT_ROWS = b'{"prompt": "2+2=", "completion": "4"}\n' * 4


@pytest.fixture
def workers(db):
    return {
        "one": Worker.objects.create(hostname="one@gpu", queues="gpu-1x", gpu_name="NVIDIA H100", gpu_count=1,
                                     gpu_memory_total_mb=80 * GB),
        "four": Worker.objects.create(hostname="four@gpu", queues="gpu-4x", gpu_name="NVIDIA H100", gpu_count=4,
                                      gpu_memory_total_mb=80 * GB),
    }


@pytest.fixture
def unshaped_model(db):
    """A catalogue entry without recorded shapes: no memory estimate, so only the GPU count places its jobs."""
    return BaseModel.objects.create(name="opaque", path="/nowhere", task="causal_lm_sft", architecture="llama")


@pytest.fixture
def dataset(team_user, data_dirs):
    return store_dataset(team_user.memberships.get().team, team_user, "qa.jsonl", PROMPT_ROWS)


@pytest.fixture
def submit(api, dataset, django_capture_on_commit_callbacks):
    def submit(base_model, gpus=None, **spec):
        body = {"base_model": base_model.name, "dataset": dataset.pk} | spec
        if gpus is not None:
            body["gpus"] = gpus
        with django_capture_on_commit_callbacks(execute=False):
            return api.post("/api/jobs", json.dumps(body), content_type="application/json")

    return submit


@pytest.mark.parametrize("model", ["unshaped_model", "llama_1b_shape"])
def test_a_job_goes_to_a_queue_whose_workers_own_enough_gpus(submit, workers, model, request):
    base_model = request.getfixturevalue(model)
    single = submit(base_model)
    assert single.status_code == 201, single.content
    assert single.json()["spec"]["gpus"] == 1
    if model == "llama_1b_shape":  # with an estimate, the multi-GPU worker is kept for the jobs that need it
        assert single.json()["queue"] == "gpu-1x"

    double = submit(base_model, gpus=2)
    assert double.status_code == 201, double.content
    assert double.json()["queue"] == "gpu-4x" and double.json()["spec"]["gpus"] == 2
    assert "on gpu-4x for 2 GPUs" in Job.objects.get(pk=double.json()["id"]).events.get().message
    assert submit(base_model, gpus=4).json()["queue"] == "gpu-4x"


def test_a_job_no_worker_has_the_gpus_for_is_refused_naming_the_count(submit, workers, unshaped_model):
    refused = submit(unshaped_model, gpus=8)
    assert refused.status_code == 400
    assert refused.json() == {
        "field": "gpus",
        "detail": "this job asks for 8 GPUs; the largest worker here has 4 (four@gpu); ask for at most 4",
    }
    assert not Job.objects.exists()


def test_a_cpu_worker_runs_one_gpu_jobs_only(submit, unshaped_model, db):
    Worker.objects.create(hostname="cpu@host", queues="training", memory_total_mb=64 * GB)
    assert submit(unshaped_model).status_code == 201
    refused = submit(unshaped_model, gpus=2)
    assert refused.status_code == 400 and refused.json()["field"] == "gpus"
    assert refused.json()["detail"].startswith("this job asks for 2 GPUs; the largest worker here has no GPU")


def test_memory_is_still_checked_for_the_workers_with_enough_gpus(submit, workers, llama_1b_shape):
    workers["four"].gpu_memory_total_mb = 16 * GB
    workers["four"].save()
    # A full fine-tune of a 1B model fits the 80 GB single GPU, not the 16 GB GPUs of the worker that has two.
    refused = submit(llama_1b_shape, gpus=2, method={"type": "full"},
                     hyperparameters={"batch_size": 8, "max_seq_length": 1024})
    assert refused.status_code == 400 and refused.json()["field"] is None
    assert "the largest worker with 2 GPUs, four@gpu, has 16.0 GB" in refused.json()["detail"]


def test_a_worker_with_too_few_gpus_hands_the_job_back(submit, workers, unshaped_model):
    # Both serve one queue here, so the two-GPU job can reach the one-GPU worker.
    Worker.objects.update(queues="training")
    job_id = submit(unshaped_model, gpus=2).json()["id"]
    one, four = Worker.objects.get(hostname="one@gpu"), Worker.objects.get(hostname="four@gpu")
    assert tasks.too_small_for(job_id, one)
    assert tasks.too_small_for(job_id, one)  # said once in the events
    assert not tasks.too_small_for(job_id, four)
    job = Job.objects.get(pk=job_id)
    assert job.status == "queued"
    assert job.events.filter(message__contains="one@gpu has 1 GPU(s) and this job asks for 2").count() == 1


def new_job_form(base_model, dataset, **fields):
    return {
        "base_model": base_model.name, "dataset": dataset.pk, "method": "lora", "target_preset": "attention_qv",
        "r": 8, "alpha": 16, "dropout": 0.05, "epochs": 1, "batch_size": 1, "learning_rate": 0.0002,
        "max_seq_length": 256, "warmup_steps": 0, "eval_fraction": 0.1, "checkpoint_every": 50, "seed": 42,
    } | fields


def test_the_new_job_form_asks_for_gpus_and_says_why_it_refuses(client, team_user, workers, llama_1b_shape, dataset):
    client.force_login(team_user)
    page = client.get("/jobs/new/").content.decode()
    assert 'name="gpus"' in page and 'min="1"' in page and 'max="8"' in page

    too_many = client.post("/jobs/new/", new_job_form(llama_1b_shape, dataset, gpus=9)).content.decode()
    assert "less than or equal to 8" in too_many
    more_than_any = client.post("/jobs/new/", new_job_form(llama_1b_shape, dataset, gpus=6)).content.decode()
    assert "this job asks for 6 GPUs; the largest worker here has 4 (four@gpu)" in more_than_any
    assert not Job.objects.exists()

    estimate = client.get("/jobs/new/estimate/", new_job_form(llama_1b_shape, dataset, gpus=6),
                          HTTP_HX_REQUEST="true").content.decode()
    assert "No worker here has 6 GPUs" in estimate
    estimate = client.get("/jobs/new/estimate/", new_job_form(llama_1b_shape, dataset, gpus=3),
                          HTTP_HX_REQUEST="true").content.decode()
    assert "on each of 3 GPUs" in estimate and "1 of 2 workers here can run it" in estimate

    response = client.post("/jobs/new/", new_job_form(llama_1b_shape, dataset, gpus=3))
    job = Job.objects.get()
    assert response.status_code == 302 and job.spec["gpus"] == 3 and job.queue == "gpu-4x"
    assert client.post("/jobs/new/", new_job_form(llama_1b_shape, dataset)).status_code == 302
    assert Job.objects.order_by("-pk").first().spec["gpus"] == 1  # left empty: one GPU


def test_the_openai_api_takes_gpus_as_a_top_level_extra_field(api, workers, unshaped_model, dataset,
                                                              django_capture_on_commit_callbacks):
    def create(**extra):
        body = {"model": unshaped_model.name, "training_file": f"file-{dataset.pk}"} | extra
        with django_capture_on_commit_callbacks(execute=False):
            return api.post("/v1/fine_tuning/jobs", json.dumps(body), content_type="application/json")

    created = create(gpus=2)
    assert created.status_code == 200, created.content
    assert created.json()["gpus"] == 2 and Job.objects.get().spec["gpus"] == 2
    assert create().json()["gpus"] == 1
    for gpus, message in ((0, "greater than or equal to 1"), (16, "less than or equal to 8"),
                          (8, "asks for 8 GPUs; the largest worker here has 4")):
        refused = create(gpus=gpus)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "gpus"
        assert message in refused.json()["error"]["message"]


def test_the_workers_page_and_api_show_how_many_gpus_each_worker_owns(client, admin_user, workers):
    Worker.objects.create(hostname="cpu@host", queues="training", memory_total_mb=64 * GB)
    client.force_login(admin_user)
    page = client.get("/workers/").content.decode()
    assert "<th>GPUs</th>" in page and '<td class="num gpu-count">4</td>' in page
    assert '<td class="num gpu-count">0</td>' in page
    listed = {worker["hostname"]: worker["gpu_count"] for worker in client.get("/api/workers").json()}
    assert listed == {"cpu@host": 0, "four@gpu": 4, "one@gpu": 1}


def test_a_job_one_gpu_cannot_hold_whole_is_sharded_across_the_gpus_it_asks_for(
    submit, client, team_user, workers, llama_1b_shape, dataset
):
    """Full fine-tuning of the 1B shape needs ~31 GB on one GPU; the 16 GB GPUs of a 4-GPU worker hold a quarter each."""
    workers["four"].gpu_memory_total_mb = 16 * GB
    workers["four"].save()
    small_batches = {"batch_size": 4, "max_seq_length": 512}
    accepted = submit(llama_1b_shape, gpus=4, method={"type": "full"}, hyperparameters=small_batches)
    assert accepted.status_code == 201, accepted.content
    assert accepted.json()["queue"] == "gpu-4x"
    # Not on two of them: half the weights and optimizer state per GPU is still too much.
    refused = submit(llama_1b_shape, gpus=2, method={"type": "full"}, hyperparameters=small_batches)
    assert refused.status_code == 400
    assert "1/2 each" in refused.json()["detail"] and "four@gpu, has 16.0 GB" in refused.json()["detail"]

    client.force_login(team_user)
    estimate = client.get("/jobs/new/estimate/", new_job_form(llama_1b_shape, dataset, method="full", gpus=4,
                                                              batch_size=4, max_seq_length=512),
                          HTTP_HX_REQUEST="true").content.decode()
    assert "sharded across the 4 (FSDP)" in estimate and "1 of 2 workers here can run it" in estimate

    # The worker that runs it tells the engine to shard; the same job on GPUs that hold it whole is not sharded.
    job = Job.objects.get(pk=accepted.json()["id"])
    job.worker = workers["four"]
    _, spec_path = runner.prepare_workdir(job)
    assert TrainingRun.model_validate_json(spec_path.read_text()).shard_weights
    assert job.events.filter(message__contains="sharded across its 4 GPUs (FSDP)").exists()
    workers["four"].gpu_memory_total_mb = 80 * GB
    workers["four"].save()
    _, spec_path = runner.prepare_workdir(job)
    assert not TrainingRun.model_validate_json(spec_path.read_text()).shard_weights
