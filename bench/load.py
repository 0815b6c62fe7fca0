"""Load: the web app on PostgreSQL under 50 concurrent clients, a burst of submissions, and dispatch time.

    createdb -h 127.0.0.1 -U postgres tunedeck_load
    .venv/bin/pip install -e ".[bench]"    # locust; gunicorn is a dependency of the app
    .venv/bin/python bench/load.py --database-url postgres://postgres@127.0.0.1:5432/tunedeck_load \\
        --redis-url redis://127.0.0.1:6379/11 --reset

1. Pages. Seeds 10,000 jobs with 100,000 metric rows (and 20,000 events) over four teams, plus
   one job of 100,000 steps, starts the app under gunicorn, and runs locust with 50 clients,
   each sending its next request as soon as the last is answered, against one endpoint at a time.
2. Burst. 1,000 job submissions through POST /api/jobs from 20 threads, for a team whose
   queued-jobs quota is 800: every answer must be 201 or 429, the database must hold exactly
   the 201s, each with its message in Redis, and the quota must hold.
3. Dispatch. One real worker (`celery worker -Q training --pool solo`), idle, and tiny jobs
   submitted one at a time through the API: started_at - created_at of each, cancelled as soon
   as it runs.

The database and the Redis db are the benchmark's own: --reset empties both first. Prints the
figures as tables and writes them to OUT/load.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEAMS = 4
JOBS = 10_000
METRIC_ROWS_PER_JOB = 10  # 9 training steps and 1 evaluation: 100,000 rows for 10,000 jobs
LONG_JOB_STEPS = 100_000
LONG_JOB_EVAL_EVERY = 1_000
DATASETS_PER_TEAM = 10
CLIENTS = 50
BURST_SUBMISSIONS = 1_000
BURST_CLIENTS = 20
BURST_QUOTA = 800
DISPATCH_JOBS = 20
# Most seeded jobs are finished, as on a dashboard that has been in use for a while.
STATUS_MIX = ["succeeded"] * 85 + ["failed"] * 5 + ["cancelled"] * 5 + ["queued"] * 3 + ["running"] + ["paused"]
TINY_SPEC = {
    "base_model": "tiny-random-llama",
    "method": {"type": "lora", "r": 4, "target_modules": "attention_qv"},
    "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_length": 32, "eval_fraction": 0,
                        "checkpoint_every": 1000},
}


def configure(args):
    """The environment of this process and of every process it starts (gunicorn, locust, the worker)."""
    if not args.database_url.startswith(("postgres://", "postgresql://")):
        sys.exit("the load benchmark runs on PostgreSQL: give --database-url postgres://…")
    if args.reset and urllib.parse.urlsplit(args.redis_url).path.strip("/") in ("", "0"):
        sys.exit("--reset empties the Redis db: give the benchmark one of its own, not db 0, the app's default")
    os.environ.update({
        "DATABASE_URL": args.database_url,
        "REDIS_URL": args.redis_url,
        "TUNEDECK_DATA_DIR": str(args.data_dir),
        "DEBUG": "false",  # as deployed: no query log kept in memory, no debug pages
        "SECRET_KEY": "bench-load-not-secret",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LOG_LEVEL": "WARNING",
    })
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()


# Seeding ---------------------------------------------------------------------------------------

def seed(reset):
    from django.core.management import call_command
    from django.db import connection

    from jobs.models import Job

    call_command("migrate", verbosity=0)
    if reset:
        import redis
        from django.conf import settings

        call_command("flush", interactive=False, verbosity=0)
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    elif Job.objects.exists():
        sys.exit("the database already holds jobs: run with --reset to empty it (and the Redis db) first")
    started = time.perf_counter()
    call_command("seed_demo", verbosity=0)
    world = seed_jobs()
    world |= seed_submitting_teams()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # the planner's statistics, which a database in use has
    print(f"seeded in {time.perf_counter() - started:.0f} s: {Job.objects.count():,} jobs")
    return world


def seed_jobs():
    """10,000 jobs of four teams, as workers leave them, with their metrics and events; one job of 100,000 steps."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.utils import timezone

    from jobs.models import BaseModel, Dataset, Job, JobEvent, Membership, Metric, Team, Worker
    from jobs.spec import JobSpec

    User = get_user_model()
    base_models = list(BaseModel.objects.filter(task="causal_lm_sft"))
    teams = [Team.objects.create(name=f"load-{n}") for n in range(TEAMS)]
    users = []
    for team in teams:
        user = User.objects.create_user(f"{team.name}-user")  # no password: the clients get sessions made here
        Membership.objects.create(team=team, user=user)
        users.append(user)
    datasets = {
        team.pk: Dataset.objects.bulk_create([
            Dataset(team=team, uploaded_by=user, name=f"{team.name}-data-{n}", original_filename=f"data-{n}.jsonl",
                    file=f"datasets/seeded/{team.name}-{n}.jsonl", size=40_000, sha256="0" * 64,
                    format="prompt_completion", rows=400, is_valid=True)
            for n in range(DATASETS_PER_TEAM)
        ])
        for team, user in zip(teams, users)
    }
    now = timezone.now()
    jobs = []
    for n in range(JOBS):
        team, user = teams[n % TEAMS], users[n % TEAMS]
        dataset = datasets[team.pk][n % DATASETS_PER_TEAM]
        status = STATUS_MIX[n % len(STATUS_MIX)]
        method = [{"type": "lora", "r": 8 * (1 + n % 4)}, {"type": "ia3"}, {"type": "adapter"}][n % 3]
        spec = JobSpec.model_validate({"base_model": base_models[0].name, "dataset": dataset.pk, "method": method,
                                       "hyperparameters": {"max_steps": 90, "learning_rate": 1e-3 * (1 + n % 5)}})
        finished = status in ("succeeded", "failed", "cancelled")
        steps = 90 if status == "succeeded" else 45
        jobs.append(Job(
            team=team, created_by=user, name=f"{team.name}-run-{n}", base_model=base_models[0], dataset=dataset,
            spec=spec.model_dump(mode="json"), status=status, step=steps if status != "queued" else 0,
            total_steps=90, tokens_seen=640 * steps, tokens_per_sec=1_500.0, train_loss=1.0 + (n % 7) / 10,
            eval_loss=1.1 + (n % 5) / 10, trainable_params=200_000, total_params=4_000_000,
            started_at=None if status == "queued" else now - timedelta(minutes=30),
            finished_at=now - timedelta(minutes=1) if finished else None,
            error_message="out of memory" if status == "failed" else "",
        ))
    jobs = Job.objects.bulk_create(jobs, batch_size=2_000)
    # created_at is set on insert; spread the jobs over the last weeks, newest last, as a real history is.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE jobs_job SET created_at = now() - make_interval(mins => (%s - id)::int * 5) "
                       "WHERE id >= %s", [jobs[-1].pk, jobs[0].pk])

    def metric_rows(job, steps, eval_every):
        for step in range(1, steps + 1):
            yield Metric(job_id=job.pk, step=step, train_loss=2.0 * 0.999 ** step + 0.5, learning_rate=1e-3,
                         tokens_per_sec=1_500.0, tokens_seen=64 * step)
            if step % eval_every == 0:
                yield Metric(job_id=job.pk, step=step, eval_loss=2.1 * 0.999 ** step + 0.5)

    for start in range(0, len(jobs), 1_000):
        Metric.objects.bulk_create(
            [row for job in jobs[start:start + 1_000] for row in metric_rows(job, METRIC_ROWS_PER_JOB - 1, 9)],
            batch_size=5_000,
        )
        JobEvent.objects.bulk_create([
            JobEvent(job_id=job.pk, kind="status", from_status=from_status, to_status=to_status,
                     message=f"{from_status or 'new'} → {to_status}")
            for job in jobs[start:start + 1_000]
            for from_status, to_status in (("", "queued"), ("queued", job.status))
        ], batch_size=5_000)

    long_job = Job.objects.create(
        team=teams[0], created_by=users[0], name="load-0-long-run", base_model=base_models[0],
        dataset=datasets[teams[0].pk][0], spec=jobs[0].spec, status="succeeded", step=LONG_JOB_STEPS,
        total_steps=LONG_JOB_STEPS, train_loss=0.5, started_at=now - timedelta(days=2), finished_at=now,
    )
    Metric.objects.bulk_create(metric_rows(long_job, LONG_JOB_STEPS, LONG_JOB_EVAL_EVERY), batch_size=10_000)

    running = [job for job in jobs if job.status == "running" and job.team_id == teams[0].pk][:4]
    for n, job in enumerate(running):
        worker = Worker.objects.create(hostname=f"gpu-{n}@load", queues="training", gpu_name="NVIDIA H100",
                                       gpu_memory_total_mb=81_559, memory_total_mb=256_000, current_job=job)
        Job.objects.filter(pk=job.pk).update(worker=worker)

    team_jobs = [job for job in jobs if job.team_id == teams[0].pk and job.status == "succeeded"]
    return {
        "load_user": users[0].pk,
        "visible_jobs": sum(1 for job in jobs if job.team_id == teams[0].pk) + 1,
        "job": team_jobs[0].pk,
        "long_job": long_job.pk,
        "compared": [job.pk for job in team_jobs[1:6]],
    }


