"""Dataset validation on good and bad files: each message a user would read is checked."""

import io
import json
import zipfile

import pytest

from jobs import datasets

def jsonl(*rows):
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode()


def messages(report):
    return [str(problem) for problem in report.problems]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "chat"),
        ({"text": "plain text to continue"}, "text"),
        ({"text": "great film", "label": "pos"}, "classification"),
    ],
)
def test_each_format_is_detected(row, fmt):
    other = dict(row, label="neg") if fmt == "classification" else row
    report = datasets.validate(jsonl(row, other), "data.jsonl")
    assert report.format == fmt
    assert report.is_valid, messages(report)
    assert report.rows == 2
    assert report.preview[0] == row


def test_bad_lines_are_reported_with_their_numbers():
    data = jsonl(
        {"prompt": "a", "completion": "b"},
        "{not json",
        {"prompt": "c"},
        "[1, 2]",
        {"prompt": "d", "completion": 5},
        {"prompt": "e", "completion": "f"},
    )
    report = datasets.validate(data, "data.jsonl")
    assert report.format == "prompt_completion"
    assert report.rows == 2
    assert messages(report) == [
        "line 2: not valid JSON: Expecting property name enclosed in double quotes",
        'line 3: missing field "completion"',
        "line 4: expected a JSON object, got list",
        'line 5: field "completion" must be a string, got int',
    ]
    assert not report.is_valid


def test_only_the_first_twenty_problems_are_kept_but_all_are_counted():
    data = jsonl({"prompt": "a", "completion": "b"}, *["oops"] * 30)
    report = datasets.validate(data, "data.jsonl")
    assert report.problem_count == 30
    assert len(report.problems) == datasets.MAX_ERRORS_SHOWN
    assert str(report.problems[0]).startswith("line 2: not valid JSON")


def test_empty_file():
    assert messages(datasets.validate(b"  \n\n", "data.jsonl")) == ["the file is empty"]


def test_wrong_encoding_names_the_line():
    data = b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n'
    assert messages(datasets.validate(data, "data.jsonl")) == [
        "line 2: the file is not UTF-8 text (invalid byte 0xe9 at byte 42)"
    ]


def test_size_limit():
    report = datasets.validate(b'{"text": "x"}\n' * 10, "d.jsonl", limits=datasets.Limits(max_bytes=50))
    assert messages(report) == ["the file is 140 bytes; the limit is 50"]


def test_unrecognised_fields_say_what_was_expected():
    (message,) = messages(datasets.validate(jsonl({"question": "q", "answer": "a"}), "d.jsonl"))
    assert message.startswith("line 1: cannot tell the format from the fields ['answer', 'question']; expected one of:")
    assert '{"prompt": ..., "completion": ...}' in message


def test_chat_rows_need_roles_and_an_assistant_turn():
    report = datasets.validate(
        jsonl(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
            {"messages": []},
        ),
        "chat.jsonl",
    )
    assert messages(report) == [
        "line 2: no assistant message to learn from",
        "line 3: message 1: role must be one of system, user, assistant, got 'robot'",
        'line 4: field "messages" must be a non-empty list of {"role", "content"} objects',
    ]


def test_classification_csv_with_stats_and_a_single_label_problem():
    report = datasets.validate(b"text,label\ngood,1\nbad,0\nfine,1\n", "reviews.csv")
    assert report.is_valid
    assert report.stats["labels"] == {"0": 1, "1": 2}
    assert report.stats["length_chars"] == {"min": 3, "median": 4, "p95": 4, "max": 4}
    one_label = datasets.validate(b"text,label\ngood,1\nfine,1\n", "reviews.csv")
    assert messages(one_label) == ["classification needs at least two different labels"]


def test_csv_row_with_too_many_cells_and_missing_label():
    report = datasets.validate(b'text,label\ngood,1\n"a, b",0,extra\nmeh,\nok,0\n', "r.csv")
    assert messages(report) == [
        "line 3: more cells than there are columns in the header",
        'line 4: missing field "label"',
    ]


def test_json_array_must_hold_objects():
    report = datasets.validate(b'[{"text": "a"}, 3]', "d.json")
    assert messages(report) == ["line 2: item 2 of the array is int, not an object"]
    assert messages(datasets.validate(b'{"text": "a"}', "d.json")) == [
        "line 1: a .json file must hold an array of objects (or upload JSON Lines as .jsonl)"
    ]


