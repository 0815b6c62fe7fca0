"""Reading and validating dataset files.

Plain Python (no Django, no torch): the upload view validates with it and the
training engine reads training examples with it, so both agree on what a file
means. Every problem is reported with the line (or JSON array item) it is on.
"""

import csv
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

MAX_ERRORS_SHOWN = 20
PREVIEW_ROWS = 5
# A chat row nests four levels deep; far deeper is junk, and everything that later walks the row
# (the database's JSON, the page, the API's serializer) would have to survive it.
MAX_NESTING = 32
# How much of a value a problem message quotes: the message is stored and shown, the value may be huge.
QUOTED_CHARS = 60

# format name -> (kind, required fields, description)
FORMATS = {
    "prompt_completion": ("sft", ("prompt", "completion"), '{"prompt": ..., "completion": ...}'),
    "alpaca": ("sft", ("instruction", "output"), '{"instruction": ..., "input": ..., "output": ...}'),
    "chat": ("sft", ("messages",), '{"messages": [{"role": ..., "content": ...}, ...]}'),
    "text": ("sft", ("text",), '{"text": ...}'),
    "classification": ("classification", ("text", "label"), '{"text": ..., "label": ...} or CSV text,label'),
}
KIND_OF_TASK = {"causal_lm_sft": "sft", "sequence_classification": "classification"}
CHAT_ROLES = ("system", "user", "assistant")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DatasetError(ValueError):
    """A file that cannot be used, with the problems that say why."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems[:3]))


@dataclass
class Problem:
    line: int | None
    message: str

    def __str__(self):
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Limits:
    max_bytes: int = 100 * 1024 * 1024
    max_rows: int = 1_000_000
    max_line_chars: int = 1_000_000


@dataclass
class DatasetReport:
    format: str | None = None
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    stats: dict = field(default_factory=dict)
    preview: list[dict] = field(default_factory=list)

    @property
    def is_valid(self):
        return self.problem_count == 0 and self.rows > 0

    @property
    def kind(self):
        return FORMATS[self.format][0] if self.format else None

    def add_problem(self, line, message):
        self.problem_count += 1
        if len(self.problems) < MAX_ERRORS_SHOWN:
            self.problems.append(Problem(line, message))


def unstorable_text(text):
    """Why `text` cannot be kept, or None: PostgreSQL refuses NUL characters and lone surrogates
    (a JSON escape like \\ud800 decodes to one), and no tokenizer can encode a surrogate either."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate, such as the escape \\ud800)"
    return None


def quoted(value):
    shown = repr(value)
    return shown if len(shown) <= QUOTED_CHARS else shown[:QUOTED_CHARS] + "…"


def _row_problem(row):
    """What makes a parsed JSON row unfit to store or to train on, or None."""
    pending = [(row, 1, None)]
    # A loop, not recursion: the row may nest as deep as json.loads allows.
    while pending:
        value, depth, field_name = pending.pop()
        if depth > MAX_NESTING:
            return f'field "{field_name}" is nested more than {MAX_NESTING} levels deep'
        if isinstance(value, dict):
            for key, item in value.items():
                if problem := unstorable_text(key):
                    where = f'field "{field_name}" holds a key that' if field_name else f"the field name {quoted(key)}"
                    return f"{where} {problem}"
                pending.append((item, depth + 1, field_name or key[:QUOTED_CHARS]))
        elif isinstance(value, list):
            pending.extend((item, depth + 1, field_name) for item in value)
        elif isinstance(value, str) and (problem := unstorable_text(value)):
            return f'field "{field_name}" {problem}'
    return None


# The first bytes of the archives and compressed files people upload instead of the dataset itself.
ARCHIVE_SIGNATURES = {
    b"PK\x03\x04": "zip archive",
    b"PK\x05\x06": "zip archive",
    b"\x1f\x8b": "gzip file",
    b"BZh": "bzip2 file",
    b"\xfd7zXZ\x00": "xz file",
    b"(\xb5/\xfd": "zstd file",
    b"7z\xbc\xaf\x27\x1c": "7z archive",
    b"Rar!\x1a\x07": "rar archive",
}


