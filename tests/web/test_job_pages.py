import pytest
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse

from jobs import lifecycle
from jobs.models import Artifact, Job, JobEvent, Metric, Worker
from jobs.uploads import store_dataset


@pytest.fixture
def instruction_dataset(team_user, data_dirs):
    team = team_user.memberships.get().team
    return store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)


@pytest.fixture
def form_data(catalogue, instruction_dataset):
    return {
        "name": "first", "base_model": "tiny-random-llama", "dataset": instruction_dataset.pk, "method": "lora",
        "r": 8, "alpha": 16, "dropout": 0.05, "target_preset": "attention_qv", "custom_targets": "",
        "epochs": 1, "max_steps": 5, "batch_size": 4, "learning_rate": 0.001, "max_seq_length": 64,
        "warmup_steps": 0, "eval_fraction": 0.25, "checkpoint_every": 50, "seed": 1,
    }


def submit(client, data):
    return client.post(reverse("job_new"), data)


def test_submitting_the_form_queues_a_job_with_its_spec(client, team_user, form_data, django_capture_on_commit_callbacks):
    client.force_login(team_user)
    # The message to Redis is sent on commit; this test checks the row, not the broker.
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = submit(client, form_data)
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("job_detail", args=[job.pk])
    assert len(callbacks) == 1
    assert job.status == "queued" and job.name == "first"
    assert job.spec["hyperparameters"]["max_steps"] == 5
    assert job.spec["method"] == {"type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05,
                                  "target_modules": "attention_qv", "bias": "none"}
    assert JobEvent.objects.get(job=job).to_status == "queued"


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"r": 0}, "r", "Input should be greater than or equal to 1"),
        ({"learning_rate": 5}, "learning_rate", "Input should be less than or equal to 1"),
        ({"dropout": 1}, "dropout", "Input should be less than 1"),
        ({"target_preset": "custom", "custom_targets": " , "}, "custom_targets", "give a preset or at least one module name"),
        # A classifier base model with an instruction dataset: the mismatch is named on the dataset.
        ({"base_model": "all-MiniLM-L6-v2"}, "dataset", "is in prompt_completion format, which does not fit Sequence classification"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(client, team_user, form_data, change, field, message):
    client.force_login(team_user)
    response = submit(client, form_data | change)
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not Job.objects.exists()


def test_the_job_page_shows_progress_and_stops_polling_when_done(client, team_user, form_data):
    client.force_login(team_user)
    submit(client, form_data)
    job = Job.objects.get()
    live = reverse("job_live", args=[job.pk])
    assert f'hx-get="{live}"' in client.get(reverse("job_detail", args=[job.pk])).content.decode()

    lifecycle.claim(job.pk, Worker.objects.create(hostname="w@h"))
    Metric.objects.bulk_create([Metric(job=job, step=s, train_loss=3.0 - s / 10) for s in range(1, 6)])
    Job.objects.filter(pk=job.pk).update(step=3, total_steps=5, train_loss=2.7)
    page = client.get(live).content.decode()
    assert "step 3/5" in page and "2.7000" in page and "<polyline" in page

    lifecycle.transition(Job.objects.get(pk=job.pk), "succeeded", "done")
    page = client.get(live).content.decode()
    assert "succeeded" in page and "hx-get" not in page


def test_cancel_button_cancels_a_queued_job(client, team_user, form_data):
    client.force_login(team_user)
    submit(client, form_data)
    job = Job.objects.get()
    client.post(reverse("job_cancel", args=[job.pk]))
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_another_teams_job_and_artifact_are_not_found(client, team_user, other_team_user, form_data, data_dirs):
    client.force_login(team_user)
    submit(client, form_data)
    job = Job.objects.get()
    artifact = Artifact(job=job, kind="adapter", size=3, sha256="0" * 64)
    artifact.file.save("adapter.zip", ContentFile(b"zip"), save=True)
    assert client.get(reverse("artifact_download", args=[artifact.pk])).status_code == 200

    client = Client()  # a new browser: no cookies or flash messages from alice's session
    client.force_login(other_team_user)
    for url in (reverse("job_detail", args=[job.pk]), reverse("job_live", args=[job.pk]),
                reverse("artifact_download", args=[artifact.pk])):
        assert client.get(url).status_code == 404, url
    assert client.post(reverse("job_cancel", args=[job.pk])).status_code == 404
    assert Job.objects.get().status == "queued"
    assert "first" not in client.get(reverse("job_list")).content.decode()


@pytest.mark.parametrize(
    "settings_, expected_method",
    [
        ({"method": "dora", "r": 4}, {"type": "dora", "r": 4, "target_modules": "attention_qv"}),
        ({"method": "qlora", "bits": 8}, {"type": "qlora", "bits": 8, "quant_type": "nf4", "double_quant": False}),
        ({"method": "ia3", "target_preset": "attention_qv"}, {"type": "ia3", "target_modules": "default"}),
        ({"method": "ia3", "target_preset": "custom", "custom_targets": "k_proj, v_proj"},
         {"type": "ia3", "target_modules": ["k_proj", "v_proj"]}),
        ({"method": "adapter", "placement": "parallel", "bottleneck_size": 32, "activation": "silu"},
         {"type": "adapter", "placement": "parallel", "bottleneck_size": 32, "activation": "silu"}),
        ({"method": "prompt", "num_virtual_tokens": 8, "init_text": "Reverse the word"},
         {"type": "prompt", "num_virtual_tokens": 8, "init_text": "Reverse the word"}),
        ({"method": "prefix", "num_virtual_tokens": 4}, {"type": "prefix", "num_virtual_tokens": 4}),
        ({"method": "full"}, {"type": "full"}),
    ],
)
def test_each_method_is_submitted_with_its_own_settings(client, team_user, form_data, settings_, expected_method):
    client.force_login(team_user)
    response = submit(client, form_data | settings_)
    assert response.status_code == 302, response.context["form"].errors
    method = Job.objects.get().spec["method"]
    assert method.items() >= expected_method.items()
    # Settings of the other methods do not leak into this one's section.
    assert set(method) <= {"type", *type_fields(expected_method["type"])}


def type_fields(method_type):
    from jobs.spec import JobSpec

    spec = JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": {"type": method_type}})
    return set(spec.method.model_dump())


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"target_preset": "custom", "custom_targets": "q_proj, query_proj"}, "custom_targets",
         "query_proj not found in tiny-random-llama; its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ({"method": "adapter", "bottleneck_size": 512}, "bottleneck_size",
         "bottleneck_size 512 is larger than tiny-random-llama's hidden size 256"),
        ({"method": "adapter", "export_merged": "on"}, "export_merged", "cannot fold into the base weights"),
        ({"method": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens", "greater than or equal to 1"),
    ],
)
def test_a_method_that_does_not_fit_the_model_is_refused_with_the_reason(client, team_user, form_data, change, field, message):
    client.force_login(team_user)
    response = submit(client, form_data | change)
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not Job.objects.exists()
