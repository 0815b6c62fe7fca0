"""The engine runs in a worker's child process and on machines with no web app: it never imports Django."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs a whole (short) job in one interpreter, then looks at what it imported.
RUN_THEN_LIST_DJANGO_MODULES = """
import sys
from workers.training.__main__ import main
status = main(sys.argv[1:])
django_modules = sorted(name for name in sys.modules if name == "django" or name.startswith("django."))
sys.stderr.write(f"django modules: {django_modules}\\n")
sys.exit(status or (3 if django_modules else 0))
"""


def test_a_whole_run_imports_nothing_of_django(
    tiny_llama_path, instruction_set, make_run, engine_environment, tmp_path
):
    run = make_run(tiny_llama_path, instruction_set, "prompt_completion", max_steps=2, checkpoint_every=1)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(run.model_dump_json())

    completed = subprocess.run(
        [sys.executable, "-c", RUN_THEN_LIST_DJANGO_MODULES, str(spec_path), str(tmp_path / "out")],
        cwd=REPO_ROOT,
        env=engine_environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert "django modules: []" in completed.stderr, completed.stderr[-3000:]
    assert completed.returncode == 0
