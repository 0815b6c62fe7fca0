"""Every stored file through S3-compatible storage: a real S3 server (moto's, in a thread), not a mock object."""

import io
import zipfile

import boto3
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from moto.server import ThreadedMotoServer

from jobs.models import BaseModel, Checkpoint, Dataset, Job
from jobs.spec import JobSpec
from jobs.storage import storage_use
from workers.inference import extract_artifact
from workers.runner import copy_dataset, store_artifact, store_checkpoint, store_log, unpack_checkpoint

BUCKET = "tunedeck-test"


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, settings, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    # What settings.py builds from TUNEDECK_S3_BUCKET and TUNEDECK_S3_ENDPOINT_URL.
    settings.STORAGES = settings.STORAGES | {"default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": BUCKET, "endpoint_url": s3_server, "region_name": "us-east-1", "default_acl": None,
        "querystring_auth": True, "file_overwrite": False,
    }}}
    settings.MEDIA_ROOT = str(tmp_path / "media-never-used")
    settings.WORKER_RUNS_DIR = str(tmp_path / "runs")
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def object_keys(client):
    return {item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


@pytest.fixture
def s3_job(bucket, client, team_user):
    """A dataset uploaded through the page into the bucket, and a finished job on it."""
    client.force_login(team_user)
    content = b'{"prompt": "2+2=", "completion": "4"}\n' * 4
    response = client.post(reverse("dataset_list"), {"file": SimpleUploadedFile("qa.jsonl", content)}, follow=True)
    assert response.status_code == 200
    dataset = Dataset.objects.get()
    assert dataset.is_valid and dataset.file.name in object_keys(bucket)
    team = team_user.memberships.get().team
    spec = JobSpec(base_model="tiny", dataset=dataset.pk, method={"type": "lora", "r": 4}).model_dump(mode="json")
    base_model = BaseModel.objects.create(name="tiny", path="/nowhere", task="causal_lm_sft", architecture="llama")
    return Job.objects.create(team=team, created_by=team_user, base_model=base_model, dataset=dataset, spec=spec,
                              status="succeeded")


def test_dataset_artifact_checkpoint_and_log_round_trip_through_s3(s3_job, bucket, client, tmp_path, settings):
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert open(copy_dataset(s3_job.dataset, workdir, "dataset"), "rb").read() == s3_job.dataset.file.open("rb").read()

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    artifact = store_artifact(s3_job, "adapter", adapter, workdir)
    assert artifact.file.name in object_keys(bucket)
    download = client.get(reverse("artifact_download", args=[artifact.pk]))
    with zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))) as archive:
        assert archive.read("adapter_model.safetensors") == b"weights" * 100
    # The playground's worker unpacks the same artifact from the bucket.
    unpacked = extract_artifact(lambda: artifact.file.open("rb"), tmp_path / "cache" / f"artifact-{artifact.pk}")
    assert (unpacked / "adapter_model.safetensors").read_bytes() == b"weights" * 100

    settings.CHECKPOINT_FILES_KEPT = 1
    outdir = tmp_path / "out"
    for step in (1, 2):
        (outdir / f"checkpoints/step-{step}").mkdir(parents=True)
        (outdir / f"checkpoints/step-{step}/state.json").write_text(f'{{"step": {step}}}')
        store_checkpoint(s3_job, step, f"checkpoints/step-{step}", outdir, workdir)
    first, last = Checkpoint.objects.order_by("step")
    assert first.file.name == "" and last.file.name in object_keys(bucket)  # the older one's object is gone
    assert len([key for key in object_keys(bucket) if key.startswith("checkpoints/")]) == 1
    resumed = unpack_checkpoint(last, tmp_path / "resume")
    assert (resumed / "state.json").read_text() == '{"step": 2}'

    for run in (1, 2):
        (tmp_path / "stderr.log").write_bytes(f"run {run} output\n".encode())
        store_log(s3_job, tmp_path / "stderr.log")
        s3_job.refresh_from_db()
    log = s3_job.log_file.open("rb").read()
    assert b"run 1 output" in log and b"run 2 output" in log and s3_job.log_size == len(log)
    assert len([key for key in object_keys(bucket) if key.startswith("logs/")]) == 1

    use = storage_use(s3_job.team)
    assert use["checkpoints"] == last.size and use["logs"] == len(log) and use["artifacts"] == artifact.size
    assert not (tmp_path / "media-never-used").exists()


def test_deleting_a_job_removes_its_objects_from_the_bucket(s3_job, bucket, client, tmp_path,
                                                            django_capture_on_commit_callbacks):
    workdir = tmp_path / "work"
    (workdir / "out/checkpoints/step-1").mkdir(parents=True)
    (workdir / "out/checkpoints/step-1/state.json").write_text("{}")
    store_checkpoint(s3_job, 1, "checkpoints/step-1", workdir / "out", workdir)
    store_artifact(s3_job, "adapter", workdir / "out/checkpoints/step-1", workdir)
    assert len(object_keys(bucket)) == 3  # dataset, checkpoint, artifact

    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("job_delete", args=[s3_job.pk]))
    assert object_keys(bucket) == {s3_job.dataset.file.name}
