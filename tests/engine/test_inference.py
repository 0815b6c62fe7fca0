"""The playground's inference (workers/inference.py) on the tiny random Llama and the real MiniLM.

The artifacts are trained here for a few steps with the methods' own apply and save, so each
fine-tuned model answers differently from its base. What a user relies on: the base model stays
loaded between requests and adapters are swapped on it (same object, a swap much faster than a
load); the base's answer is its own, whatever was swapped on before; each adapter's answer is the
one its artifact gives when loaded the ordinary way.
"""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from jobs.spec import AdapterConfig, FullFineTuningConfig, Ia3Config, LoraConfig, PrefixTuningConfig
from tests.engine.steps import train_steps
from workers import inference
from workers.inference import FineTuned, ResidentModels, Sampling, UnusableRequest
from workers.training.methods import METHODS
from workers.training.modeling import architecture_family

PROMPT = "upper: playground\n"
GREEDY = Sampling(temperature=0, max_new_tokens=16, seed=0)
SFT_TEXTS = ["upper: playground\nPLAYGROUND", "reverse: adapter\nretpada", "sort: swap\npsaw", "upper: base\nBASE"]
REVIEWS = [("a wonderful film, warm and funny", 1), ("dull, slow and far too long", 0),
           ("I loved every minute of it", 1), ("a tedious mess with no story", 0)]
LABELS = ["negative", "positive"]


def trained_artifact(directory, base, method, config, batch, task, learning_rate, label_names=None, seed=0):
    """Apply `method` to `base`, train it a few steps, and save its artifact into `directory`."""
    torch.manual_seed(seed)
    model = METHODS[method].apply(base, config, task, architecture_family(base))
    train_steps(model, batch, steps=6, learning_rate=learning_rate)
    METHODS[method].save(model, directory, "test-base-model", label_names)
    return directory


@pytest.fixture(scope="module")
def llama_artifacts(tiny_llama_path, tmp_path_factory):
    """{name: FineTuned} of causal LM artifacts: two LoRAs, IA³, prefix tuning, a bottleneck adapter, a full fine-tune."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    batch = tokenizer(SFT_TEXTS, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    root = tmp_path_factory.mktemp("artifacts")
    runs = {
        "lora-a": ("lora", LoraConfig(r=4, target_modules="all_linear"), 1e-2),
        "lora-b": ("lora", LoraConfig(r=8, target_modules="all_linear"), 3e-2),
        "ia3": ("ia3", Ia3Config(), 1e-1),
        "prefixed": ("prefix", PrefixTuningConfig(num_virtual_tokens=4), 1e-1),
        "bottleneck": ("adapter", AdapterConfig(), 1e-2),
        "full": ("full", FullFineTuningConfig(), 1e-3),
    }
    artifacts = {}
    for name, (method, config, learning_rate) in runs.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
        directory = trained_artifact(root / name, base, method, config, batch, "causal_lm_sft", learning_rate)
        artifacts[name] = FineTuned(key=name, name=name, method=method, directory=directory)
    return artifacts


@pytest.fixture(scope="module")
def minilm_artifacts(minilm, tmp_path_factory):
    """{name: FineTuned} of two-label classifiers on MiniLM: LoRA and a bottleneck adapter, each with its trained head."""
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts, labels = zip(*REVIEWS)
    batch = {**tokenizer(list(texts), padding=True, return_tensors="pt"), "labels": torch.tensor(labels)}
    root = tmp_path_factory.mktemp("classifiers")
    artifacts = {}
    for name, method, config in [("lora", "lora", LoraConfig(r=4)), ("bottleneck", "adapter", AdapterConfig())]:
        base = AutoModelForSequenceClassification.from_pretrained(
            minilm, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
        )
        directory = trained_artifact(root / name, base, method, config, batch, "sequence_classification", 1e-2, LABELS)
        artifacts[name] = FineTuned(key=name, name=name, method=method, directory=directory)
    return artifacts


def fresh_answer(model_path, prompt=PROMPT, sampling=GREEDY, apply=None):
    """The answer of a freshly loaded base model, with an artifact applied by `apply(base)` if given."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if apply is not None:
        model = apply(model)
    return inference.generate(model.eval(), tokenizer, prompt, sampling, torch.device("cpu"))["text"]


def probabilities(answer):
    return [choice["probability"] for choice in answer["probabilities"]]


def kinds(answers):
    return [answer["readiness"]["kind"] for answer in answers]