def archive_kind(data):
    """What kind of archive `data` is, or None; a tar says so at byte 257."""
    if data[257:262] == b"ustar":
        return "tar archive"
    return next((kind for signature, kind in ARCHIVE_SIGNATURES.items() if data.startswith(signature)), None)


def container_of(filename):
    name = filename.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".json"):
        return "json"
    return "jsonl"


def _decode(data, report):
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        report.add_problem(line, f"the file is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at byte {exc.start})")
        return None


def _report_long_lines(lines, report, limits, first_line=1):
    """Report every line over the limit; return whether there was one."""
    long_lines = [
        (number, len(line)) for number, line in enumerate(lines, first_line) if len(line) > limits.max_line_chars
    ]
    for number, length in long_lines:
        report.add_problem(number, f"line is {length} characters long; the limit is {limits.max_line_chars}")
    return bool(long_lines)


def _read_rows(text, container, report, limits):
    """Yield (line number, row dict) for every row; report rows that are not objects."""
    if container in ("csv", "tsv"):
        if "\x00" in text:
            report.add_problem(text[: text.index("\x00")].count("\n") + 1, "the file contains a NUL character")
            return
        # A row cannot be skipped in CSV (a quote may run on over lines), so a line too long stops the file.
        if _report_long_lines(text.split("\n"), report, limits):
            return
        # The csv module has a process-wide cap on a field (128 KiB by default); ours is the line limit.
        csv.field_size_limit(max(csv.field_size_limit(), limits.max_line_chars))
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if container == "tsv" else ",")
        try:
            for row in reader:
                if None in row:
                    report.add_problem(reader.line_num, "more cells than there are columns in the header")
                    continue
                yield reader.line_num, row
        except csv.Error as exc:
            report.add_problem(reader.line_num, f"cannot read CSV: {exc}")
        return
    if container == "json":
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:
            report.add_problem(getattr(exc, "lineno", None), f"not valid JSON: {_json_error(exc)}")
            return
        if not isinstance(items, list):
            report.add_problem(1, "a .json file must hold an array of objects (or upload JSON Lines as .jsonl)")
            return
        for index, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                report.add_problem(index, f"item {index} of the array is {type(item).__name__}, not an object")
            elif problem := _row_problem(item):
                report.add_problem(index, problem)
            else:
                yield index, item
        return
    # JSON Lines are separated by "\n" only: splitlines() would also split inside a string holding
    # U+2028 or U+0085, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if _report_long_lines([line], report, limits, first_line=number):
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            report.add_problem(number, f"not valid JSON: {_json_error(exc)}")
            continue
        if not isinstance(row, dict):
            report.add_problem(number, f"expected a JSON object, got {type(row).__name__}")
            continue
        if problem := _row_problem(row):
            report.add_problem(number, problem)
            continue
        yield number, row


def _json_error(exc):
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    # JSONDecodeError says what and where; a plain ValueError is e.g. an integer of more than 4300 digits.
    return getattr(exc, "msg", str(exc))


def detect_format(row):
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _string_field(row, name, problems, allow_empty=False):
    value = row.get(name)
    if value is None:
        problems.append(f'missing field "{name}"')
    elif not isinstance(value, str):
        problems.append(f'field "{name}" must be a string, got {type(value).__name__}')
    elif not allow_empty and not value.strip():
        problems.append(f'field "{name}" is empty')
    return value if isinstance(value, str) else ""


def _check_chat(row, problems):
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append('field "messages" must be a non-empty list of {"role", "content"} objects')
        return []
    turns = []
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            problems.append(f"message {index} is not an object")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            problems.append(f'message {index}: role must be one of {", ".join(CHAT_ROLES)}, got {quoted(role)}')
        if not isinstance(content, str):
            problems.append(f'message {index}: "content" must be a string')
            continue
        turns.append((role, content))
    if turns and not any(role == "assistant" for role, _ in turns):
        problems.append("no assistant message to learn from")
    return turns


