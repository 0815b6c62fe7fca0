"""JobSpec: the one description of a fine-tuning job.

The form, the API and the training engine all validate with these models, so a
bad value is refused at submission with its field named instead of failing
half-way through training. Plain pydantic: no Django, no torch.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .datasets import unstorable_text

MAX_GPUS = 8  # one host's worth: a multi-GPU job runs on one worker

Task = Literal["causal_lm_sft", "sequence_classification"]

TASK_LABELS = {
    "causal_lm_sft": "Causal LM supervised fine-tuning",
    "sequence_classification": "Sequence classification",
}


def refuse_unstorable_text(value):
    """A field validator: text that cannot be stored (a NUL, a lone surrogate) is refused, in a list too."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and (problem := unstorable_text(text)):
            raise ValueError(f"the text {problem}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _storable_text = field_validator("*")(refuse_unstorable_text)


TargetModules = Literal["attention_qv", "attention_qkvo", "all_linear"] | list[str]


def _clean_module_list(target_modules):
    if isinstance(target_modules, list):
        names = [name.strip() for name in target_modules if name.strip()]
        if not names:
            raise ValueError("give a preset or at least one module name")
        return names
    return target_modules


class LoraConfig(_Strict):
    """LoRA: a low-rank update B·A beside chosen linear layers."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16, gt=0, le=4096, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = Field("attention_qv", description="a preset or a list of module names")
    bias: Literal["none", "all", "lora_only"] = "none"

    _non_empty_module_list = field_validator("target_modules")(_clean_module_list)


class DoraConfig(LoraConfig):
    """DoRA: LoRA with the weight split into magnitude and direction (peft use_dora)."""

    type: Literal["dora"] = "dora"


class QLoraConfig(LoraConfig):
    """QLoRA: the frozen base quantized by bitsandbytes, LoRA on top."""

    type: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too")


class Ia3Config(_Strict):
    """IA³: learned scaling vectors on keys, values and the feed-forward activations."""

    type: Literal["ia3"] = "ia3"
    target_modules: Literal["default"] | list[str] = "default"
    feedforward_modules: list[str] | None = Field(None, description="the subset of target_modules inside the FFN")

    _non_empty_module_list = field_validator("target_modules")(_clean_module_list)

    @model_validator(mode="after")
    def _feedforward_within_targets(self):
        if self.feedforward_modules is not None:
            if self.target_modules == "default":
                raise ValueError("feedforward_modules: give target_modules as a list too")
            outside = [name for name in self.feedforward_modules if name not in self.target_modules]
            if outside:
                raise ValueError(f"feedforward_modules {outside} are not in target_modules")
        return self


class AdapterConfig(_Strict):
    """Bottleneck adapters: down-projection, non-linearity, up-projection, residual."""

    type: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "houlsby", description="houlsby: after attention and FFN; pfeiffer: after FFN; parallel: beside the FFN"
    )
    bottleneck_size: int | None = Field(None, ge=1, le=65536, description="m; default hidden size / reduction_factor")
    reduction_factor: int = Field(16, ge=1, le=4096)
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    scaling: float = Field(1.0, gt=0, le=100, description="multiplier of the adapter's output")


class PrefixTuningConfig(_Strict):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, le=1024)


class PromptTuningConfig(_Strict):
    """Prompt tuning: trainable virtual token embeddings before the input."""

    type: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    init_text: str | None = Field(None, max_length=2000, description="initialise the virtual tokens from this text")


class FullFineTuningConfig(_Strict):
    """Every weight trains: the baseline the other methods are judged against."""

    type: Literal["full"] = "full"


def _method_type(value):
    # A method section without a type is LoRA, the method most people mean.
    return value.get("type", "lora") if isinstance(value, dict) else getattr(value, "type", "lora")


Method = Annotated[
    Annotated[LoraConfig, Tag("lora")]
    | Annotated[DoraConfig, Tag("dora")]
    | Annotated[QLoraConfig, Tag("qlora")]
    | Annotated[Ia3Config, Tag("ia3")]
    | Annotated[AdapterConfig, Tag("adapter")]
    | Annotated[PrefixTuningConfig, Tag("prefix")]
    | Annotated[PromptTuningConfig, Tag("prompt")]
    | Annotated[FullFineTuningConfig, Tag("full")],
    Discriminator(_method_type),
]
METHOD_LABELS = {
    "lora": "LoRA",
    "qlora": "QLoRA (quantized base)",
    "dora": "DoRA",
    "adapter": "Bottleneck adapters",
    "ia3": "IA³",
    "prefix": "Prefix tuning",
    "prompt": "Prompt tuning",
    "full": "Full fine-tuning",
}
# Why a method has no merged export; the methods missing here fold into the base weights.
CANNOT_MERGE_REASONS = {
    "adapter": "Bottleneck adapters have a non-linearity between their two projections, so they cannot fold "
    "into the base weights: they stay in the forward pass and add inference latency.",
    "prefix": "Prefix tuning adds trained key/value vectors to every attention layer at inference; there are "
    "no weight updates to fold into the base model.",
    "prompt": "Prompt tuning adds trained virtual tokens before every input at inference; there are no weight "
    "updates to fold into the base model.",
    "full": "Full fine-tuning already produces the whole model; there is nothing to merge.",
}


class Hyperparameters(_Strict):
    epochs: int = Field(1, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="overrides epochs when set")
    batch_size: int = Field(8, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    max_seq_length: int = Field(256, ge=8, le=32768)
    warmup_steps: int = Field(0, ge=0, le=100_000)
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    eval_fraction: float = Field(0.1, ge=0, le=0.5, description="share of rows held out for evaluation")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations; default: at the end")
    checkpoint_every: int = Field(50, ge=1, le=1_000_000)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: much less memory, about a third slower"
    )


class JobSpec(_Strict):
    base_model: str = Field(min_length=1, max_length=200, description="catalogue name of the base model")
    dataset: int = Field(ge=1, description="id of an uploaded, valid dataset")
    validation_dataset: int | None = Field(
        None, ge=1, description="id of a dataset to evaluate on, instead of holding out eval_fraction of the rows"
    )
    reference_dataset: int | None = Field(
        None, ge=1, description="id of a dataset from the base model's own domain: its loss is measured before "
        "and after training, to show how much general skill the fine-tune cost (causal LM only)",
    )
    task: Task = "causal_lm_sft"
    method: Method = LoraConfig()
    hyperparameters: Hyperparameters = Hyperparameters()
    export_merged: bool = Field(False, description="also export a standalone model with the method merged in")
    # Read by placement and the worker's runner (which launches the engine once per GPU under accelerate), never
    # by the engine itself: each of its processes trains on the one GPU it is given.
    gpus: int = Field(1, ge=1, le=MAX_GPUS, description=f"GPUs the job trains on at once (data parallel), 1 to {MAX_GPUS}")

    @model_validator(mode="after")
    def _reference_only_for_language_models(self):
        if self.reference_dataset is not None and self.task != "causal_lm_sft":
            raise ValueError("reference_dataset: the forgetting check measures a language model's loss; "
                             "a classifier's new head has no loss on the base domain to compare")
        return self

    @model_validator(mode="after")
    def _merge_only_where_possible(self):
        if self.export_merged and self.method.type in CANNOT_MERGE_REASONS:
            raise ValueError(f"export_merged: {CANNOT_MERGE_REASONS[self.method.type]}")
        return self


class TrainingRun(_Strict):
    """What the engine needs beyond the spec: the resolved files on this machine."""

    spec: JobSpec
    model_path: str
    dataset_path: str
    dataset_format: str
    column_map: dict[str, str] = {}
    eval_dataset_path: str | None = None
    eval_dataset_format: str | None = None
    eval_column_map: dict[str, str] = {}
    reference_dataset_path: str | None = None
    reference_dataset_format: str | None = None
    reference_column_map: dict[str, str] = {}
    # A checkpoint directory this engine wrote for the same spec: training continues from its step.
    resume_from: str | None = None
    # Whether the model's own Python code (its config's auto_map) may run: an admin's choice per base model.
    trust_remote_code: bool = False
    # Split weights, gradients and optimizer state across the job's GPUs (FSDP): set by the worker
    # when the job would not fit one of them whole (jobs/placement.py).
    shard_weights: bool = False

    @model_validator(mode="after")
    def _shard_only_what_fsdp_shards(self):
        if self.shard_weights and self.spec.method.type == "qlora":
            raise ValueError("shard_weights: QLoRA's 4-bit base weights cannot be sharded across GPUs")
        return self