def test_sst2_dev_tsv_with_mapped_text_column(shared_data):
    data = (shared_data / "sst2" / "dev.tsv").read_bytes()
    unmapped = datasets.validate(data, "dev.tsv")
    assert "cannot tell the format from the fields ['content', 'label']" in messages(unmapped)[0]
    report = datasets.validate(data, "dev.tsv", column_map={"text": "content"})
    assert report.format == "classification"
    assert report.rows == 436
    assert set(report.stats["labels"]) == {"0", "1"}


def test_alpaca_json_array_as_users_upload_it(shared_data):
    report = datasets.validate((shared_data / "alpaca" / "alpaca_subset.json").read_bytes(), "alpaca.json")
    assert (report.format, report.rows, report.problem_count) == ("alpaca", 102, 0)


def test_load_examples_masks_prompts(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl({"instruction": "Add", "input": "1 2", "output": "3"}))
    (example,) = datasets.load_examples(path, "alpaca")
    assert example == [("### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n", False), ("3", True)]


def test_load_examples_refuses_a_file_with_problems(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl({"prompt": "a", "completion": "b"}, {"prompt": "c"}))
    with pytest.raises(datasets.DatasetError, match='line 2: missing field "completion"'):
        datasets.load_examples(path, "prompt_completion")


# Inputs that once raised instead of being reported (found by tests/web/test_bad_uploads.py).

def test_a_number_too_long_for_python_is_a_problem_on_its_line():
    report = datasets.validate(jsonl({"text": "a"}, '{"text": "b", "label": ' + "9" * 5000 + "}"), "data.jsonl")
    assert messages(report) == ["line 2: not valid JSON: Exceeds the limit (4300 digits) for integer string conversion: "
                                "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"]


def test_text_no_database_or_tokenizer_takes_is_a_problem_naming_the_field():
    report = datasets.validate(jsonl(
        {"prompt": "a", "completion": "b"},
        '{"prompt": "nul \\u0000", "completion": "b"}',
        '{"prompt": "a", "completion": "lone \\ud800"}',
        '{"prompt": "a", "completion": "b", "meta": {"\\u0000": 1}}',
    ), "data.jsonl")
    assert messages(report) == [
        'line 2: field "prompt" contains a NUL character',
        'line 3: field "completion" is not valid Unicode (it holds a lone surrogate, such as the escape \\ud800)',
        'line 4: field "meta" holds a key that contains a NUL character',
    ]


def test_rows_nested_past_sense_are_refused_and_past_the_parser_too():
    deep = "[" * 40 + "]" * 40
    report = datasets.validate(jsonl({"text": "a", "extra": json.loads(deep)}), "data.jsonl")
    assert messages(report) == ['line 1: field "extra" is nested more than 32 levels deep']
    assert messages(datasets.validate(b"[" * 100_000 + b"]" * 100_000, "data.json")) == ["not valid JSON: nested too deeply"]


def test_a_csv_field_longer_than_the_csv_modules_own_cap_is_read_up_to_the_line_limit():
    text = "x" * 150_000  # the csv module refuses fields over 131072 characters by default
    report = datasets.validate(f"text,label\n{text},a\nshort,b\n".encode(), "data.csv", limits=datasets.Limits())
    assert report.is_valid and report.rows == 2
    report = datasets.validate(f"text,label\n{text},a\nshort,b\n".encode(), "data.csv",
                               limits=datasets.Limits(max_line_chars=100_000))
    assert messages(report) == ["line 2: line is 150002 characters long; the limit is 100000"]


def test_json_lines_split_on_newlines_only():
    # U+2028 and U+0085 may stand unescaped in a JSON string; splitlines() would cut the row in two.
    report = datasets.validate(jsonl({"text": "a"}).replace(b'"a"', '"a\u2028b\x85c"'.encode()) + b"\n" + jsonl("oops"),
                               "data.jsonl")
    assert report.rows == 1 and messages(report) == ["line 2: not valid JSON: Expecting value"]


def test_an_archive_is_refused_with_what_to_upload_instead():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train.jsonl", jsonl({"text": "a"}))
    assert messages(datasets.validate(buffer.getvalue(), "train.zip")) == [
        "the file is a zip archive; archives are not accepted: upload the .jsonl, .json, .csv or .tsv file itself"]
