"""Invalid job specs through POST /api/jobs and POST /v1/fine_tuning/jobs: a 4xx naming the field, nothing queued.

Each example starts from a spec both APIs accept and breaks one field: a value of the wrong type,
a number out of its range, a string over its length, text with a NUL or a lone surrogate, a field
that does not exist, a method type that does not exist, or a section replaced by nested junk. The
fields and their ranges are read from the JobSpec models themselves, so a field added later is
fuzzed too.
"""

import json
import re
import string
import typing

import pytest
from django.test import Client
from hypothesis import given
from hypothesis import strategies as st

from jobs.models import ApiToken, BaseModel, Job
from jobs.spec import METHOD_LABELS, Hyperparameters, JobSpec
from jobs.uploads import store_dataset
from tests.web.fuzzing import fuzz, json_values

MODEL = "tiny-random-llama"
# Method type -> its config class, from the JobSpec's own union of methods.
METHOD_CONFIGS = {
    typing.get_args(member)[0].model_fields["type"].default: typing.get_args(member)[0]
    for member in typing.get_args(JobSpec.model_fields["method"].annotation)
}
# Sections of a spec, and the fields each breaks one at a time (the method's type and the sections are broken
# as wholes below).
SECTIONS = {
    "": JobSpec, "hyperparameters": Hyperparameters,
    **{f"method:{kind}": config for kind, config in METHOD_CONFIGS.items()},
}
NOT_FIELDS = {"method", "hyperparameters", "type"}
# Letters no number, boolean or method name is spelled with.
JUNK_LETTERS = "xqzwvk"
junk_words = st.text(alphabet=JUNK_LETTERS, min_size=1, max_size=12)
containers = st.lists(json_values, max_size=3) | st.dictionaries(st.text(max_size=5), json_values, max_size=3)
# OpenAI's names for what the /v1 body carries, where they are not the JobSpec's.
OPENAI_NAMES = {
    "base_model": "model", "dataset": "training_file", "validation_dataset": "validation_file",
    "method": "adapter", "hyperparameters": "extra_hyperparameters", "epochs": "n_epochs",
    "learning_rate": "learning_rate_multiplier",
}


def test_every_method_is_fuzzed():
    assert set(METHOD_CONFIGS) == set(METHOD_LABELS)


def base_spec(dataset_id, kind):
    return {"base_model": MODEL, "dataset": dataset_id, "method": {"type": kind}, "hyperparameters": {"max_steps": 5}}


def wrong_types(annotation):
    """Values that no lax conversion turns into a value of `annotation`."""
    types = set(typing.get_args(annotation)) | {annotation}
    if str in types or list[str] in types:
        return containers.filter(lambda value: not isinstance(value, list) or list[str] not in types) | st.integers()
    if typing.get_origin(annotation) is typing.Literal:
        return junk_words | containers | st.integers()
    if bool in types:
        return junk_words | containers | st.integers(min_value=2)
    if int in types:
        return junk_words | containers | st.floats(-1e6, 1e6).filter(lambda x: x != int(x))
    return junk_words | containers  # float


def out_of_range(info):
    """Numbers beyond a field's bounds, strings beyond its length; nothing when it has neither."""
    number = int if int in {info.annotation, *typing.get_args(info.annotation)} else float
    strategies = []
    for bound in info.metadata:
        if hasattr(bound, "max_length"):
            strategies.append(st.text(alphabet=string.ascii_letters, min_size=bound.max_length + 1,
                                      max_size=bound.max_length * 50))
        for name, below in (("ge", True), ("gt", True), ("le", False), ("lt", False)):
            if hasattr(bound, name):
                limit = getattr(bound, name)
                strict = name in ("ge", "le")  # the limit itself is allowed
                if number is int:
                    strategies.append(st.integers(max_value=limit - strict) if below else st.integers(min_value=limit + strict))
                else:
                    strategies.append(st.floats(max_value=limit, exclude_max=strict, allow_nan=False, allow_infinity=False)
                                      if below else
                                      st.floats(min_value=limit, exclude_min=strict, allow_nan=False, allow_infinity=False))
    return st.one_of(strategies) if strategies else None


def place(spec, section, field, value):
    if section.startswith("method:"):
        spec["method"] = {"type": section.split(":")[1], field: value}
        return f"method.{field}"
    if section:
        spec[section] = {field: value}
        return f"{section}.{field}"
    spec[field] = value
    return field


@st.composite
def broken_specs(draw):
    """(spec as a dict whose dataset is DATASET, dotted name of the field that must be named)."""
    spec = base_spec("DATASET", draw(st.sampled_from(list(METHOD_CONFIGS))))
    how = draw(st.sampled_from(["wrong type", "out of range", "unstorable text", "unknown field", "method type",
                                "nested junk"]))
    if how in ("wrong type", "out of range"):
        candidates = [
            (section, name, info) for section, model in SECTIONS.items() for name, info in model.model_fields.items()
            if name not in NOT_FIELDS and (how == "wrong type" or out_of_range(info) is not None)
        ]
        section, name, info = draw(st.sampled_from(candidates))
        value = draw(wrong_types(info.annotation) if how == "wrong type" else out_of_range(info))
        return spec, place(spec, section, name, value)
    if how == "unstorable text":
        # A NUL or a lone surrogate (JSON's "\\ud800"): no database column or tokenizer takes either.
        candidates = [
            (section, name, info) for section, model in SECTIONS.items() for name, info in model.model_fields.items()
            if {str, list[str]} & {info.annotation, *typing.get_args(info.annotation)}
        ]
        section, name, info = draw(st.sampled_from(candidates))
        text = draw(st.text(alphabet=string.ascii_letters, max_size=5)) + draw(st.sampled_from(["\x00", "\ud800"]))
        wants_list = str not in {info.annotation, *typing.get_args(info.annotation)}
        return spec, place(spec, section, name, [text] if wants_list else text)
    if how == "unknown field":
        section = draw(st.sampled_from(list(SECTIONS)))
        name = draw(junk_words.filter(lambda word: word not in SECTIONS[section].model_fields))
        return spec, place(spec, section, name, draw(json_values))
    if how == "method type":
        spec["method"] = {"type": draw(junk_words | st.integers() | containers)}
        return spec, "method"
    section = draw(st.sampled_from(["method", "hyperparameters"]))
    junk = draw(json_values)
    for in_a_list in draw(st.lists(st.booleans(), min_size=2, max_size=60)):
        junk = [junk] if in_a_list else {"junk": junk}
    spec[section] = junk
    return spec, section