def test_the_second_request_swaps_adapters_on_the_base_that_stayed_loaded(tiny_llama_path, llama_artifacts):
    models = ResidentModels()
    adapters = [llama_artifacts["lora-a"], llama_artifacts["lora-b"]]

    first = models.answer(tiny_llama_path, "causal_lm_sft", adapters, prompt=PROMPT, sampling=GREEDY)
    assert kinds(first) == ["load", "swap", "swap"]
    assert first[0]["readiness"]["note"].startswith("loaded base model in")
    loaded_base = models.base

    second = models.answer(tiny_llama_path, "causal_lm_sft", adapters, prompt=PROMPT, sampling=GREEDY)
    assert kinds(second) == ["ready", "swap", "swap"]
    assert second[0]["readiness"]["note"] == "base model already loaded"
    assert models.base is loaded_base  # not reloaded: the very same model object
    # Switching to an adapter already in memory costs a fraction of loading the base.
    load_seconds = first[0]["readiness"]["seconds"]
    assert second[1]["readiness"]["seconds"] < load_seconds / 3, (second[1]["readiness"], load_seconds)
    assert "swapped to this adapter" in second[1]["readiness"]["note"]
    assert [answer["text"] for answer in second] == [answer["text"] for answer in first]

    # The adapter still active from the last request needs nothing at all.
    third = models.answer(tiny_llama_path, "causal_lm_sft", [llama_artifacts["lora-b"]], prompt=PROMPT, sampling=GREEDY)
    assert kinds(third) == ["ready", "ready"]
    assert third[1]["readiness"]["note"] == "adapter already loaded"


def test_each_answer_is_its_own_models_whatever_was_swapped_on_before(tiny_llama_path, llama_artifacts):
    base_alone = fresh_answer(tiny_llama_path)
    own_answers = {
        name: fresh_answer(tiny_llama_path, apply=lambda base, t=tuned: METHODS[t.method].load(base, t.directory))
        for name, tuned in llama_artifacts.items()
    }
    assert len(set(own_answers.values()) | {base_alone}) > 3, "the fine-tunes should answer differently"

    models = ResidentModels()
    # Every kind of swap, back and forth: peft types that cannot share a model, our bottleneck adapter, a whole model.
    for names in (["lora-a", "ia3"], ["prefixed", "bottleneck"], ["lora-b", "full", "bottleneck", "lora-a"], ["ia3"]):
        answers = models.answer(
            tiny_llama_path, "causal_lm_sft", [llama_artifacts[name] for name in names], prompt=PROMPT, sampling=GREEDY
        )
        assert answers[0]["text"] == base_alone, f"the base's answer after {names}"
        assert {answer["name"]: answer["text"] for answer in answers[1:]} == {name: own_answers[name] for name in names}
    assert kinds(answers) == ["ready", "swap"]


def test_a_full_fine_tune_is_loaded_whole_beside_the_base(tiny_llama_path, llama_artifacts):
    models = ResidentModels()
    full = llama_artifacts["full"]
    first = models.answer(tiny_llama_path, "causal_lm_sft", [full], prompt=PROMPT, sampling=GREEDY)
    assert kinds(first) == ["load", "load"]
    assert "a whole model, a reload" in first[1]["readiness"]["note"]
    second = models.answer(tiny_llama_path, "causal_lm_sft", [full], prompt=PROMPT, sampling=GREEDY)
    assert kinds(second) == ["ready", "ready"]


def test_sampling_uses_the_seed_and_temperature_zero_is_greedy(tiny_llama_path, llama_artifacts):
    models = ResidentModels()
    adapters = [llama_artifacts["lora-a"]]

    def texts(temperature, seed):
        sampling = Sampling(temperature=temperature, max_new_tokens=20, seed=seed)
        return [answer["text"] for answer in models.answer(tiny_llama_path, "causal_lm_sft", adapters, prompt=PROMPT, sampling=sampling)]

    assert texts(1.5, seed=1) == texts(1.5, seed=1)
    assert texts(1.5, seed=1) != texts(1.5, seed=2)
    assert texts(0, seed=1) == texts(0, seed=2)
    answer = models.answer(tiny_llama_path, "causal_lm_sft", adapters, prompt=PROMPT, sampling=Sampling(max_new_tokens=5))[1]
    assert answer["new_tokens"] <= 5 and answer["note"].startswith(f"generated {answer['new_tokens']} token")


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(tiny_llama_path, llama_artifacts):
    with pytest.raises(UnusableRequest, match=r"more than this model's context of 1024 tokens"):
        ResidentModels().answer(tiny_llama_path, "causal_lm_sft", [llama_artifacts["lora-a"]],
                                prompt="x" * 1000, sampling=Sampling(max_new_tokens=100))


