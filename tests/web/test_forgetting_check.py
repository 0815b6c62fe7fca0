"""Choosing a reference dataset for the forgetting check at submission."""

import pytest

from jobs.models import Job
from jobs.uploads import store_dataset


@pytest.fixture
def datasets(team_user, data_dirs):
    team = team_user.memberships.get().team
    return {
        "train": store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4),
        "proverbs": store_dataset(team, team_user, "proverbs.jsonl", b'{"text": "Haste makes waste."}\n' * 3),
        "reviews": store_dataset(team, team_user, "reviews.csv", b"text,label\ngood,pos\nbad,neg\n"),
    }


def form(datasets, reference):
    return {
        "base_model": "tiny-random-llama", "dataset": datasets["train"].pk, "reference_dataset": reference.pk,
        "method": "lora", "target_preset": "attention_qv", "r": 8, "alpha": 16, "dropout": 0.05, "epochs": 1,
        "batch_size": 8, "learning_rate": 0.01, "max_seq_length": 64, "warmup_steps": 0, "eval_fraction": 0.1,
        "checkpoint_every": 50, "seed": 42,
    }


def test_a_text_dataset_is_taken_as_the_reference(client, team_user, catalogue, datasets, django_capture_on_commit_callbacks):
    client.force_login(team_user)
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/jobs/new/", form(datasets, datasets["proverbs"]))
    assert response.status_code == 302
    job = Job.objects.get()
    assert job.reference_dataset == datasets["proverbs"] and job.spec["reference_dataset"] == datasets["proverbs"].pk
    assert "Forgetting check" in client.get(f"/jobs/{job.pk}/").content.decode()


def test_a_classification_dataset_cannot_be_the_reference(client, team_user, catalogue, datasets):
    client.force_login(team_user)
    response = client.post("/jobs/new/", form(datasets, datasets["reviews"]))
    assert response.status_code == 200 and not Job.objects.exists()
    assert "cannot serve the forgetting check" in response.content.decode()
