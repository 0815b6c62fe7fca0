"""What operators and their tools read: /healthz for the orchestrator, /metrics for Prometheus."""

import secrets

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.metrics import online_workers, registry

BROKER_TIMEOUT_SECONDS = 2  # a health check that hangs is worse than one that says "down"
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1"}
# Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever REMOTE_ADDR says.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")


def database_reachable():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        return False


def redis_reachable():
    # The URL from settings (not the Celery app's cached connection), so the check sees what is configured now.
    broker = Connection(settings.CELERY_BROKER_URL, connect_timeout=BROKER_TIMEOUT_SECONDS)
    try:
        broker.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
        broker.default_channel.client.ping()
        return True
    except Exception:  # kombu and redis-py raise a variety of errors for "not there"
        return False
    finally:
        broker.release()


@never_cache
@require_GET
def healthz(request):
    """200 when the database and Redis answer, else 503 naming what failed; no login, for orchestrators."""
    database_ok = database_reachable()
    checks = {
        "database": "ok" if database_ok else "unreachable",
        "redis": "ok" if redis_reachable() else "unreachable",
        # Reported, not judged: a site with no training worker online still serves its pages.
        "workers_online": online_workers().count() if database_ok else None,
    }
    healthy = checks["database"] == "ok" and checks["redis"] == "ok"
    return JsonResponse(checks, status=200 if healthy else 503)


def may_read_metrics(request):
    """With TUNEDECK_METRICS_TOKEN set, the bearer token; without it, only an unproxied request from this machine.

    Job names, team names and hostnames are not for the internet; a scraper on the same host needs no
    secret, and one elsewhere is given the token.
    """
    token = settings.TUNEDECK_METRICS_TOKEN
    if token:
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        return scheme == "Bearer" and secrets.compare_digest(offered.encode(), token.encode())
    return request.META.get("REMOTE_ADDR") in LOOPBACK_ADDRESSES and not any(
        header in request.META for header in PROXY_HEADERS
    )


@never_cache
@require_GET
def metrics(request):
    if not may_read_metrics(request):
        response = HttpResponse("metrics need the bearer token of TUNEDECK_METRICS_TOKEN\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = "Bearer"
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
]
