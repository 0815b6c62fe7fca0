"""No user value becomes a filesystem path, and no download serves a file outside storage.

Every stored file's path is generated (team, job, a random name); the name a client gave an upload
is kept for display only. Download routes take numeric ids (or `file-<n>`), so `../` and absolute
paths in their place name nothing: 404.
"""

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.test import Client

from jobs.models import ApiToken, Artifact, Checkpoint, Dataset, Job
from jobs.spec import JobSpec
from tests.web.fuzzing import ROUTES, multipart, upload_through

ROWS = b'{"prompt": "2+2=", "completion": "4"}\n' * 3
SECRET = b"a file outside storage"
HOSTILE_NAMES = [
    "../../etc/passwd",
    "../../../../../../tmp/tunedeck-escape.jsonl",
    "/abs/name.jsonl",
    "C:\\Windows\\system32\\name.jsonl",
    "name\x00.jsonl",
    "x" * 300 + ".jsonl",
    "%2e%2e%2fencoded.jsonl",
]
# Where a download route takes an id, what a traversal would put there.
HOSTILE_IDS = [
    "..", "../..", "../../etc/passwd", "%2e%2e%2f%2e%2e%2fsecret.txt", "..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd",
    "/etc/passwd", "-1", "0", "1.0", "1e3", "%00", "file-..", "file-1%2F..%2F..%2Fsecret.txt",
]
DOWNLOAD_ROUTES = [
    "/artifacts/{}/download/", "/checkpoints/{}/download/", "/jobs/{}/log/", "/api/artifacts/{}/download",
    "/v1/files/{}/content",
]
STORED_NAME = re.compile(r"(datasets|artifacts|checkpoints|logs)/team-\d+/([a-z0-9-]+/)?[0-9a-f]{32}(-\w+)?(\.zip|\.log)?")