@pytest.fixture
def setup(team_user, data_dirs):
    team = team_user.memberships.get().team
    # A catalogue entry without recorded shapes: every method fits it, so only the broken field can fail.
    BaseModel.objects.create(name=MODEL, path="/models/tiny-random-llama", task="causal_lm_sft", architecture="llama")
    dataset = store_dataset(team, team_user, "qa.jsonl", b'{"prompt": "2+2=", "completion": "4"}\n' * 4)
    _, token = ApiToken.issue(team_user, "fuzz")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}"), dataset.pk


def with_dataset(spec, dataset_id):
    return json.loads(json.dumps(spec).replace('"DATASET"', str(dataset_id)))


def openai_body(spec):
    """The same job as a /v1 body: model and file by name, method and hyperparameters in the extra body."""
    body = {key: value for key, value in spec.items() if key not in ("base_model", "dataset", "method", "hyperparameters")}
    dataset = spec.get("dataset")
    body |= {
        "model": spec.get("base_model"),
        "training_file": f"file-{dataset}" if type(dataset) is int else dataset,
        "adapter": spec.get("method"),
        "extra_hyperparameters": spec.get("hyperparameters"),
    }
    if "validation_dataset" in body:
        value = body.pop("validation_dataset")
        body["validation_file"] = f"file-{value}" if type(value) is int else value
    return body


def rest_names(detail, field):
    """Whether a 422's detail (or a 400's field) names the field: its loc, less the method's tag, or its message."""
    for error in detail:
        loc = [str(part) for part in error["loc"][2:]]  # ["body", "spec", ...]
        if loc[:1] == ["method"] and loc[1:2] and loc[1] in METHOD_CONFIGS:
            del loc[1]
        dotted = ".".join(loc)
        if dotted == field or dotted.startswith(field + ".") or mentions(error["msg"], field):
            return True
    return False


def mentions(message, field):
    """Whether a message names the field, as the model-wide checks do ("export_merged: ...")."""
    return re.search(rf"\b{re.escape(field.split('.')[-1])}\b", message) is not None


@pytest.mark.parametrize("kind", list(METHOD_CONFIGS))
def test_the_unbroken_specs_are_accepted_by_both_apis(setup, kind, django_capture_on_commit_callbacks):
    api, dataset_id = setup
    with django_capture_on_commit_callbacks(execute=False):
        rest = api.post("/api/jobs", json.dumps(base_spec(dataset_id, kind)), content_type="application/json")
        openai = api.post("/v1/fine_tuning/jobs", json.dumps(openai_body(base_spec(dataset_id, kind))),
                          content_type="application/json")
    assert rest.status_code == 201, rest.content
    assert openai.status_code == 200, openai.content
    assert Job.objects.count() == 2


@fuzz
@given(broken=broken_specs())
def test_a_broken_spec_is_a_422_naming_the_field_on_the_rest_api(setup, broken):
    api, dataset_id = setup
    spec, field = broken
    response = api.post("/api/jobs", json.dumps(with_dataset(spec, dataset_id)), content_type="application/json")
    assert response.status_code in (400, 422), (response.status_code, response.content)
    body = response.json()
    detail = body["detail"] if response.status_code == 422 else [{"loc": ["body", "spec", body["field"]], "msg": body["detail"]}]
    assert rest_names(detail, field), f"{field} not named in {body}"
    assert not Job.objects.exists()


@fuzz
@given(broken=broken_specs())
def test_a_broken_spec_is_a_400_naming_the_parameter_on_the_openai_api(setup, broken):
    api, dataset_id = setup
    spec, field = broken
    response = api.post("/v1/fine_tuning/jobs", json.dumps(openai_body(with_dataset(spec, dataset_id))),
                        content_type="application/json")
    assert response.status_code == 400, (response.status_code, response.content)
    error = response.json()["error"]
    leaf = field.split(".")[-1]
    param_parts = set((error["param"] or "").split("."))
    assert param_parts & {leaf, OPENAI_NAMES.get(leaf)} or mentions(error["message"], field), f"{field} not named in {error}"
    assert not Job.objects.exists()


@pytest.mark.parametrize("body", [
    b'{"base_model": "tiny-random-llama", "dataset": 1, "method": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"base_model": "tiny-random-llama", "dataset": ' + b"9" * 5_000 + b"}",  # past Python's int parsing limit
    b'{"base_model": "tiny-random-\xff"}',  # not UTF-8
    b'{"base_model": "tiny-random-llama", "dat',
], ids=["nested", "huge number", "not utf-8", "cut off"])
def test_a_body_that_is_not_json_is_refused_on_both_apis(setup, body):
    api, _ = setup
    assert api.post("/api/jobs", body, content_type="application/json").status_code == 400
    response = api.post("/v1/fine_tuning/jobs", body, content_type="application/json")
    assert response.status_code == 400 and "the body is not JSON" in response.json()["error"]["message"]
    assert not Job.objects.exists()