def test_only_a_few_adapters_stay_loaded(tiny_llama_path, llama_artifacts, monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "ADAPTERS_KEPT", 2)
    untrained = []
    for index in range(3):
        directory = tmp_path / f"lora-{index}"
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
        METHODS["lora"].apply(base, LoraConfig(r=2), "causal_lm_sft", "llama").save_pretrained(directory)
        untrained.append(FineTuned(key=f"lora-{index}", name=f"lora-{index}", method="lora", directory=directory))
    models = ResidentModels()
    models.answer(tiny_llama_path, "causal_lm_sft", untrained, prompt=PROMPT, sampling=Sampling(max_new_tokens=2))
    assert set(models.peft_model.peft_config) == {"lora-1", "lora-2"}


def test_a_swap_that_fails_leaves_no_half_changed_base_behind(tiny_llama_path, llama_artifacts, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((llama_artifacts["lora-b"].directory / "adapter_config.json").read_bytes())
    models = ResidentModels()
    models.answer(tiny_llama_path, "causal_lm_sft", [llama_artifacts["lora-a"]], prompt=PROMPT, sampling=GREEDY)
    with pytest.raises(ValueError):  # peft finds no weights beside the config
        models.answer(tiny_llama_path, "causal_lm_sft", [FineTuned("broken", "broken", "lora", broken)],
                      prompt=PROMPT, sampling=GREEDY)
    answers = models.answer(tiny_llama_path, "causal_lm_sft", [llama_artifacts["lora-a"]], prompt=PROMPT, sampling=GREEDY)
    assert kinds(answers) == ["load", "swap"]
    assert answers[0]["text"] == fresh_answer(tiny_llama_path)


def test_a_classifier_answers_with_the_base_models_untrained_head_and_each_trained_one(minilm, minilm_artifacts):
    models = ResidentModels()
    text = "a warm and wonderful film"
    first = models.answer(minilm, "sequence_classification", list(minilm_artifacts.values()), text=text)
    assert [answer["name"] for answer in first] == ["base model", "lora", "bottleneck"]
    for answer in first:
        assert [choice["label"] for choice in answer["probabilities"]] == LABELS
        assert sum(choice["probability"] for choice in answer["probabilities"]) == pytest.approx(1)
        best = max(answer["probabilities"], key=lambda choice: choice["probability"])
        assert answer["label"] == best["label"]
    assert len({tuple(probabilities(answer)) for answer in first}) == 3

    # The bottleneck adapter brought its trained head; the base's own head is back for its answer.
    second = models.answer(minilm, "sequence_classification", [minilm_artifacts["lora"]], text=text)
    assert probabilities(second[0]) == probabilities(first[0])
    assert probabilities(second[1]) == pytest.approx(probabilities(first[1]))
    assert kinds(second) == ["ready", "swap"]


def test_classifiers_with_different_labels_are_refused(minilm, minilm_artifacts, tmp_path):
    other = tmp_path / "other-labels"
    other.mkdir()
    for path in minilm_artifacts["lora"].directory.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    (other / "labels.json").write_text(json.dumps(["ham", "spam"]))
    relabelled = FineTuned(key="other", name="spam-filter", method="lora", directory=other)
    with pytest.raises(UnusableRequest, match="do not share their labels.*spam-filter: ham, spam"):
        ResidentModels().answer(minilm, "sequence_classification", [minilm_artifacts["lora"], relabelled], text="hi")


def zip_of(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_an_artifact_is_extracted_once_into_the_cache(tmp_path, monkeypatch):
    opened = []

    def open_zip():
        opened.append(1)
        return io.BytesIO(zip_of({"adapter_config.json": "{}", "adapter_model.safetensors": "weights"}))

    directory = inference.extract_artifact(open_zip, tmp_path / "artifact-1")
    assert (directory / "adapter_config.json").read_text() == "{}"
    assert inference.extract_artifact(open_zip, tmp_path / "artifact-1") == directory
    assert len(opened) == 1

    monkeypatch.setattr(inference, "ARTIFACT_DIRS_KEPT", 2)
    for index in (2, 3):
        inference.extract_artifact(open_zip, tmp_path / f"artifact-{index}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["artifact-2", "artifact-3"]


def test_an_artifact_with_a_path_outside_its_directory_is_refused(tmp_path):
    evil = zip_of({"../escaped.txt": "x"})
    with pytest.raises(UnusableRequest, match="outside its directory"):
        inference.extract_artifact(lambda: io.BytesIO(evil), tmp_path / "cache" / "artifact-9")
    assert not (tmp_path / "cache" / "escaped.txt").exists()


def test_the_inference_module_imports_nothing_of_django(engine_environment):
    listing = "import sys, workers.inference; print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    completed = subprocess.run([sys.executable, "-c", listing], env=engine_environment, capture_output=True, text=True,
                               timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