def normalize(row, fmt, column_map=None):
    """Check one row against a format; return (example, problems).

    An SFT example is a list of (text, trains_on) segments: the loss is taken
    only on segments marked True (the completion, the assistant turns).
    A classification example is (text, label as a string).
    """
    if column_map:
        row = {target: row.get(source) for target, source in column_map.items()} | {
            key: value for key, value in row.items() if key not in column_map.values()
        }
    problems = []
    if fmt == "prompt_completion":
        prompt = _string_field(row, "prompt", problems, allow_empty=True)
        completion = _string_field(row, "completion", problems)
        example = [(prompt, False), (completion, True)]
    elif fmt == "alpaca":
        instruction = _string_field(row, "instruction", problems)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            problems.append('field "input" must be a string')
            extra = ""
        output = _string_field(row, "output", problems)
        template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
        example = [(template.format(instruction=instruction, input=extra), False), (output, True)]
    elif fmt == "chat":
        example = []
        for role, content in _check_chat(row, problems):
            example.append((f"<|{role}|>\n", False))
            example.append((content + "\n", role == "assistant"))
    elif fmt == "text":
        example = [("", False), (_string_field(row, "text", problems), True)]
    elif fmt == "classification":
        text = _string_field(row, "text", problems)
        label = row.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            problems.append('missing field "label"')
        elif isinstance(label, bool) or not isinstance(label, (str, int)):
            problems.append(f'field "label" must be a string or an integer, got {type(label).__name__}')
        example = (text, str(label).strip() if label is not None else "")
    else:
        raise ValueError(f"unknown dataset format {fmt!r}")
    return example, problems


def _length_stats(lengths):
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
    }


def validate(data, filename, fmt=None, column_map=None, limits=None):
    """Validate an uploaded file; return a DatasetReport with every problem found."""
    limits = limits or Limits()
    report = DatasetReport(format=fmt)
    if fmt is not None and fmt not in FORMATS:
        report.add_problem(None, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return report
    if len(data) > limits.max_bytes:
        report.add_problem(None, f"the file is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
        return report
    if not data.strip():
        report.add_problem(None, "the file is empty")
        return report
    if kind := archive_kind(data):
        report.add_problem(None, f"the file is a {kind}; archives are not accepted: upload the .jsonl, .json, "
                                 ".csv or .tsv file itself")
        return report
    text = _decode(data, report)
    if text is None:
        return report

    lengths, labels = [], Counter()
    for line, row in _read_rows(text, container_of(filename), report, limits):
        if report.format is None:
            mapped = {target: row.get(source) for target, source in (column_map or {}).items()}
            report.format = detect_format(row | mapped)
            if report.format is None:
                expected = "; ".join(f"{name}: {shape}" for name, (_, _, shape) in FORMATS.items())
                fields = ", ".join(quoted(name) for name in sorted(row)[:10]) + (", …" if len(row) > 10 else "")
                report.add_problem(line, f"cannot tell the format from the fields [{fields}]; expected one of: {expected}")
                return report
        if report.rows >= limits.max_rows:
            report.add_problem(line, f"more than {limits.max_rows:,} rows; the limit is {limits.max_rows:,}")
            break
        example, problems = normalize(row, report.format, column_map)
        if problems:
            for message in problems:
                report.add_problem(line, message)
            continue
        report.rows += 1
        if report.format == "classification":
            lengths.append(len(example[0]))
            labels[example[1]] += 1
        else:
            lengths.append(sum(len(text) for text, _ in example))
        if len(report.preview) < PREVIEW_ROWS:
            report.preview.append({key: row[key] for key in list(row)[:6]})

    if report.rows == 0 and report.problem_count == 0:
        report.add_problem(None, "the file holds no rows")
    report.stats = {"rows": report.rows, "length_chars": _length_stats(lengths)}
    if report.format == "classification":
        report.stats["labels"] = dict(sorted(labels.items()))
        if report.rows and len(labels) < 2:
            report.add_problem(None, "classification needs at least two different labels")
    return report


def load_examples(path, fmt, column_map=None):
    """Read a validated dataset file into examples for training; raise DatasetError if it has problems."""
    with open(path, "rb") as file:
        data = file.read()
    report = DatasetReport(format=fmt)
    text = _decode(data, report)
    examples = []
    if text is not None:
        for line, row in _read_rows(text, container_of(str(path)), report, Limits()):
            example, problems = normalize(row, fmt, column_map)
            for message in problems:
                report.add_problem(line, message)
            if not problems:
                examples.append(example)
    if report.problem_count:
        raise DatasetError(report.problems)
    if not examples:
        raise DatasetError([Problem(None, "the dataset holds no rows")])
    return examples