def seed_submitting_teams():
    """A team with a queued-jobs quota for the burst, and one without for dispatch; each with a real dataset."""
    from django.contrib.auth import get_user_model

    from jobs import demo_data
    from jobs.models import ApiToken, Membership, Team
    from jobs.uploads import store_dataset

    User = get_user_model()
    world = {}
    for name, quota in (("burst", BURST_QUOTA), ("dispatch", None)):
        team = Team.objects.create(name=name, max_queued_jobs=quota)
        user = User.objects.create_user(f"{name}-user")
        Membership.objects.create(team=team, user=user)
        with tempfile.TemporaryDirectory() as scratch:
            path = demo_data.write_instruction_set(Path(scratch) / "reverse.jsonl", rows=64)
            dataset = store_dataset(team, user, "reverse.jsonl", Path(path).read_bytes())
        world[name] = {"team": team.pk, "token": ApiToken.issue(user, "bench")[1], "dataset": dataset.pk}
    return world


def sessions_of(user_pk, count):
    """Session keys of a logged-in user, made as a login makes them (no password hashing in the measured time)."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    user = get_user_model().objects.get(pk=user_pk)
    keys = []
    for _ in range(count):
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    return keys


# The server ------------------------------------------------------------------------------------

def start_server(port, workers, log_path):
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "webapp.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
         "--timeout", "120", "--no-control-socket"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5)
            return server
        except OSError:  # not listening yet, or its workers still booting
            time.sleep(0.5)
    server.terminate()
    sys.exit(f"gunicorn did not answer within 60 s; see {log_path}")


def stop(process):
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# 1. Pages --------------------------------------------------------------------------------------

def measure_pages(world, base_url, duration, out):
    sessions = ",".join(sessions_of(world["load_user"], CLIENTS))
    token = issue_token(world["load_user"])
    endpoints = [
        ("job list", "/jobs/", {"LOAD_SESSIONS": sessions}),
        ("job page", f"/jobs/{world['job']}/", {"LOAD_SESSIONS": sessions}),
        ("job page, 100,000-step job", f"/jobs/{world['long_job']}/", {"LOAD_SESSIONS": sessions}),
        ("compare, 5 runs", "/compare/?jobs=" + ",".join(map(str, world["compared"])), {"LOAD_SESSIONS": sessions}),
        ("dashboard", "/", {"LOAD_SESSIONS": sessions}),
        ("REST job list", "/api/jobs?limit=50", {"LOAD_TOKEN": token}),
        ("OpenAI job list", "/v1/fine_tuning/jobs?limit=50", {"LOAD_TOKEN": token}),
    ]
    figures = []
    for name, path, credentials in endpoints:
        wait_until_idle(base_url)
        prefix = out / f"locust-{len(figures)}"
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "load_users.py"), "--headless",
             "--users", str(CLIENTS), "--spawn-rate", str(CLIENTS), "--run-time", f"{duration}s",
             "--host", base_url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
            cwd=REPO, env=os.environ | credentials | {"LOAD_PATH": path, "LOAD_NAME": name}, check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Locust lists an endpoint once a request to it was answered; none answered in the time is a figure too.
        stats = next((row for row in read_csv(f"{prefix}_stats.csv") if row["Name"] == name), None)
        figures.append({
            "endpoint": name, "path": path, "load_average_before": os.getloadavg()[0],
            "requests": int(stats["Request Count"]) if stats else 0,
            "failures": int(stats["Failure Count"]) if stats else 0,
            "p50_ms": float(stats["50%"]) if stats else None, "p95_ms": float(stats["95%"]) if stats else None,
            "p99_ms": float(stats["99%"]) if stats else None,
            "requests_per_s": float(stats["Requests/s"]) if stats else 0.0,
        })
        print(f"  {name}: p50 {figures[-1]['p50_ms']} ms, p95 {figures[-1]['p95_ms']} ms, "
              f"{figures[-1]['requests_per_s']:.1f} requests/s, {figures[-1]['failures']} failed")
    return figures


def wait_until_idle(base_url, timeout=600):
    """Wait until the server answers at once: the requests of the last endpoint's clients, still queued
    when locust stopped, would otherwise be served first and counted against the next endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.perf_counter()
        urllib.request.urlopen(f"{base_url}/login/", timeout=timeout).read()
        if time.perf_counter() - started < 0.1:
            return
        time.sleep(1)
    sys.exit(f"the server was still busy after {timeout} s")


