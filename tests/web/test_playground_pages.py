"""The playground's pages without an inference worker: picking jobs, who may see what, and the form's checks.

Answers from a real inference worker are in tests/integration/test_playground.py and the browser test.
"""

import re
import uuid

import pytest
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse

from jobs import lifecycle
from jobs.models import Artifact
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset
from tests.conftest import wait_for


@pytest.fixture
def make_job(team_user, catalogue, data_dirs, django_capture_on_commit_callbacks):
    """make_job(name, base="llama", status="succeeded") -> a job of alice's team (its adapter a stand-in: nothing runs it here)."""
    team = team_user.memberships.get().team
    datasets = {
        "llama": store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4),
        "minilm": store_dataset(team, team_user, "c.csv", b"text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n"),
    }

    def make(name, base="llama", status="succeeded"):
        spec = JobSpec(base_model=catalogue[base].name, dataset=datasets[base].pk, task=catalogue[base].task)
        with django_capture_on_commit_callbacks(execute=False):
            job = submit_job(team, team_user, spec, name=name)
        if status != "queued":
            job = lifecycle.transition(job, "running", "started by the test")
        if status == "succeeded":
            Artifact(job=job, kind="adapter", size=3, sha256="0" * 64).file.save("adapter.zip", ContentFile(b"zip"))
            job = lifecycle.transition(job, "succeeded", "finished in the test")
        return job

    return make


@pytest.fixture
def alice(team_user):
    client = Client()
    client.force_login(team_user)
    return client


def playground_of(*jobs):
    return reverse("playground") + "?jobs=" + ",".join(str(job.pk) for job in jobs)


def test_the_playground_lists_finished_jobs_by_base_model_to_pick_from(alice, make_job):
    make_job("reverse-words")
    make_job("sentiment", base="minilm")
    make_job("still-training", status="running")
    page = alice.get(reverse("playground")).content.decode()
    assert "tiny-random-llama" in page and "all-MiniLM-L6-v2" in page
    assert "reverse-words" in page and "sentiment" in page
    assert "still-training" not in page


def test_a_finished_jobs_page_links_to_the_playground(alice, make_job):
    done, running = make_job("done"), make_job("running", status="running")
    assert f'href="{playground_of(done)}"' in alice.get(reverse("job_detail", args=[done.pk])).content.decode()
    assert "Try it in the playground" not in alice.get(reverse("job_detail", args=[running.pk])).content.decode()


def test_the_form_shows_the_jobs_and_offers_the_others_of_the_same_base(alice, make_job):
    first, second, other_base = make_job("first"), make_job("second"), make_job("sentiment", base="minilm")
    page = alice.get(playground_of(first)).content.decode()
    assert 'name="prompt"' in page and 'name="temperature"' in page and 'name="max_new_tokens"' in page
    assert f'href="{playground_of(first, second)}"' in page  # "+ second"
    assert f"{other_base.pk}" not in page.split("Add a finished job")[1].split("</p>")[0]
    classifier_page = alice.get(playground_of(other_base)).content.decode()
    assert 'name="text"' in classifier_page and 'name="prompt"' not in classifier_page


def test_jobs_of_different_base_models_are_refused_with_the_reason(alice, make_job):
    llama, minilm = make_job("reverse-words"), make_job("sentiment", base="minilm")
    page = alice.get(playground_of(llama, minilm)).content.decode()
    assert "These jobs do not share a base model" in page
    assert "reverse-words on tiny-random-llama; sentiment on all-MiniLM-L6-v2" in page
    assert 'name="prompt"' not in page


def test_an_unfinished_job_is_refused_with_the_reason(alice, make_job):
    page = alice.get(playground_of(make_job("halfway", status="running"))).content.decode()
    assert "halfway has not finished (running)" in page


def test_another_teams_job_is_a_404(make_job, other_team_user):
    job = make_job("alices")
    bob = Client()
    bob.force_login(other_team_user)
    assert bob.get(playground_of(job)).status_code == 404
    assert bob.post(playground_of(job), {"prompt": "hi", "temperature": 0, "max_new_tokens": 8, "seed": 0}).status_code == 404
    assert bob.get(reverse("playground") + "?jobs=abc").status_code == 404


def test_answers_are_only_readable_by_whoever_asked(alice, other_team_user):
    # A request id that is not in your session is no request of yours, whoever made it.
    bob = Client()
    bob.force_login(other_team_user)
    assert bob.get(reverse("playground_answers", args=[uuid.uuid4()])).status_code == 404
    assert alice.get(reverse("playground_answers", args=[uuid.uuid4()])).status_code == 404


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": ""}, "Prompt: type a prompt for the models to continue."),
        ({"prompt": "  \r\n "}, "Prompt: type a prompt for the models to continue."),
        ({"max_new_tokens": 0}, "Max new tokens must be a whole number from 1 to 512."),
        ({"max_new_tokens": 513}, "Max new tokens must be a whole number from 1 to 512."),
        ({"max_new_tokens": "lots"}, "Max new tokens must be a whole number from 1 to 512."),
        ({"temperature": -0.1}, "Temperature must be a number from 0 (greedy) to 2."),
        ({"temperature": 2.5}, "Temperature must be a number from 0 (greedy) to 2."),
    ],
)
def test_bad_input_is_a_form_error_naming_the_field(alice, make_job, change, message):
    job = make_job("reverse-words")
    data = {"prompt": "upper: abc\n", "temperature": 0, "max_new_tokens": 16, "seed": 0} | change
    # With htmx (as the page sends it) and without: the form comes back with the error, nothing is queued.
    for headers in ({"HTTP_HX_REQUEST": "true"}, {}):
        response = alice.post(playground_of(job), data, **headers)
        assert response.status_code == 200
        assert message in response.content.decode()
        assert "playground-answers" not in response.content.decode()
    assert "playground_requests" not in alice.session


def test_an_empty_text_to_classify_is_a_form_error(alice, make_job):
    response = alice.post(playground_of(make_job("sentiment", base="minilm")), {"text": ""})
    assert "Text: type a text for the classifiers to label." in response.content.decode()


def test_without_an_inference_worker_the_page_says_so_instead_of_waiting_forever(alice, make_job, celery_results, settings):
    settings.INFERENCE_WAIT_SECONDS = 2
    response = alice.post(playground_of(make_job("lonely")), {"prompt": "upper: abc\n", "temperature": 0,
                                                              "max_new_tokens": 8, "seed": 0}, HTTP_HX_REQUEST="true")
    answers_url = re.search(r'hx-get="(/playground/answers/[^"]+)"', response.content.decode()).group(1)
    assert "Waiting for an inference worker" in alice.get(answers_url).content.decode()
    fragment = wait_for(lambda: (page := alice.get(answers_url).content.decode()) and "hx-get" not in page and page,
                        10, "the page to give up waiting")
    assert "No inference worker took this request within 2 s" in fragment
    assert "celery -A webapp worker -Q inference --pool solo" in fragment
