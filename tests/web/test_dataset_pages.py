import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from jobs.models import Dataset


@pytest.fixture
def client_alice(client, team_user, data_dirs):
    client.force_login(team_user)
    return client


def upload(client, filename, content, **fields):
    return client.post(reverse("dataset_list"), {"file": SimpleUploadedFile(filename, content), **fields}, follow=True)


def test_a_valid_upload_shows_stats_and_preview(client_alice):
    rows = [{"prompt": f"reverse: ab{i}\n", "completion": f"{i}ba"} for i in range(12)]
    response = upload(client_alice, "rev.jsonl", "\n".join(json.dumps(r) for r in rows).encode(), name="reversals")
    page = response.content.decode()
    dataset = Dataset.objects.get(name="reversals")
    assert dataset.is_valid and dataset.rows == 12 and dataset.format == "prompt_completion"
    assert response.redirect_chain[-1][0] == reverse("dataset_detail", args=[dataset.pk])
    assert "12 rows in prompt_completion format" in page
    assert "reverse: ab0" in page  # preview
    assert dataset.file.read() == "\n".join(json.dumps(r) for r in rows).encode()


def test_an_invalid_upload_is_kept_and_lists_problems_by_line(client_alice):
    content = b'{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\nnope\n'
    page = upload(client_alice, "bad.jsonl", content).content.decode()
    dataset = Dataset.objects.get()
    assert not dataset.is_valid and dataset.problem_count == 2
    assert "2 problems" in page
    assert "<strong>line 2</strong>: field &quot;prompt&quot; must be a string, got int" in page
    assert "<strong>line 3</strong>: not valid JSON" in page


def test_an_oversized_upload_is_refused_at_the_door(client_alice, settings):
    settings.DATASET_MAX_BYTES = 100
    response = upload(client_alice, "big.jsonl", b'{"text": "x"}\n' * 20)
    assert response.status_code == 200
    assert "the file is 280 bytes; the limit is 100" in response.content.decode()
    assert not Dataset.objects.exists()


def test_a_tsv_with_other_column_names_maps_its_columns(client_alice):
    content = b"label\tcontent\n1\tlovely film\n0\tdull plot\n"
    upload(client_alice, "dev.tsv", content, text_column="content")
    dataset = Dataset.objects.get()
    assert dataset.is_valid and dataset.format == "classification"
    assert dataset.column_map == {"text": "content"}
    assert dataset.stats["labels"] == {"0": 1, "1": 1}


def test_another_teams_dataset_is_not_found(client, team_user, other_team_user, data_dirs):
    client.force_login(team_user)
    upload(client, "mine.jsonl", b'{"text": "hello"}\n')
    dataset = Dataset.objects.get()
    client.force_login(other_team_user)
    assert client.get(reverse("dataset_detail", args=[dataset.pk])).status_code == 404
    assert "mine.jsonl" not in client.get(reverse("dataset_list")).content.decode()


def test_pages_need_a_login(client, db):
    response = client.get(reverse("dataset_list"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
