"""Dataset validation on good and bad files: each message a user would read is checked."""

import json
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
