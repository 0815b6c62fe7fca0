"""What a job offers for download besides its adapter: metrics, the trainer's log, checkpoints, and the model card."""

import csv
import io

import pytest
from django.core.files.base import ContentFile

from jobs import lifecycle
from jobs.model_card import model_card
from jobs.models import Checkpoint, Metric, Worker
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset


@pytest.fixture
def finished_job(team_user, catalogue, data_dirs, django_capture_on_commit_callbacks):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4)
    spec = JobSpec(base_model="tiny-random-llama", dataset=dataset.pk, method={"type": "lora", "r": 4})
    with django_capture_on_commit_callbacks(execute=False):
        job = submit_job(team, team_user, spec, name="arith")
    job = lifecycle.claim(job.pk, Worker.objects.create(hostname="w@h"))
    Metric.objects.bulk_create(
        [Metric(job=job, step=step, train_loss=2.0 / step, tokens_seen=10 * step) for step in (1, 2, 3)]
        + [Metric(job=job, step=3, eval_loss=1.5)]
    )
    checkpoint = Checkpoint(job=job, step=2, path="checkpoints/step-000002", size=3)
    checkpoint.file.save("checkpoint.zip", ContentFile(b"zip"), save=True)
    job.log_file.save("trainer.log", ContentFile(b"=== run on w@h ===\nloss went down\n"), save=False)
    job.step, job.train_loss, job.eval_loss, job.trainable_params = 3, 0.67, 1.5, 4096
    job.save()
    return lifecycle.transition(job, "succeeded", "done")


def test_the_job_page_offers_metrics_log_and_checkpoints(client, team_user, finished_job):
    client.force_login(team_user)
    page = client.get(f"/jobs/{finished_job.pk}/").content.decode()
    assert "Metrics (CSV)" in page and "Training log" in page and "Checkpoint at step 2" in page

    metrics = client.get(f"/jobs/{finished_job.pk}/metrics.csv")
    assert 'filename="arith-metrics.csv"' in metrics["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(metrics.content.decode())))
    assert [(row["step"], row["train_loss"], row["eval_loss"]) for row in rows] == [
        ("1", "2.0", ""), ("2", "1.0", ""), ("3", "0.6666666666666666", ""), ("3", "", "1.5")
    ]

    log = client.get(f"/jobs/{finished_job.pk}/log/")
    assert b"".join(log.streaming_content) == b"=== run on w@h ===\nloss went down\n"
    checkpoint = client.get(f"/checkpoints/{finished_job.checkpoints.get().pk}/download/")
    assert 'filename="arith-checkpoint-step-2.zip"' in checkpoint["Content-Disposition"]


def test_a_checkpoint_whose_file_was_let_go_is_not_offered(client, team_user, finished_job):
    client.force_login(team_user)
    Checkpoint.objects.update(file="")
    assert "Checkpoint at step" not in client.get(f"/jobs/{finished_job.pk}/").content.decode()
    assert client.get(f"/checkpoints/{finished_job.checkpoints.get().pk}/download/").status_code == 404


def test_the_model_card_says_what_the_adapter_is_how_it_did_and_how_to_load_it(finished_job):
    card = model_card(finished_job, "adapter")
    assert card.startswith("# arith: LoRA of tiny-random-llama")
    assert "| train loss (mean of the last steps) | 0.67 |" in card and "| trainable parameters | 4,096 |" in card
    assert 'PeftModel.from_pretrained(base, "path/to/this/directory")' in card
    assert '"r": 4' in card  # the spec

    merged = model_card(finished_job, "merged")
    assert "AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\")" in merged and "PeftModel" not in merged
    with_own_readme = model_card(finished_job, "adapter", method_readme="## TuneDeck's loader\n")
    assert "## TuneDeck's loader" in with_own_readme
