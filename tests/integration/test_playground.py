"""The playground for real: the web app -> the `inference` queue on Redis -> an inference worker process.

The jobs are trained for real beforehand (the `finished_job` fixture runs the engine through the
worker's runner), and the inference worker is a `celery worker -Q inference --pool solo` process.
"""

import re

import pytest
from django.urls import reverse

from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ANSWER_TIMEOUT = 120
PROMPT = {"prompt": "upper: tunedeck\r\n", "temperature": 0, "max_new_tokens": 12, "seed": 0}


def ask(client, jobs, data=PROMPT):
    """Submit the form as the page does (htmx), then poll the answers fragment until it stops polling."""
    url = reverse("playground") + "?jobs=" + ",".join(str(job.pk) for job in jobs)
    response = client.post(url, data, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    answers_url = re.search(r'hx-get="(/playground/answers/[^"]+)"', response.content.decode()).group(1)

    def answered():
        fragment = client.get(answers_url).content.decode()
        return None if "hx-get" in fragment else fragment

    return wait_for(answered, ANSWER_TIMEOUT, "the answers", interval=1)


def readiness_notes(fragment):
    return re.findall(r'<span class="readiness readiness-(\w+)">([^<]*)</span>', fragment)


def test_a_base_model_and_two_adapters_answer_and_the_second_request_swaps(
    client, team_user, finished_job, inference_worker
):
    first_job, second_job = finished_job("upper-a", seed=1), finished_job("upper-b", seed=2)
    client.force_login(team_user)

    answers = ask(client, [first_job, second_job])
    assert answers.count('class="card answer') == 3, answers
    assert "tiny-random-llama" in answers and "upper-a" in answers and "upper-b" in answers
    notes = readiness_notes(answers)
    assert notes[0][0] == "load" and notes[0][1].startswith("loaded base model in")
    assert [kind for kind, _ in notes[1:]] == ["swap", "swap"]
    completions = re.findall(r'<pre class="completion">([^<]*)</pre>', answers)
    assert len(completions) == 3 and completions[1] != completions[0], "the adapter should answer differently"

    again = ask(client, [first_job, second_job])
    notes = readiness_notes(again)
    assert notes[0] == ("ready", "base model already loaded")
    assert [kind for kind, _ in notes[1:]] == ["swap", "swap"]  # set_adapter, from memory this time
    assert all("swapped to this adapter" in note for _, note in notes[1:])
    assert not any("loaded base model" in note for _, note in notes[1:])
    # Greedy and on the same models: the same answers again.
    assert re.findall(r'<pre class="completion">([^<]*)</pre>', again) == completions
    assert inference_worker.log().count("answer_in_playground") >= 4, "received and succeeded, twice"



def test_a_classifier_shows_the_label_and_probabilities_of_the_untrained_and_the_trained_head(
    client, team_user, finished_job, inference_worker
):
    job = finished_job("sentiment", base="minilm")
    client.force_login(team_user)
    answers = ask(client, [job], {"text": "the hotel was truly wonderful"})
    assert answers.count('class="card answer') == 2, answers
    assert "all-MiniLM-L6-v2" in answers and "sentiment" in answers
    predictions = re.findall(r'<p class="prediction">(\w+)</p>', answers)
    assert len(predictions) == 2 and set(predictions) <= {"negative", "positive"}
    assert predictions[1] == "positive", "40 steps on the reviews teach the obvious case"
    probabilities = [float(p) for p in re.findall(r'<td class="num">([\d.]+)</td>', answers)]
    assert len(probabilities) == 4
    assert sum(probabilities[:2]) == pytest.approx(1, abs=0.002) and sum(probabilities[2:]) == pytest.approx(1, abs=0.002)
    assert [kind for kind, _ in readiness_notes(answers)] == ["load", "swap"]
