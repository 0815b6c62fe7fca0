from django import forms
from django.contrib.auth import get_user_model
from django.conf import settings
from pydantic import ValidationError

from . import datasets
from .models import BaseModel, Dataset, Membership, Team
from .spec import CANNOT_MERGE_REASONS, MAX_GPUS, METHOD_LABELS, AdapterConfig, JobSpec, LoraConfig, QLoraConfig
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
LORA_FAMILY = ("lora", "dora", "qlora")

# Form field -> the methods whose config it fills, in the order the page shows them.
METHOD_FIELD_GROUPS = [
    ("Target modules", LORA_FAMILY + ("ia3",), ("target_preset", "custom_targets")),
    ("Low-rank update", LORA_FAMILY, ("r", "alpha", "dropout", "bias")),
    ("Quantization", ("qlora",), ("bits", "quant_type", "double_quant")),
    ("Bottleneck", ("adapter",), ("placement", "bottleneck_size", "reduction_factor", "activation", "scaling")),
    ("Virtual tokens", ("prefix", "prompt"), ("num_virtual_tokens",)),
    ("Initialisation", ("prompt",), ("init_text",)),
]


def _choices(config_class, field):
    return [(value, value) for value in config_class.model_fields[field].annotation.__args__]


class JobForm(forms.Form):
    """Flat fields for the browser, validated by building the same JobSpec the API uses."""

    name = forms.CharField(max_length=200, required=False)
    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), to_field_name="name", empty_label=None)
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none(), empty_label=None)
    validation_dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), required=False, empty_label="hold out a share of the training rows",
        help_text="evaluate on another dataset instead")
    reference_dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), required=False, empty_label="no forgetting check",
        label="forgetting check",
        help_text="text from the base model's own domain: its loss is measured before and after training")
    method = forms.ChoiceField(choices=list(METHOD_LABELS.items()), initial="lora")
    # Method settings: only those of the chosen method are used; empty means the method's default.
    target_preset = forms.ChoiceField(choices=TARGET_PRESETS, initial="attention_qv", label="target modules",
                                      help_text="IA³ uses its own per-model defaults unless you give a custom list")
    custom_targets = forms.CharField(required=False, help_text="comma-separated module names, for a custom list")
    r = forms.IntegerField(initial=8, label="rank r", required=False)
    alpha = forms.FloatField(initial=16, required=False)
    dropout = forms.FloatField(initial=0.05, required=False)
    bias = forms.ChoiceField(choices=_choices(LoraConfig, "bias"), initial="none", required=False)
    bits = forms.TypedChoiceField(choices=[(4, "4-bit"), (8, "8-bit")], coerce=int, initial=4, required=False,
                                  empty_value=None)
    quant_type = forms.ChoiceField(choices=_choices(QLoraConfig, "quant_type"), initial="nf4", label="4-bit type",
                                   required=False)
    double_quant = forms.BooleanField(required=False, initial=True, label="double quantization")
    placement = forms.ChoiceField(
        choices=[("houlsby", "Houlsby: after attention and FFN"), ("pfeiffer", "Pfeiffer: after FFN"),
                 ("parallel", "parallel to the FFN")], initial="houlsby", required=False)
    bottleneck_size = forms.IntegerField(required=False, help_text="m; empty: hidden size / reduction factor")
    reduction_factor = forms.IntegerField(initial=16, required=False)
    activation = forms.ChoiceField(choices=_choices(AdapterConfig, "activation"), initial="gelu", required=False)
    scaling = forms.FloatField(initial=1.0, required=False)
    num_virtual_tokens = forms.IntegerField(initial=20, required=False)
    init_text = forms.CharField(required=False, help_text="start the virtual tokens from this text's embeddings")
    export_merged = forms.BooleanField(
        required=False, label="also export a merged model",
        help_text="a standalone model with the update folded in (LoRA, QLoRA, DoRA, IA³)")
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
    gradient_checkpointing = forms.BooleanField(
        required=False, help_text="recompute activations in the backward pass: much less memory, about a third slower")

    # Resources
    gpus = forms.IntegerField(
        initial=1, required=False, label="GPUs",
        widget=forms.NumberInput(attrs={"min": 1, "max": MAX_GPUS, "step": 1, "class": "small-number"}),
        help_text="more than one trains data-parallel on one worker with that many GPUs")

    HYPERPARAMETERS = (
        "epochs", "max_steps", "batch_size", "learning_rate", "max_seq_length",
        "warmup_steps", "eval_fraction", "checkpoint_every", "seed", "gradient_checkpointing",
    )

    def __init__(self, *args, team, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team
        self.fields["dataset"].queryset = Dataset.objects.filter(team=team, is_valid=True)
        self.fields["validation_dataset"].queryset = Dataset.objects.filter(team=team, is_valid=True)
        self.fields["reference_dataset"].queryset = Dataset.objects.filter(team=team, is_valid=True)
        self.spec = None

    def method_groups(self):
        return [
            {"title": title, "methods": " ".join(methods), "fields": [self[name] for name in names]}
            for title, methods, names in METHOD_FIELD_GROUPS
        ]

    def hyperparameter_fields(self):
        return [self[name] for name in self.HYPERPARAMETERS]

    def method_data(self):
        data = self.cleaned_data
        method = data.get("method", "lora")
        fields = {name for _, methods, names in METHOD_FIELD_GROUPS if method in methods for name in names}
        config = {"type": method}
        if "target_preset" in fields:
            if data.get("target_preset") == "custom":
                config["target_modules"] = [name.strip() for name in (data.get("custom_targets") or "").split(",")]
            elif method != "ia3":
                config["target_modules"] = data.get("target_preset")
            fields -= {"target_preset", "custom_targets"}
        for name in fields:
            value = data.get(name)
            if value is not None and value != "":
                config[name] = value
        return config

    def spec_data(self):
        data = self.cleaned_data
        base_model = data.get("base_model")
        return {
            "base_model": base_model.name if base_model else "",
            "dataset": data["dataset"].pk if data.get("dataset") else 0,
            "validation_dataset": data["validation_dataset"].pk if data.get("validation_dataset") else None,
            "reference_dataset": data["reference_dataset"].pk if data.get("reference_dataset") else None,
            "task": base_model.task if base_model else "causal_lm_sft",
            "method": self.method_data(),
            "hyperparameters": {name: data.get(name) for name in self.HYPERPARAMETERS if data.get(name) is not None},
            "export_merged": data.get("export_merged", False),
            "gpus": data["gpus"] if data.get("gpus") is not None else 1,
        }

    def _field_for(self, name):
        name = (name or "").rsplit(".", 1)[-1]  # a dotted JobSpec path (hyperparameters.max_seq_length) names its form field
        name = {"target_modules": "custom_targets"}.get(name, name)
        if name in METHOD_LABELS:  # a check of the whole method section
            name = "method"
        return name if name in self.fields else None

    def clean(self):
        super().clean()
        if self.errors:
            return
        method = self.cleaned_data["method"]
        if self.cleaned_data.get("export_merged") and method in CANNOT_MERGE_REASONS:
            self.add_error("export_merged", CANNOT_MERGE_REASONS[method])
            return
        try:
            self.spec = JobSpec.model_validate(self.spec_data())
        except ValidationError as exc:
            for error in exc.errors():
                field = self._field_for(str(error["loc"][-1])) if error["loc"] else None
                self.add_error(field, error["msg"].removeprefix("Value error, "))
            return
        try:
            check_against_catalogue(self.team, self.spec)
        except SubmissionError as error:
            self.add_error(self._field_for(error.field), error.message)


class TeamQuotaForm(forms.ModelForm):
    class Meta:
        model = Team
        fields = ["max_running_jobs", "max_queued_jobs"]


class AddMemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)

    def __init__(self, *args, team, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team

    def clean_username(self):
        username = self.cleaned_data["username"]
        self.user = get_user_model().objects.filter(username=username).first()
        if self.user is None:
            raise forms.ValidationError(f"no user named {username!r}")
        if Membership.objects.filter(team=self.team, user=self.user).exists():
            raise forms.ValidationError(f"{username} is already in team {self.team}")
        return username

    def save(self):
        return Membership.objects.create(team=self.team, user=self.user, role=self.cleaned_data["role"])
