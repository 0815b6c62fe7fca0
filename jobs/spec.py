"""JobSpec: the one description of a fine-tuning job.

The form, the API and the training engine all validate with these models, so a
bad value is refused at submission with its field named instead of failing
half-way through training. Plain pydantic: no Django, no torch.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["causal_lm_sft", "sequence_classification"]

TASK_LABELS = {
    "causal_lm_sft": "Causal LM supervised fine-tuning",
    "sequence_classification": "Sequence classification",
}

# Module names per preset, by model architecture family. The engine resolves
# a preset against the loaded model, so a user never has to know module names.
TARGET_MODULE_PRESETS = ("attention_qv", "attention_qkvo", "all_linear")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(_Strict):
    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16, gt=0, le=4096, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["attention_qv", "attention_qkvo", "all_linear"] | list[str] = Field(
        "attention_qv", description="a preset or a list of module names"
    )
    bias: Literal["none", "all", "lora_only"] = "none"

    @model_validator(mode="after")
    def _non_empty_module_list(self):
        if isinstance(self.target_modules, list):
            names = [name.strip() for name in self.target_modules if name.strip()]
            if not names:
                raise ValueError("target_modules: give a preset or at least one module name")
            self.target_modules = names
        return self


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


class JobSpec(_Strict):
    base_model: str = Field(min_length=1, max_length=200, description="catalogue name of the base model")
    dataset: int = Field(ge=1, description="id of an uploaded, valid dataset")
    task: Task = "causal_lm_sft"
    method: LoraConfig = LoraConfig()
    hyperparameters: Hyperparameters = Hyperparameters()


class TrainingRun(_Strict):
    """What the engine needs beyond the spec: the resolved files on this machine."""

    spec: JobSpec
    model_path: str
    dataset_path: str
    dataset_format: str
    column_map: dict[str, str] = {}
