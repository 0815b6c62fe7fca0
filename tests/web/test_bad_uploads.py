"""Bad dataset files through every upload route get a clear answer, never a server error.

The datasets page, POST /api/datasets and POST /v1/files each take hypothesis-made files: random
bytes, UTF-8 cut in the middle of a character, lines beyond the line limit, JSON nested past any
sense, fields of the wrong type, CSV full of quotes and NULs, empty files, files over the size limit,
archives. Each answer is either the dataset kept and marked invalid with its problems listed (by line
where the problem is on one), or a 4xx that names the problem. A server error would raise here: the
test client re-raises what the view raised.
"""

import io
import json
import re
import zipfile

import pytest
from django.test import Client
from django.urls import reverse
from hypothesis import given
from hypothesis import strategies as st

from jobs.models import ApiToken
from tests.web.fuzzing import ROUTES, fuzz, json_values, upload_through

# Small limits, so that the files over them stay small and quick.
MAX_BYTES = 20_000
MAX_LINE_CHARS = 1_000
CONTAINERS = (".jsonl", ".json", ".csv", ".tsv", ".txt", "")
GOOD_ROW = {"prompt": "2+2=", "completion": "4"}


class Case:
    def __init__(self, filename, data, expected=()):
        self.filename, self.data = filename, data
        # (line or None, words): what the user must read about the file, in a problem on that line.
        self.expected = expected

    def __repr__(self):  # a failing example's file may be 40 kB: its start says enough
        return f"Case({self.filename!r}, {len(self.data)} bytes: {self.data[:120]!r}…, expected={self.expected})"


def jsonl(rows):
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode()


@st.composite
def random_bytes(draw):
    return Case("data" + draw(st.sampled_from(CONTAINERS)), draw(st.binary(max_size=3000)))


@st.composite
def truncated_utf8(draw):
    rows = [{"prompt": draw(st.text(min_size=1, max_size=30)), "completion": "déjà vu ✓ 完成"} for _ in range(3)]
    data = jsonl(rows)
    return Case("cut.jsonl", data[: draw(st.integers(1, len(data) - 1))])


@st.composite
def huge_line(draw):
    """Good rows with one line beyond the line limit, in JSON Lines or CSV."""
    position = draw(st.integers(1, 4))
    length = draw(st.integers(MAX_LINE_CHARS + 1, 3 * MAX_LINE_CHARS))
    if draw(st.booleans()):
        rows = [GOOD_ROW] * 4
        rows[position - 1] = {"prompt": "x" * length, "completion": "y"}
        return Case("long.jsonl", jsonl(rows), [(position, f"characters long; the limit is {MAX_LINE_CHARS}")])
    lines = ["text,label", "good,1", "fine,0", "ok,1", "bad,0"]
    lines[position] = "x" * length + ",1"
    return Case("long.csv", "\n".join(lines).encode(), [(position + 1, "characters long")])


