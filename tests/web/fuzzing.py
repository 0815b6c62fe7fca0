"""What the fuzz tests share: the hypothesis profile, and requests made the way a browser or client makes them.

The profile keeps the fuzz tests within a minute on a small machine; raise the examples through
HYPOTHESIS_MAX_EXAMPLES for a longer hunt (`HYPOTHESIS_MAX_EXAMPLES=2000 pytest tests/web/test_bad_uploads.py`).
"""

import html
import os
import re

from django.urls import reverse
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from jobs.models import Dataset

ROUTES = ("page", "api", "v1")

settings.register_profile(
    "tunedeck-fuzz",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 60)),
    # A request writes a file and a row; on a busy machine one may take a second or two.
    deadline=5000,
    # The database and the logged-in clients are made once per test, and every example may use them:
    # each one's rows are only added to, and what a test checks is the answer to its own request.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    # Nothing written into the checkout; a failure prints the example (and a blob to replay it).
    database=None,
    print_blob=True,
)
fuzz = settings.get_profile("tunedeck-fuzz")

# Any JSON value, nested a little.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def multipart(filename, data, **fields):
    """A multipart/form-data body with the file name exactly as given.

    Django's test client would send only the base name of a file; a hostile client sends what it likes.
    """
    boundary = "tunedeck-boundary-7f3a"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode("utf-8", "surrogatepass") + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def page_text(markup):
    """HTML as its reader sees it: the text, without tags or entities."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def problems_as_read(problems):
    return "\n".join(f"line {problem['line']}: {problem['message']}" if problem["line"] else problem["message"]
                     for problem in problems)


def upload_through(route, clients, filename, data):
    """Upload through `route` ("page", "api" or "v1"; `clients` holds a logged-in "page" client and a token's
    "api" client); return the dataset kept (or None when refused) and what its user reads about it."""
    body, content_type = multipart(filename, data, **({"purpose": "fine-tune"} if route == "v1" else {}))
    if route == "page":
        response = clients["page"].post(reverse("dataset_list"), body, content_type=content_type)
        if response.status_code == 200:  # the form again, saying what is wrong with the file
            errors = re.findall(r'<ul class="errorlist[^>]*>(.*?)</ul>', response.content.decode(), re.S)
            assert errors, "the form came back without saying why"
            return None, page_text(" ".join(errors))
        assert response.status_code == 302, response.status_code
        detail = clients["page"].get(response["Location"])
        dataset = Dataset.objects.get(pk=int(response["Location"].strip("/").split("/")[-1]))
        return dataset, page_text(detail.content.decode())
    if route == "api":
        response = clients["api"].post("/api/datasets", body, content_type=content_type)
        if response.status_code == 422:
            errors = response.json()["detail"]
            assert [error["loc"][-1] for error in errors] == ["file"], errors
            return None, " ".join(error["msg"] for error in errors)
        assert response.status_code == 201, (response.status_code, response.content)
        answer = response.json()
        assert answer["is_valid"] == (answer["problem_count"] == 0)
        return Dataset.objects.get(pk=answer["id"]), problems_as_read(answer["problems"])
    response = clients["api"].post("/v1/files", body, content_type=content_type)
    if response.status_code == 200:
        return Dataset.objects.get(pk=int(response.json()["id"].removeprefix("file-"))), ""
    error = response.json()["error"]
    assert error["param"] == "file", error
    if response.status_code == 413 or error["code"] == "missing_file":
        return None, error["message"]
    assert response.status_code == 400 and error["code"] == "invalid_file", (response.status_code, error)
    kept = re.search(r"kept as file-(\d+)", error["message"])
    return Dataset.objects.get(pk=int(kept.group(1))), error["message"]
