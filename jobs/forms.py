from django import forms
from django.conf import settings
from pydantic import ValidationError

from . import datasets
from .models import BaseModel, Dataset
from .spec import JobSpec
from .submission import SubmissionError, check_against_catalogue
from .uploads import store_dataset


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="defaults to the file name")
    file = forms.FileField(help_text="JSON Lines, a JSON array, CSV or TSV")
    format = forms.ChoiceField(
        choices=[("", "detect from the fields")] + [(name, f"{name}: {shape}") for name, (_, _, shape) in datasets.FORMATS.items()],
        required=False,
    )
    text_column = forms.CharField(max_length=100, required=False, help_text='column holding the text, if not "text"')
    label_column = forms.CharField(max_length=100, required=False, help_text='column holding the label, if not "label"')

    def clean_file(self):
        upload = self.cleaned_data["file"]
        if upload.size > settings.DATASET_MAX_BYTES:
            raise forms.ValidationError(
                f"the file is {upload.size:,} bytes; the limit is {settings.DATASET_MAX_BYTES:,}"
            )
        return upload

    def column_map(self):
        mapping = {}
        for field, target in (("text_column", "text"), ("label_column", "label")):
            source = self.cleaned_data.get(field, "").strip()
            if source and source != target:
                mapping[target] = source
        return mapping

    def save(self, team, user):
        upload = self.cleaned_data["file"]
        return store_dataset(
            team,
            user,
            upload.name,
            upload.read(),
            name=self.cleaned_data["name"],
            fmt=self.cleaned_data["format"] or None,
            column_map=self.column_map(),
        )


TARGET_PRESETS = [
    ("attention_qv", "attention q, v"),
    ("attention_qkvo", "attention q, k, v, o"),
    ("all_linear", "all linear layers"),
    ("custom", "custom list"),
]


class JobForm(forms.Form):
    """Flat fields for the browser, validated by building the same JobSpec the API uses."""

    name = forms.CharField(max_length=200, required=False)
    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), to_field_name="name", empty_label=None)
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none(), empty_label=None)
    # LoRA
    r = forms.IntegerField(initial=8, label="rank r")
    alpha = forms.FloatField(initial=16)
    dropout = forms.FloatField(initial=0.05)
    target_preset = forms.ChoiceField(choices=TARGET_PRESETS, initial="attention_qv", label="target modules")
    custom_targets = forms.CharField(required=False, help_text="comma-separated module names, for a custom list")
    # Hyperparameters
    epochs = forms.IntegerField(initial=1)
    max_steps = forms.IntegerField(required=False, help_text="overrides epochs when set")
    batch_size = forms.IntegerField(initial=8)
    learning_rate = forms.FloatField(initial=2e-4)
    max_seq_length = forms.IntegerField(initial=256)
    warmup_steps = forms.IntegerField(initial=0)
    eval_fraction = forms.FloatField(initial=0.1)
    checkpoint_every = forms.IntegerField(initial=50)
    seed = forms.IntegerField(initial=42)

    HYPERPARAMETERS = (
        "epochs", "max_steps", "batch_size", "learning_rate", "max_seq_length",
        "warmup_steps", "eval_fraction", "checkpoint_every", "seed",
    )

    METHOD_FIELDS = ("r", "alpha", "dropout", "target_preset", "custom_targets")

    def method_fields(self):
        return [self[name] for name in self.METHOD_FIELDS]

    def hyperparameter_fields(self):
        return [self[name] for name in self.HYPERPARAMETERS]

    def __init__(self, *args, team, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team
        self.fields["dataset"].queryset = Dataset.objects.filter(team=team, is_valid=True)
        self.spec = None

    def spec_data(self):
        data = self.cleaned_data
        preset = data.get("target_preset")
        targets = [name.strip() for name in (data.get("custom_targets") or "").split(",")] if preset == "custom" else preset
        base_model = data.get("base_model")
        return {
            "base_model": base_model.name if base_model else "",
            "dataset": data["dataset"].pk if data.get("dataset") else 0,
            "task": base_model.task if base_model else "causal_lm_sft",
            "method": {"type": "lora", "r": data.get("r"), "alpha": data.get("alpha"),
                       "dropout": data.get("dropout"), "target_modules": targets},
            "hyperparameters": {name: data.get(name) for name in self.HYPERPARAMETERS if data.get(name) is not None},
        }

    def clean(self):
        super().clean()
        if self.errors:
            return
        try:
            self.spec = JobSpec.model_validate(self.spec_data())
        except ValidationError as exc:
            for error in exc.errors():
                field = str(error["loc"][-1]) if error["loc"] else None
                field = {"target_modules": "custom_targets", "method": "custom_targets"}.get(field, field)
                self.add_error(field if field in self.fields else None, error["msg"])
            return
        try:
            check_against_catalogue(self.team, self.spec)
        except SubmissionError as error:
            self.add_error(error.field if error.field in self.fields else None, error.message)
