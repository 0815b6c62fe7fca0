"""The site's limits come from settings, read when a request comes, and each can be set from the environment.

Upload size, rows and line length hold on every upload route (the page, /api/datasets, /v1/files);
max_seq_length and the sweep size on job submission.
"""

import json
import os
import subprocess
import sys

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from jobs.models import ApiToken, BaseModel, Dataset, Job
from jobs.spec import JobSpec
from jobs.uploads import store_dataset
from tests.conftest import REPO
from tests.web.fuzzing import ROUTES, upload_through

ROWS = b'{"prompt": "2+2=", "completion": "4"}\n' * 5  # 5 rows of 38 bytes: 190 bytes, lines of 37 characters


@pytest.fixture
def clients(team_user, data_dirs):
    browser = Client()
    browser.force_login(team_user)
    _, token = ApiToken.issue(team_user, "limits")
    return {"page": browser, "api": Client(HTTP_AUTHORIZATION=f"Bearer {token}")}


def upload_everywhere(clients, data):
    """What the user of each upload route reads about `data`."""
    return [upload_through(route, clients, "qa.jsonl", data)[1] for route in ROUTES]


def test_every_limit_can_be_set_from_the_environment(tmp_path):
    environment = os.environ | {
        "TUNEDECK_DATA_DIR": str(tmp_path), "DATASET_MAX_BYTES": "1234", "DATASET_MAX_ROWS": "56",
        "DATASET_MAX_LINE_CHARS": "789", "TUNEDECK_MAX_SEQ_LENGTH": "512", "TUNEDECK_SWEEP_MAX_JOBS": "9",
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
    }
    read = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; import json; print(json.dumps([settings.DATASET_MAX_BYTES, "
         "settings.DATASET_MAX_ROWS, settings.DATASET_MAX_LINE_CHARS, settings.MAX_SEQ_LENGTH, "
         "settings.TUNEDECK_SWEEP_MAX_JOBS]))"],
        cwd=REPO, env=environment, capture_output=True, text=True, check=True,
    )
    assert json.loads(read.stdout) == [1234, 56, 789, 512, 9]


def test_the_upload_size_limit_holds_on_every_route(clients):
    with override_settings(DATASET_MAX_BYTES=100):
        answers = upload_everywhere(clients, ROWS)
    for answer in answers:
        assert "190 bytes; the limit is 100" in answer
    assert not Dataset.objects.exists()  # refused before anything was stored


def test_the_row_limit_holds_on_every_route(clients):
    with override_settings(DATASET_MAX_ROWS=3):
        answers = upload_everywhere(clients, ROWS)
    for answer in answers:
        assert "line 4: more than 3 rows; the limit is 3" in answer
    assert Dataset.objects.count() == 3 and not Dataset.objects.filter(is_valid=True).exists()


def test_the_line_length_limit_holds_on_every_route(clients):
    long_line = b'{"prompt": "' + b"x" * 100 + b'", "completion": "4"}\n'
    with override_settings(DATASET_MAX_LINE_CHARS=50):
        answers = upload_everywhere(clients, ROWS[:76] + long_line)
    for answer in answers:
        assert "line 3: line is 133 characters long; the limit is 50" in answer
    with override_settings(DATASET_MAX_LINE_CHARS=200):
        upload_everywhere(clients, ROWS[:76] + long_line)
    assert Dataset.objects.filter(is_valid=True).count() == 3


@pytest.fixture
def catalogue_entry(db):
    # No recorded shapes: no memory estimate can refuse the job, only the limit under test.
    return BaseModel.objects.create(name="tiny-random-llama", path="/models/tiny", task="causal_lm_sft", architecture="llama")


@pytest.fixture
def dataset(team_user, data_dirs):
    return store_dataset(team_user.memberships.get().team, team_user, "qa.jsonl", ROWS)


def test_the_sequence_length_limit_holds_on_every_route(clients, catalogue_entry, dataset, django_capture_on_commit_callbacks):
    browser, api = clients["page"], clients["api"]
    spec = {"base_model": "tiny-random-llama", "dataset": dataset.pk, "hyperparameters": {"max_seq_length": 256}}
    form = {"base_model": "tiny-random-llama", "dataset": dataset.pk, "method": "lora", "r": 8, "alpha": 16,
            "dropout": 0.05, "target_preset": "attention_qv", "epochs": 1, "batch_size": 4, "learning_rate": 0.001,
            "max_seq_length": 256, "warmup_steps": 0, "eval_fraction": 0.25, "checkpoint_every": 50, "seed": 1}
    openai = {"model": "tiny-random-llama", "training_file": f"file-{dataset.pk}",
              "extra_hyperparameters": {"max_seq_length": 256}}
    with override_settings(MAX_SEQ_LENGTH=128), django_capture_on_commit_callbacks(execute=False):
        page = browser.post(reverse("job_new"), form)
        rest = api.post("/api/jobs", json.dumps(spec), content_type="application/json")
        v1 = api.post("/v1/fine_tuning/jobs", json.dumps(openai), content_type="application/json")
    message = "max_seq_length is 256; the limit here is 128"
    assert page.status_code == 200 and page.context["form"].errors["max_seq_length"] == [message]
    assert rest.status_code == 400 and rest.json() == {"detail": message, "field": "hyperparameters.max_seq_length"}
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "extra_hyperparameters.max_seq_length"
    assert not Job.objects.exists()

    with override_settings(MAX_SEQ_LENGTH=256), django_capture_on_commit_callbacks(execute=False):
        assert api.post("/api/jobs", json.dumps(spec), content_type="application/json").status_code == 201


def test_the_sweep_size_limit_holds_on_the_api(clients, catalogue_entry, dataset, django_capture_on_commit_callbacks):
    api = clients["api"]
    sweep = {"name": "ranks", "base_spec": JobSpec(base_model="tiny-random-llama", dataset=dataset.pk).model_dump(),
             "grid": {"method.r": [4, 8, 16]}}
    with override_settings(TUNEDECK_SWEEP_MAX_JOBS=2), django_capture_on_commit_callbacks(execute=False):
        refused = api.post("/api/sweeps", json.dumps(sweep), content_type="application/json")
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == "this grid makes 3 jobs; a sweep may have at most 2 (TUNEDECK_SWEEP_MAX_JOBS)"
    assert not Job.objects.exists()
    with override_settings(TUNEDECK_SWEEP_MAX_JOBS=3), django_capture_on_commit_callbacks(execute=False):
        assert api.post("/api/sweeps", json.dumps(sweep), content_type="application/json").status_code == 201
    assert Job.objects.count() == 3