@st.composite
def deep_nesting(draw):
    if draw(st.booleans()):
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
        depth = draw(st.integers(33, (MAX_LINE_CHARS - 60) // len(opening + closing)))
        nested = opening * depth + "1" + closing * depth
        # Within the line limit: json.loads reads it, and the row is refused as junk.
        position = draw(st.integers(1, 3))
        rows = [GOOD_ROW] * 3
        rows[position - 1] = '{"prompt": "a", "completion": "b", "extra": ' + nested + "}"
        return Case("deep.jsonl", jsonl(rows), [(position, "nested")])
    # A JSON array nested well past Python's recursion limit (1000; hypothesis raises it while it runs),
    # and still within the size limit.
    depth = draw(st.integers(5_000, MAX_BYTES // 2))
    return Case("deep.json", b"[" * depth + b"]" * depth, [(None, "nested too deeply")])


@st.composite
def wrong_types(draw):
    position = draw(st.integers(1, 3))
    rows = [dict(GOOD_ROW) for _ in range(3)]
    if draw(st.booleans()):
        name = draw(st.sampled_from(["prompt", "completion"]))
        rows[position - 1][name] = draw(json_values.filter(lambda value: not isinstance(value, str)))
    else:
        rows = [{"text": "good film", "label": "pos"}, {"text": "dull", "label": "neg"}, {"text": "ok", "label": 1}]
        name = "label"
        # A label is a string or an integer; a boolean is no label, though Python counts it as an int.
        rows[position - 1][name] = draw(
            json_values.filter(lambda value: isinstance(value, bool) or not isinstance(value, (str, int))))
    return Case("types.jsonl", jsonl(rows), [(position, f'field "{name}"')])


@st.composite
def csv_with_quotes_and_nuls(draw):
    body = draw(st.text(alphabet='",\n\r\t\x00ab1 ', max_size=300))
    data = ("text,label\n" + body).encode()
    return Case("quotes" + draw(st.sampled_from([".csv", ".tsv"])), data, [(None, "NUL")] if "\x00" in body else [])


@st.composite
def empty_file(draw):
    return Case("empty" + draw(st.sampled_from(CONTAINERS)), draw(st.sampled_from([b"", b"\n", b" \r\n\t \n"])),
                [(None, "empty")])


@st.composite
def over_the_size_limit(draw):
    size = draw(st.integers(MAX_BYTES + 1, 2 * MAX_BYTES))
    return Case("big.jsonl", (json.dumps(GOOD_ROW) + "\n").encode() * (size // 36 + 1),
                [(None, f"the limit is {MAX_BYTES:,}")])


@st.composite
def archive(draw):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train.jsonl", jsonl([GOOD_ROW] * 4))
    return Case("train" + draw(st.sampled_from([".zip", ".jsonl"])), buffer.getvalue(), [(None, "zip archive")])


bad_uploads = st.one_of(
    random_bytes(), truncated_utf8(), huge_line(), deep_nesting(), wrong_types(), csv_with_quotes_and_nuls(),
    empty_file(), over_the_size_limit(), archive(),
)


@pytest.fixture
def clients(team_user, data_dirs, settings):
    settings.DATASET_MAX_BYTES = MAX_BYTES
    settings.DATASET_MAX_LINE_CHARS = MAX_LINE_CHARS
    browser = Client()
    browser.force_login(team_user)
    _, token = ApiToken.issue(team_user, "fuzz")
    return {"page": browser, "api": Client(HTTP_AUTHORIZATION=f"Bearer {token}")}


@pytest.mark.parametrize("route", ROUTES)
@fuzz
@given(case=bad_uploads)
def test_a_bad_upload_is_kept_as_invalid_with_its_problems_or_refused_naming_the_problem(route, clients, case):
    dataset, reads = upload_through(route, clients, case.filename, case.data)
    if dataset is not None and not dataset.is_valid:
        assert dataset.problem_count >= 1 and dataset.problems
        first = dataset.problems[0]
        assert first["message"] in reads  # the problems are on the page or in the answer, not only in the row
    for line, words in case.expected:
        assert dataset is None or not dataset.is_valid, f"{case.filename} was taken as valid"
        where = rf"line {line}: [^\n]*" if line else ""
        assert re.search(where + re.escape(words), reads), f"expected {words!r} (line {line}) in:\n{reads}"


@pytest.mark.parametrize("route", ROUTES)
def test_the_server_keeps_answering_after_bad_uploads(route, clients):
    for filename, data in [("nul.csv", b"text,label\n\x00"), ("deep.json", b"[" * 9_000), ("z.zip", b"PK\x03\x04"),
                           ("types.jsonl", b'{"prompt": 1, "completion": 2}\n'), ("bytes.jsonl", b"\xff\xfe\x00")]:
        upload_through(route, clients, filename, data)
    dataset, _ = upload_through(route, clients, "good.jsonl", jsonl([GOOD_ROW] * 3))
    assert dataset.is_valid and dataset.rows == 3
    assert clients["page"].get(reverse("dataset_list")).status_code == 200
