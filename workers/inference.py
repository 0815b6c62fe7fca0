"""Answers from a base model and its fine-tuned versions, for the playground.

Plain Python like the training engine (no Django): the inference worker's task
hands it the base model's path and the extracted artifacts, and gets answers back.

A worker process keeps one base model loaded (`ResidentModels`) and swaps the
fine-tuned parts on and off it: loading a base model takes seconds to minutes,
switching to an adapter already in memory milliseconds.

- peft adapters (LoRA, QLoRA, DoRA, IA³, prefix and prompt tuning) stay loaded on
  the base, a few at a time, and `set_adapter` switches between them; the base's
  own answer comes from inside `disable_adapter()`. peft holds adapters of one
  peft type per model, so an adapter of another type first takes the others off.
  A QLoRA adapter runs on the full-precision base, whose weights it was trained
  against in 4 bits.
- a bottleneck adapter (our own module) is attached with our loader, one at a
  time, and taken off again for the base's answer.
- a full fine-tune is a whole model: it is loaded as one, beside the base.

Every answer says what it took to get the model ready (a load, a swap, or
nothing) and how long the generation took.
"""

import gc
import json
import os
import shutil
import time
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from workers.training.export import LABELS_FILE
from workers.training.methods import METHODS, adapter
from workers.training.methods.bottleneck import BottleneckAdapter, adapter_modules
from workers.training.modeling import architecture_family

PEFT_METHODS = {"lora", "qlora", "dora", "ia3", "prefix", "prompt"}
ADAPTERS_KEPT = 4  # peft adapters loaded on the base at once; the least recently used goes first
ARTIFACT_DIRS_KEPT = 16  # extracted artifacts kept on disk per worker
# A classification base model gets a new, random head. Seeded, so the base's answer is the
# same on every load and every worker.
UNTRAINED_HEAD_SEED = 0
COMPLETE_MARKER = ".extracted"


