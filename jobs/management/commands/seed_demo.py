import tempfile
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from jobs import demo_data
from jobs.models import BaseModel, Dataset, Membership, Team
from jobs.uploads import store_dataset

DEMO_DATASETS = [
    ("demo-reverse-words", "reverse-words.jsonl", demo_data.write_instruction_set),
    ("demo-sentiment", "sentiment.csv", demo_data.write_classification_set),
]


class Command(BaseCommand):
    help = "Create the demo admin, team, base model catalogue and datasets (safe to run again)."

    def handle(self, **options):
        from workers.training.catalogue import describe_model
        from workers.training.tiny_model import build_tiny_llama, minilm_path

        User = get_user_model()
        admin, created = User.objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True, "email": "admin@localhost"}
        )
        if created:
            admin.set_password("admin")
            admin.save()
        team, _ = Team.objects.get_or_create(name="demo")
        Membership.objects.get_or_create(team=team, user=admin, defaults={"role": Membership.Role.ADMIN})

        tiny_path = Path(settings.MODELS_DIR) / "tiny-random-llama"
        build_tiny_llama(tiny_path)
        BaseModel.objects.update_or_create(
            name="tiny-random-llama",
            defaults={
                "path": str(tiny_path),
                "architecture_info": describe_model(tiny_path),
                "task": "causal_lm_sft",
                "architecture": BaseModel.Architecture.LLAMA,
                "description": "A few-million-parameter Llama with random weights and a byte-level tokenizer, made locally for demos and tests.",
                # Random weights learn only with a large step and LoRA on every linear layer.
                "suggested_settings": {"target_preset": "all_linear", "dropout": 0.0, "learning_rate": 0.01, "max_seq_length": 64},
            },
        )
        BaseModel.objects.update_or_create(
            name="all-MiniLM-L6-v2",
            defaults={
                "path": str(minilm_path()),
                "architecture_info": describe_model(minilm_path()),
                "task": "sequence_classification",
                "architecture": BaseModel.Architecture.BERT,
                "description": "The pretrained sentence-transformers MiniLM encoder (22M parameters), for classification.",
                "suggested_settings": {"learning_rate": 0.001, "max_seq_length": 64},
            },
        )

        with tempfile.TemporaryDirectory() as scratch:
            for name, filename, write in DEMO_DATASETS:
                if Dataset.objects.filter(team=team, name=name).exists():
                    continue
                path = Path(scratch) / filename
                write(path)
                store_dataset(team, admin, filename, path.read_bytes(), name=name)

        self.stdout.write(self.style.SUCCESS("Demo ready: team 'demo', models tiny-random-llama and all-MiniLM-L6-v2."))
        self.stdout.write(self.style.WARNING(
            "Log in as admin / admin. That password is for local use only: change it before anyone else can reach this server."
        ))
