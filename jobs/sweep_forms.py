import json

from django import forms

from .forms import JobForm
from .spec import METHOD_LABELS
from .sweeps import SWEEP_METRICS, GridError, clean_grid, expand_grid, left_out_keys, points_per_method


def comma_separated(text, parse, kind):
    values = []
    for item in text.split(","):
        if item.strip():
            try:
                values.append(parse(item.strip()))
            except ValueError:
                raise forms.ValidationError(f"{item.strip()!r} is not {kind}") from None
    return values


class SweepForm(JobForm):
    """JobForm's fields make the base job; the grid fields say what to vary in it, the metric what is best."""

    name = forms.CharField(max_length=100, required=False, label="Sweep name",
                           help_text="each job is called “<sweep name> · <its grid values>”")
    methods = forms.MultipleChoiceField(
        choices=list(METHOD_LABELS.items()), required=False, widget=forms.CheckboxSelectMultiple,
        help_text="none checked: the base method only")
    ranks = forms.CharField(required=False, label="Ranks r", help_text="comma-separated, e.g. 4, 8, 16 (LoRA, DoRA, QLoRA)")
    learning_rates = forms.CharField(required=False, help_text="comma-separated, e.g. 1e-4, 3e-4")
    grid_json = forms.CharField(
        required=False, label="More grid keys (JSON)", widget=forms.Textarea(attrs={"rows": 3}),
        help_text='any other dotted JobSpec field, e.g. {"hyperparameters.batch_size": [4, 8]}')
    metric = forms.ChoiceField(
        choices=[(name, f"{objective.label} ({objective.direction})") for name, objective in SWEEP_METRICS.items()],
        initial="eval_loss", label="Best run by")

    # Grid field -> the JobSpec path it fills.
    GRID_KEYS = {"methods": "method.type", "ranks": "method.r", "learning_rates": "hyperparameters.learning_rate"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["method"].label = "Base method"
        self.fields["method"].help_text = (
            "its settings below carry over to its own points and its variants' (LoRA, DoRA, QLoRA); "
            "other methods start from their defaults")
        self.grid = None
        self.points_per_method = {}
        self.points = []

    def clean_ranks(self):
        return comma_separated(self.cleaned_data["ranks"], int, "a whole number")

    def clean_learning_rates(self):
        return comma_separated(self.cleaned_data["learning_rates"], float, "a number")

    def clean_grid_json(self):
        text = self.cleaned_data["grid_json"].strip()
        if not text:
            return {}
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(f"not valid JSON: {error}") from None
        if not isinstance(grid, dict) or not all(isinstance(values, list) for values in grid.values()):
            raise forms.ValidationError('give an object of dotted keys to lists of values, e.g. {"method.alpha": [16, 32]}')
        for field, key in self.GRID_KEYS.items():
            if key in grid:
                raise forms.ValidationError(f"{key} has its own field, {self[field].label.lower()}: give its values there")
        return grid

    def grid_from_fields(self):
        """The grid the fields describe; None while one of them does not parse."""
        if self.errors.keys() & {*self.GRID_KEYS, "grid_json"}:
            return None
        grid = {key: self.cleaned_data[field] for field, key in self.GRID_KEYS.items() if self.cleaned_data[field]}
        return grid | self.cleaned_data["grid_json"]

    def field_for_grid_key(self, key):
        fields = {key: field for field, key in self.GRID_KEYS.items()}
        return fields.get(key, "grid_json") if key else None

    def clean(self):
        super().clean()
        grid = self.grid_from_fields()
        if grid is None:
            return
        if not grid:
            self.add_error(None, "say what to sweep: check methods, or give ranks, learning rates or JSON grid keys")
            return
        try:
            self.grid = clean_grid(grid)
            # Counted even while the base job is incomplete, so the form can show the size as it is filled in.
            self.points_per_method = points_per_method(self.cleaned_data.get("method", "lora"), self.grid)
            if self.spec is not None and not self.errors:
                self.points = expand_grid(self.spec, self.grid)
        except GridError as error:
            self.add_error(self.field_for_grid_key(error.field), error.message)

    def size_summary(self):
        """What the preview says about the grid: jobs per method, and the keys some methods leave out."""
        return {
            "total": sum(self.points_per_method.values()),
            "per_method": [(METHOD_LABELS[method_type], count) for method_type, count in self.points_per_method.items()],
            "left_out": left_out_keys(self.cleaned_data.get("method", "lora"), self.grid) if self.grid else {},
        }