class UnusableRequest(ValueError):
    """A request that cannot be answered as asked; the message says why, for the user."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy: always the most likely token
    max_new_tokens: int = 64
    seed: int = 0


@dataclass(frozen=True)
class FineTuned:
    """One fine-tuned model to answer with: its extracted artifact and how it was trained."""

    key: str  # unique per artifact; names the adapter inside the loaded model
    name: str  # what the user calls it
    method: str  # a key of workers.training.methods.METHODS
    directory: Path


@dataclass
class Readiness:
    """What it took to get a model ready for an answer."""

    kind: str  # "load" (read a whole model from disk), "swap" (an adapter onto the loaded base) or "ready"
    seconds: float
    note: str


def extract_artifact(open_zip, directory):
    """The artifact zip unpacked into `directory`, once: a later call finds it there.

    `open_zip()` opens the zip for reading; it is called only when the directory is
    not there yet. Unpacked beside and renamed into place, so a directory that exists
    is complete even if a worker died half-way through an earlier extraction.
    """
    directory = Path(directory)
    if (directory / COMPLETE_MARKER).exists():
        os.utime(directory)  # the most recently used directories are the ones kept
        return directory
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with open_zip() as file, zipfile.ZipFile(file) as archive:
        for member in archive.infolist():
            if not (partial / member.filename).resolve().is_relative_to(partial.resolve()):
                raise UnusableRequest(f"the artifact holds a path outside its directory: {member.filename}")
        archive.extractall(partial)
    (partial / COMPLETE_MARKER).touch()
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    forget_old_artifacts(directory.parent, keep=ARTIFACT_DIRS_KEPT)
    return directory


def forget_old_artifacts(cache_dir, keep):
    """Delete all but the `keep` most recently used extracted artifacts (a loaded model no longer needs its files)."""
    extracted = sorted(
        (path for path in Path(cache_dir).iterdir() if (path / COMPLETE_MARKER).exists()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for path in extracted[keep:]:
        shutil.rmtree(path, ignore_errors=True)


class ResidentModels:
    """The base model a worker process keeps loaded, the adapters swapped on it, and one whole fine-tuned model.

    Not thread-safe: one request at a time (the worker runs with --pool solo, or holds a lock).
    """

    def __init__(self, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves a model's memory on GPUs that compute in it; the CPU computes in full precision.
        on_bf16_gpu = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if on_bf16_gpu else torch.float32
        self.base_key = None  # (path, task, label names) of the loaded base
        self.base = None  # the transformers model, with whatever is attached to it
        self.tokenizer = None
        self.label_names = None
        self.peft_model = None  # a PeftModel around self.base while peft adapters are loaded
        self.peft_adapters = OrderedDict()  # adapter keys loaded in peft_model, least recently used first
        self.bottleneck = None  # (key, head name, the head's own weights) while a bottleneck adapter is attached
        self.whole_model = None  # (key, model) of the last full fine-tune answered with

    # --- answering ---

    def answer(self, base_path, task, fine_tuned, base_name="base model", prompt=None, sampling=Sampling(), text=None):
        """Answers of the base model and of each fine-tuned model, in that order.

        A causal LM continues `prompt` with `sampling`; a classifier labels `text`.
        """
        label_names = self._label_names(task, fine_tuned)
        try:
            readiness = self._load_base(base_path, task, label_names)
            with self._base_on_its_own() as model:
                answers = [self._run(model, readiness, prompt, sampling, text) | {"name": base_name, "method": None}]
            for tuned in fine_tuned:
                readiness, model = self._ready(tuned)
                answers.append(self._run(model, readiness, prompt, sampling, text) | {"name": tuned.name, "method": tuned.method})
        except Exception:
            # A swap that failed half-way may have left the base changed: the next request loads it afresh.
            self._forget_everything()
            raise
        return answers

    def _run(self, model, readiness, prompt, sampling, text):
        if self.label_names is None:
            result = generate(model, self.tokenizer, prompt, sampling, self.device)
        else:
            result = classify(model, self.tokenizer, text, self.label_names, self.device)
        return result | {"readiness": asdict(readiness)}

    def _label_names(self, task, fine_tuned):
        """A classifier's labels, which every fine-tuned model must share: the base's head is made for them."""
        if task != "sequence_classification":
            return None
        labels = [(tuned.name, json.loads((tuned.directory / LABELS_FILE).read_text())) for tuned in fine_tuned]
        if not labels:
            raise UnusableRequest("a classifier's base model has no head of its own: pick a fine-tuned job to compare")
        if len({tuple(names) for _, names in labels}) > 1:
            listed = "; ".join(f"{name}: {', '.join(names)}" for name, names in labels)
            raise UnusableRequest(f"these classifiers do not share their labels ({listed}); compare them one at a time")
        return labels[0][1]

    # --- the base model ---

    def _load_base(self, path, task, label_names):
        key = (str(path), task, tuple(label_names) if label_names else None)
        if key == self.base_key:
            return Readiness("ready", 0.0, "base model already loaded")
        self._forget_everything()
        start = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if label_names is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(UNTRAINED_HEAD_SEED)
                model = AutoModelForSequenceClassification.from_pretrained(
                    path,
                    num_labels=len(label_names),
                    id2label=dict(enumerate(label_names)),
                    label2id={name: index for index, name in enumerate(label_names)},
                    dtype=self.dtype,
                )
            # A classifier over a decoder reads the last non-pad token, so it has to know the pad id (as in training).
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_token_id(self.tokenizer)
        self.base = model.to(self.device).eval()
        self.base_key, self.label_names = key, label_names
        seconds = wait_for_device(start)
        return Readiness("load", seconds, f"loaded base model in {format_seconds(seconds)}")

    @contextmanager
    def _base_on_its_own(self):
        """The base model with nothing of a fine-tune in effect, while the context lasts."""
        self._detach_bottleneck()
        if self.peft_model is None:
            yield self.base
        else:
            with self.peft_model.disable_adapter():
                yield self.peft_model

    def _forget_everything(self):
        self.base = self.tokenizer = self.peft_model = self.whole_model = self.bottleneck = None
        self.base_key = self.label_names = None
        self.peft_adapters.clear()
        free_memory()

    # --- the fine-tuned models ---

    def _ready(self, tuned):
        """(Readiness, model) of a fine-tuned model, swapped onto the base or loaded whole."""
        if tuned.method == "full":
            return self._ready_whole_model(tuned)
        if tuned.method == "adapter":
            return self._ready_bottleneck(tuned)
        if tuned.method in PEFT_METHODS:
            return self._ready_peft(tuned)
        raise UnusableRequest(f"the playground cannot run a {tuned.method!r} artifact")

    def _ready_peft(self, tuned):
        start = time.perf_counter()
        self._detach_bottleneck()
        if tuned.key in self.peft_adapters:
            self.peft_adapters.move_to_end(tuned.key)
            if self.peft_model.active_adapter == tuned.key:
                return Readiness("ready", 0.0, "adapter already loaded"), self.peft_model
            self.peft_model.set_adapter(tuned.key)
            seconds = wait_for_device(start)
            return Readiness("swap", seconds, f"swapped to this adapter in {format_seconds(seconds)}"), self.peft_model

        peft_type = peft.PeftConfig.from_pretrained(tuned.directory).peft_type
        if self.peft_model is not None and self.peft_model.peft_type != peft_type:
            self._take_off_peft()  # peft keeps adapters of one type per model
        if self.peft_model is None:
            self.peft_model = peft.PeftModel.from_pretrained(self.base, tuned.directory, adapter_name=tuned.key)
        else:
            if len(self.peft_adapters) >= ADAPTERS_KEPT:
                least_recent, _ = self.peft_adapters.popitem(last=False)
                self.peft_model.delete_adapter(least_recent)
            self.peft_model.load_adapter(tuned.directory, adapter_name=tuned.key)
            self.peft_model.set_adapter(tuned.key)
        self.peft_adapters[tuned.key] = None
        seconds = wait_for_device(start)
        note = f"swapped in from its artifact in {format_seconds(seconds)}; the base model stayed loaded"
        return Readiness("swap", seconds, note), self.peft_model

    def _take_off_peft(self):
        """Leave the base as it was loaded: peft's layers out, the base's own modules back in."""
        # unload() puts the active adapter's copy of a classifier head in the head's place; the base's own
        # head is the wrapper's original_module.
        own_heads = {
            name: module.original_module
            for name, module in self.peft_model.get_base_model().named_modules()
            if isinstance(module, ModulesToSaveWrapper)
        }
        if self.peft_model.peft_config[self.peft_model.active_adapter].is_prompt_learning:
            self.base = self.peft_model.get_base_model()  # prompt learning leaves the layers alone
        else:
            self.base = self.peft_model.unload()
        for name, module in own_heads.items():
            self.base.set_submodule(name, module)
        self.peft_model = None
        self.peft_adapters.clear()

    def _ready_bottleneck(self, tuned):
        if self.bottleneck is not None and self.bottleneck[0] == tuned.key:
            return Readiness("ready", 0.0, "adapter already attached"), self.base
        start = time.perf_counter()
        self._detach_bottleneck()
        if self.peft_model is not None:
            self._take_off_peft()  # its layers would act too; its adapters come back from disk when asked for
        # Our loader overwrites a classifier's head with the trained one; the base's own is put back on detach.
        head_name = adapter.CLASSIFIER_HEADS.get(architecture_family(self.base)) if self.label_names else None
        own_head = None
        if head_name is not None:
            own_head = {name: tensor.clone() for name, tensor in self.base.get_submodule(head_name).state_dict().items()}
        try:
            adapter.load(self.base, tuned.directory)
        except ValueError as error:
            raise UnusableRequest(str(error)) from error
        self.bottleneck = (tuned.key, head_name, own_head)
        seconds = wait_for_device(start)
        note = f"swapped in from its artifact in {format_seconds(seconds)}; the base model stayed loaded"
        return Readiness("swap", seconds, note), self.base

    def _detach_bottleneck(self):
        if self.bottleneck is None:
            return
        _, head_name, own_head = self.bottleneck
        # The adapters hang on hooks of the base's modules (see bottleneck.py); these are the hooks bound to one.
        for module in self.base.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for handle_id, hook in list(hooks.items()):
                    if isinstance(getattr(hook, "__self__", None), BottleneckAdapter):
                        del hooks[handle_id]
        for name in adapter_modules(self.base):
            parent_name, _, child_name = name.rpartition(".")
            delattr(self.base.get_submodule(parent_name), child_name)
        if own_head is not None:
            self.base.get_submodule(head_name).load_state_dict(own_head)
        del self.base.bottleneck_adapter_layout
        self.bottleneck = None

    def _ready_whole_model(self, tuned):
        if self.whole_model is not None and self.whole_model[0] == tuned.key:
            return Readiness("ready", 0.0, "fine-tuned model already loaded"), self.whole_model[1]
        self.whole_model = None
        free_memory()
        start = time.perf_counter()
        model = METHODS["full"].load(self.base, tuned.directory).to(self.device)
        self.whole_model = (tuned.key, model)
        seconds = wait_for_device(start)
        note = f"loaded the fine-tuned model in {format_seconds(seconds)}: a full fine-tune is a whole model, a reload"
        return Readiness("load", seconds, note), model


@torch.no_grad()
def generate(model, tokenizer, prompt, sampling, device):
    """The model's continuation of `prompt`, tokenized as training tokenizes a prompt (BOS, then the text)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    context = getattr(model.config, "max_position_embeddings", None)
    if context and len(ids) + sampling.max_new_tokens > context:
        raise UnusableRequest(
            f"the prompt is {len(ids)} tokens; with {sampling.max_new_tokens} new tokens that is more than "
            f"this model's context of {context} tokens"
        )
    input_ids = torch.tensor([ids], device=device)
    options = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad_token_id(tokenizer)}
    if sampling.temperature > 0:
        # Plain sampling at that temperature: no top-k or top-p cut, whatever the model's generation config says.
        options |= {"do_sample": True, "temperature": sampling.temperature, "top_k": 0, "top_p": 1.0}
    else:
        options |= {"do_sample": False}
    start = time.perf_counter()
    # Every answer starts from the same seed, so that a difference comes from the model, not the dice.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
    seconds = wait_for_device(start)
    new_tokens = output[0, len(ids):]
    return {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "new_tokens": len(new_tokens),
        "seconds": seconds,
        "note": f"generated {len(new_tokens)} token{'' if len(new_tokens) == 1 else 's'} in {format_seconds(seconds)}",
    }


@torch.no_grad()
def classify(model, tokenizer, text, label_names, device):
    """The predicted label of `text`, and the probability of each label."""
    start = time.perf_counter()
    inputs = tokenizer(text, truncation=True, return_tensors="pt").to(device)
    probabilities = torch.softmax(model(**inputs).logits[0].float(), dim=-1).tolist()
    seconds = wait_for_device(start)
    best = max(range(len(label_names)), key=lambda index: probabilities[index])
    return {
        "label": label_names[best],
        "probabilities": [{"label": name, "probability": p} for name, p in zip(label_names, probabilities)],
        "seconds": seconds,
        "note": f"classified in {format_seconds(seconds)}",
    }


def pad_token_id(tokenizer):
    # As in training: many causal LMs ship without a pad token, and eos serves.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def wait_for_device(start):
    """Seconds since `start`, after the GPU has finished what it was given (its kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_seconds(seconds):
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
