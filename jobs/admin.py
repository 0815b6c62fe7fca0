from django import forms
from django.contrib import admin

from .models import ApiToken, Artifact, BaseModel, Checkpoint, Dataset, Job, JobEvent, Membership, Metric, Team, Worker


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    inlines = [MembershipInline]


class BaseModelForm(forms.ModelForm):
    class Meta:
        model = BaseModel
        exclude = ["architecture_info"]

    def clean(self):
        from workers.training.catalogue import describe_model

        cleaned_data = super().clean()
        path = cleaned_data.get("path")
        if path:
            try:
                self.instance.architecture_info = describe_model(path, cleaned_data.get("trust_remote_code", False))
            except (OSError, ValueError) as error:
                self.add_error("path", f"cannot read a model at {path}: {error}")
        return cleaned_data


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    form = BaseModelForm
    list_display = ["name", "task", "architecture", "path"]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "format", "rows", "is_valid", "created_at"]
    list_filter = ["team", "format", "is_valid"]


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    readonly_fields = ["created_at", "kind", "from_status", "to_status", "message"]
    can_delete = False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "team", "base_model", "status", "step", "total_steps", "created_at"]
    list_filter = ["status", "team"]
    # Status is changed only through jobs.lifecycle, never by editing the row.
    readonly_fields = ["status", "started_at", "finished_at", "cancel_requested_at"]
    inlines = [JobEventInline]


@admin.register(Metric)
class MetricAdmin(admin.ModelAdmin):
    list_display = ["job", "step", "train_loss", "eval_loss", "tokens_per_sec", "mfu"]
    list_filter = ["job"]


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = ["job", "kind", "size", "sha256", "created_at"]


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ["hostname", "accelerator", "gpu_count", "is_online", "last_heartbeat", "current_job"]


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["job", "step", "path", "created_at"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created_at", "last_used_at", "revoked_at"]
    # The hash is useless to read and must not be edited into a known value.
    exclude = ["hashed_secret"]
    readonly_fields = ["prefix", "last_used_at"]


admin.site.register(Membership)