@pytest.fixture
def secret(tmp_path, data_dirs):
    """A file beside the media directory, which no request may read."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return tmp_path / "secret.txt"


@pytest.fixture
def clients(team_user, data_dirs):
    browser = Client()
    browser.force_login(team_user)
    _, token = ApiToken.issue(team_user, "paths")
    return {"page": browser, "api": Client(HTTP_AUTHORIZATION=f"Bearer {token}")}


@pytest.fixture
def stored_files(team_user, data_dirs):
    """A dataset, a job with its log, an artifact and a checkpoint, each saved under a hostile file name."""
    team = team_user.memberships.get().team
    dataset = Dataset(team=team, name="d", original_filename="d.jsonl", size=len(ROWS), sha256="0" * 64,
                      format="prompt_completion", rows=3, is_valid=True)
    dataset.file.save("../../etc/passwd", ContentFile(ROWS), save=True)
    from jobs.models import BaseModel

    base_model = BaseModel.objects.create(name="m", path="/models/m", task="causal_lm_sft", architecture="llama")
    job = Job.objects.create(team=team, created_by=team_user, base_model=base_model, dataset=dataset,
                             spec=JobSpec(base_model="m", dataset=dataset.pk).model_dump(mode="json"))
    job.log_file.save("/etc/passwd", ContentFile(b"log"), save=True)
    artifact = Artifact(job=job, kind="adapter", size=3, sha256="0" * 64)
    artifact.file.save("../../../outside.zip", ContentFile(b"zip"), save=True)
    checkpoint = Checkpoint(job=job, step=1, path="checkpoints/step-000001", size=3)
    checkpoint.file.save("/abs/checkpoint.zip", ContentFile(b"zip"), save=True)
    return {"dataset": dataset, "job": job, "artifact": artifact, "checkpoint": checkpoint}


def inside_storage(field_file):
    return Path(field_file.path).resolve().is_relative_to(Path(settings.MEDIA_ROOT).resolve())


@pytest.mark.parametrize("route", ROUTES)
def test_a_hostile_upload_name_is_only_displayed_never_a_path(route, clients, tmp_path):
    for name in HOSTILE_NAMES:
        dataset, _ = upload_through(route, clients, name, ROWS)
        assert dataset.is_valid, name
        assert STORED_NAME.fullmatch(dataset.file.name), (name, dataset.file.name)
        assert inside_storage(dataset.file) and dataset.file.read() == ROWS
        assert dataset.original_filename.isprintable() and "/" not in dataset.original_filename
        assert len(dataset.original_filename) <= 255 and len(dataset.name) <= 200
    # A name that is nothing but a way up is no name: the upload has no file.
    dataset, reads = upload_through(route, clients, "..", ROWS)
    assert dataset is None and ("required" in reads or "send the file" in reads)
    # Nothing was written anywhere but the storage's own generated paths.
    written = {path for path in tmp_path.rglob("*") if path.is_file()} - set((tmp_path / "media").rglob("*"))
    assert not [path for path in written if "passwd" in path.name or path.suffix == ".jsonl"], written
    assert not Path("/abs").exists() and not Path("/tmp/tunedeck-escape.jsonl").exists()


@pytest.mark.parametrize("url", ["/datasets/", "/api/datasets", "/v1/files"])
def test_a_name_too_long_for_a_multipart_header_is_a_bad_request(url, clients):
    body, content_type = multipart("x" * 2000 + ".jsonl", ROWS, purpose="fine-tune")
    client = clients["page"] if url == "/datasets/" else clients["api"]
    assert client.post(url, body, content_type=content_type).status_code == 400
    assert not Dataset.objects.exists()


def test_every_stored_file_gets_a_generated_path(stored_files):
    for kind, row in stored_files.items():
        field_file = row.log_file if kind == "job" else row.file
        assert STORED_NAME.fullmatch(field_file.name), (kind, field_file.name)
        assert inside_storage(field_file), kind
        assert "passwd" not in field_file.name and "outside" not in field_file.name


@pytest.mark.parametrize("route", DOWNLOAD_ROUTES)
def test_a_download_by_a_traversing_id_is_not_found(route, clients, stored_files, secret):
    client = clients["api"] if route.startswith(("/api/", "/v1/")) else clients["page"]
    # The real ids answer, so the 404s below are about the ids, not about the route.
    real_id = {"/v1/": f"file-{stored_files['dataset'].pk}", "/jobs/": stored_files["job"].pk,
               "/checkpoints/": stored_files["checkpoint"].pk}.get(route[: route.index("/", 1) + 1],
                                                                 stored_files["artifact"].pk)
    assert client.get(route.format(real_id)).status_code == 200
    for hostile in HOSTILE_IDS:
        response = client.get(route.format(hostile))
        assert response.status_code == 404, (route.format(hostile), response.status_code)
        assert SECRET not in response.content


def test_a_stored_name_pointing_outside_storage_is_never_served(clients, stored_files, secret):
    """Defence in depth: even a row whose file name was tampered with cannot reach beyond the media directory."""
    outside = "../secret.txt"
    Artifact.objects.update(file=outside)
    Checkpoint.objects.update(file=outside)
    Job.objects.update(log_file=outside)
    Dataset.objects.update(file=outside)
    for client, url in [
        (clients["page"], f"/artifacts/{stored_files['artifact'].pk}/download/"),
        (clients["page"], f"/checkpoints/{stored_files['checkpoint'].pk}/download/"),
        (clients["page"], f"/jobs/{stored_files['job'].pk}/log/"),
        (clients["api"], f"/api/artifacts/{stored_files['artifact'].pk}/download"),
        (clients["api"], f"/v1/files/file-{stored_files['dataset'].pk}/content"),
    ]:
        response = client.get(url)
        assert response.status_code == 400, (url, response.status_code)  # Django's SuspiciousFileOperation
        assert SECRET not in b"".join(getattr(response, "streaming_content", [response.content]))


def test_a_jobs_name_only_names_its_downloads(clients, stored_files):
    """The name a user gave a job goes into download names, quoted, and never into a path or a header of its own."""
    Job.objects.update(name='../../evil"\r\nSet-Cookie: stolen=1')
    job, browser = stored_files["job"], clients["page"]
    for url in [f"/jobs/{job.pk}/metrics.csv", f"/jobs/{job.pk}/log/",
                f"/artifacts/{stored_files['artifact'].pk}/download/",
                f"/checkpoints/{stored_files['checkpoint'].pk}/download/"]:
        response = browser.get(url)
        assert response.status_code == 200, url
        disposition = response["Content-Disposition"]
        # Percent-encoded (a browser keeps only the last part of a name with slashes, RFC 6266).
        assert re.fullmatch(r"attachment; filename\*=utf-8''(\.\./\.\./)?evil%22%0D%0ASet-Cookie%3A%20stolen%3D1-[\w.-]+",
                            disposition), disposition
        assert "stolen" not in response.cookies
