"""Every page route that takes an id answers 404 to a user of another team.

The routes come from the URL conf itself, so a new route cannot escape this test: one
whose kind of object is not known here fails it until it is added. (The /v1 routes have
their own generated test in test_api_tokens.py.)
"""

import pytest
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import URLResolver, get_resolver

from jobs.models import ApiToken, Artifact, Checkpoint, Job, Membership, Sweep
from jobs.spec import JobSpec
from jobs.submission import submit_job
from jobs.uploads import store_dataset

# URL name prefix -> which of alice's objects its <pk> refers to.
OBJECT_OF_ROUTE = {
    "dataset_": "dataset",
    "job_": "job",
    "artifact_": "artifact",
    "checkpoint_": "checkpoint",
    "sweep_": "sweep",
    "team_member_": "membership",
    "token_": "token",
}
# Routes that are not about a team's objects, each tested where it is built.
NOT_TEAM_OBJECTS = ("worker_",)  # staff only: tests/web/test_worker_admin.py
OWN_GENERATED_TESTS = ("api/", "v1/", "admin/")  # test_rest_api.py, test_api_tokens.py; Django's admin is staff only


def page_routes_with_an_id(patterns=None, prefix=""):
    """(route, pattern) for every page route that takes a <pk>, included URL confs too."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if not route.startswith(OWN_GENERATED_TESTS):
                yield from page_routes_with_an_id(pattern.url_patterns, route)
        elif "pk" in pattern.pattern.converters and not pattern.name.startswith(NOT_TEAM_OBJECTS):
            yield route, pattern


@pytest.fixture
def alices_objects(team_user, catalogue, data_dirs, django_capture_on_commit_callbacks):
    team = team_user.memberships.get().team
    dataset = store_dataset(team, team_user, "d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 4)
    with django_capture_on_commit_callbacks(execute=False):
        job = submit_job(team, team_user, JobSpec(base_model="tiny-random-llama", dataset=dataset.pk))
    artifact = Artifact(job=job, kind="adapter", size=3, sha256="0" * 64)
    artifact.file.save("adapter.zip", ContentFile(b"zip"), save=True)
    checkpoint = Checkpoint(job=job, step=5, path="checkpoints/step-000005", size=3)
    checkpoint.file.save("checkpoint.zip", ContentFile(b"zip"), save=True)
    job.log_file.save("trainer.log", ContentFile(b"alice's log"), save=True)
    return {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "job": job,
        "artifact": artifact,
        "membership": Membership.objects.get(user=team_user),
        "token": ApiToken.issue(team_user, "alice's")[0],
        "sweep": Sweep.objects.create(team=team, created_by=team_user, base_spec=job.spec, grid={"method.r": [4]}),
    }


def test_another_teams_objects_answer_404_on_every_page_route(alices_objects, other_team_user):
    bob = Client()
    bob.force_login(other_team_user)
    routes = list(page_routes_with_an_id())
    assert len(routes) >= 7
    for route, pattern in routes:
        kind = next((kind for prefix, kind in OBJECT_OF_ROUTE.items() if pattern.name.startswith(prefix)), None)
        assert kind, f"route {pattern.name!r} takes an id of an unknown kind: add it to OBJECT_OF_ROUTE"
        url = "/" + route.replace("<int:pk>", str(alices_objects[kind].pk))
        statuses = {method: getattr(bob, method)(url).status_code for method in ("get", "post")}
        # 405 only where the route does not take that method at all; the one it takes must say 404.
        assert set(statuses.values()) <= {404, 405} and 404 in statuses.values(), f"{url} answered {statuses}"
    # Nothing of alice's changed.
    assert Job.objects.get().status == "queued"
    assert Membership.objects.filter(pk=alices_objects["membership"].pk).exists()
    assert not ApiToken.objects.get(pk=alices_objects["token"].pk).is_revoked