def issue_token(user_pk):
    from django.contrib.auth import get_user_model

    from jobs.models import ApiToken

    return ApiToken.issue(get_user_model().objects.get(pk=user_pk), "bench")[1]


def read_csv(path):
    import csv

    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# 2. Burst --------------------------------------------------------------------------------------

def post_json(url, token, body=None):
    """(status, parsed body) of a POST with a bearer token; an HTTP error is an answer too."""
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"detail": body[:200].decode(errors="replace")}


def measure_burst(world, base_url):
    from jobs.models import Job
    from workers.reconciler import job_ids_in_broker

    burst = world["burst"]
    spec = TINY_SPEC | {"dataset": burst["dataset"]}
    latencies = []

    def submit(_):
        started = time.perf_counter()
        answer = post_json(f"{base_url}/api/jobs", burst["token"], spec)
        latencies.append(time.perf_counter() - started)
        return answer

    started = time.perf_counter()
    with ThreadPoolExecutor(BURST_CLIENTS) as pool:
        answers = list(pool.map(submit, range(BURST_SUBMISSIONS)))
    elapsed = time.perf_counter() - started

    statuses = {}
    for status, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    created = {body["id"] for status, body in answers if status == 201}
    in_database = set(Job.objects.filter(team_id=burst["team"]).values_list("pk", flat=True))
    queued = Job.objects.filter(team_id=burst["team"], status="queued").count()
    in_broker = job_ids_in_broker()
    figures = {
        "submissions": BURST_SUBMISSIONS, "clients": BURST_CLIENTS, "quota": BURST_QUOTA,
        "answers": {str(status): count for status, count in sorted(statuses.items())},
        "seconds": round(elapsed, 2), "submissions_per_s": round(BURST_SUBMISSIONS / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * statistics.quantiles(latencies, n=20)[-1], 1),
        "jobs_in_database": len(in_database), "queued_in_database": queued, "quota_held": queued <= BURST_QUOTA,
        "database_matches_201s": in_database == created,
        "201s_without_message_in_redis": len(created - in_broker),
        "server_errors": sum(count for status, count in statuses.items() if status >= 500),
    }
    print(f"  {figures}")
    return figures


