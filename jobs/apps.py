from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import storage  # noqa: F401  (connects the receivers that delete the files of deleted rows)