def clear_burst(world):
    """Cancel the burst's queued jobs and drop their messages, so that the worker of part 3 starts idle."""
    from django.contrib.auth import get_user_model

    from jobs import lifecycle
    from jobs.models import Job

    subprocess.run([sys.executable, "-m", "celery", "-A", "webapp", "purge", "-f", "-Q", "training"], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    staff = get_user_model().objects.get(username="admin")
    for job in Job.objects.filter(team_id=world["burst"]["team"], status="queued"):
        lifecycle.request_cancel(job, by_user=staff)


# 3. Dispatch -----------------------------------------------------------------------------------

def measure_dispatch(world, base_url, out, count):
    from jobs.models import Job, Worker

    dispatch = world["dispatch"]
    hostname = "bench-dispatch@load"
    with open(out / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", "training", "-c", "1", "--pool", "solo",
             "-n", hostname, "--without-gossip", "--without-mingle", "-l", "info"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: Worker.objects.filter(hostname=hostname, is_online=True).exists(), 120, "the worker to register")
        time.sleep(2)  # past registration: listening for messages
        waits = []
        for n in range(count):
            status, body = post_json(f"{base_url}/api/jobs", dispatch["token"],
                                     TINY_SPEC | {"dataset": dispatch["dataset"]})
            assert status == 201, body
            job_id = body["id"]
            job = wait_for(lambda: Job.objects.filter(pk=job_id).exclude(status="queued").first(), 60,
                           f"job {job_id} to start")
            waits.append((job.started_at - job.created_at).total_seconds())
            post_json(f"{base_url}/api/jobs/{job_id}/cancel", dispatch["token"])
            wait_for(lambda: Job.objects.filter(pk=job_id, status__in=["cancelled", "succeeded", "failed"]).exists()
                     and not Worker.objects.filter(hostname=hostname, current_job__isnull=False).exists(),
                     120, f"job {job_id} to end")
            time.sleep(1)  # the worker back to waiting on the broker: idle, as the measurement asks
        figures = {
            "jobs": count, "p50_ms": round(1000 * statistics.median(waits), 1),
            "p95_ms": round(1000 * statistics.quantiles(waits, n=20)[-1], 1),
            "max_ms": round(1000 * max(waits), 1),
            "all_ms": [round(1000 * wait, 1) for wait in waits],
        }
        print(f"  {figures}")
        return figures
    finally:
        stop(worker)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    sys.exit(f"timed out after {timeout} s waiting for {what}")


# ------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/tunedeck_load")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "tunedeck-load")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--reset", action="store_true", help="empty the database and the Redis db first")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per endpoint")
    parser.add_argument("--server-workers", type=int, default=2 * os.cpu_count() + 1,
                        help="gunicorn sync workers (default: 2 x cores + 1, as gunicorn's docs suggest)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--dispatch-jobs", type=int, default=DISPATCH_JOBS)
    parser.add_argument("--parts", default="pages,burst,dispatch", help="which parts to run, comma-separated")
    args = parser.parse_args()
    parts = args.parts.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    configure(args)

    print("seeding")
    world = seed(args.reset)
    base_url = f"http://127.0.0.1:{args.port}"
    results = {"seeded": {"jobs": JOBS + 1, "metric_rows": JOBS * METRIC_ROWS_PER_JOB,
                          "long_job_metric_rows": LONG_JOB_STEPS + LONG_JOB_STEPS // LONG_JOB_EVAL_EVERY,
                          "teams": TEAMS, "visible_to_the_clients": world["visible_jobs"]},
               "server": f"gunicorn, {args.server_workers} sync workers", "cpus": os.cpu_count()}
    server = start_server(args.port, args.server_workers, args.out / "gunicorn.log")
    try:
        if "pages" in parts:
            print(f"pages: {CLIENTS} clients, {args.duration} s per endpoint")
            results["pages"] = measure_pages(world, base_url, args.duration, args.out)
        if "burst" in parts:
            print(f"burst: {BURST_SUBMISSIONS} submissions from {BURST_CLIENTS} threads, quota {BURST_QUOTA}")
            results["burst"] = measure_burst(world, base_url)
            clear_burst(world)
        if "dispatch" in parts:
            print(f"dispatch: {args.dispatch_jobs} jobs, one at a time, to an idle worker")
            results["dispatch"] = measure_dispatch(world, base_url, args.out, args.dispatch_jobs)
    finally:
        stop(server)
    (args.out / "load.json").write_text(json.dumps(results, indent=2))
    report(results)


def report(results):
    if "pages" in results:
        print(f"\n| endpoint ({CLIENTS} clients) | p50 ms | p95 ms | requests/s | failed |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in results["pages"]:
            print(f"| {row['endpoint']} | {row['p50_ms']} | {row['p95_ms']} | {row['requests_per_s']:.1f} | "
                  f"{row['failures']} |")
    if "burst" in results:
        burst = results["burst"]
        print(f"\nburst: {burst['answers']} in {burst['seconds']} s ({burst['submissions_per_s']}/s); "
              f"{burst['jobs_in_database']} jobs in the database ({burst['queued_in_database']} queued, "
              f"quota {burst['quota']} held: {burst['quota_held']}), "
              f"matching the 201s: {burst['database_matches_201s']}; 201s without a message in Redis: "
              f"{burst['201s_without_message_in_redis']}; 5xx: {burst['server_errors']}")
    if "dispatch" in results:
        dispatch = results["dispatch"]
        print(f"dispatch, submit to running on an idle worker: p50 {dispatch['p50_ms']} ms, "
              f"p95 {dispatch['p95_ms']} ms, max {dispatch['max_ms']} ms over {dispatch['jobs']} jobs")


if __name__ == "__main__":
    main()
