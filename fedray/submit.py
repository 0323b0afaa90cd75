"""``fedray submit --address URL CONFIG``: run, tune or compare on a Ray cluster as a Ray job.

Uses Ray's job submission API (:class:`ray.job_submission.JobSubmissionClient`):
the working directory is uploaded (minus ``DEFAULT_EXCLUDES``) with an optional
runtime-env file merged in, the job runs ``fedray run|tune|compare CONFIG``
on the cluster, and this command follows its logs until it ends.

Conventions:

- The subcommand is taken from the config: a ``tune:`` section means
  ``tune``, a ``compare:`` section ``compare``, otherwise ``run``
  (``--command`` overrides). The config is validated here before submitting,
  and must lie inside the working directory (it travels with it).
- Results: the job copies its output to ``--storage`` (a local path or any
  ``pyarrow.fs`` URI, laid out like ``runtime.out_dir``). For a head on this
  machine the default is the absolute path of this caller's
  ``runtime.out_dir``, so the run folder is there when the command returns.
  For a remote head without ``--storage`` the job stores them in ``~/fedray-runs``
  on the head (a warning says so; see ``fedray.storage.JOB_STORAGE``).
- Authentication: Ray's token authentication is handled by Ray's client:
  with ``RAY_AUTH_MODE=token`` the token comes from ``RAY_AUTH_TOKEN`` or
  ``~/.ray/auth_token``. A refused request is one line, exit code 2.
- The job runs the ``fedray`` command of the cluster's Python environment
  (start ``ray start`` from the environment where fedray is installed, or use
  an image that has it).
"""
from __future__ import annotations

import contextlib
import ipaddress
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from fedray.errors import ConfigError, FedrayError

DEFAULT_EXCLUDES = [".venv/", "venv/", "runs/", ".git/", ".fedray_cache/", "**/__pycache__/", "*.egg-info/",
                    ".pytest_cache/", "build/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def check_address(address: str) -> str:
    u = urlparse(address)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError("--address", f"must look like http://HEAD:8265 (the Ray dashboard), got {address!r}")
    return address.rstrip("/")


def is_local_address(address: str) -> bool:
    """Whether the head at ``address`` runs on this machine (loopback or one of this host's addresses)."""
    host = urlparse(address).hostname
    if host is None:
        return False
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    if ipaddress.ip_address(ip).is_loopback:
        return True
    mine = set()
    try:
        mine.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return ip in mine


def detect_command(config_path: str | Path) -> str:
    from fedray.config import read_yaml

    raw = read_yaml(config_path)
    if "tune" in raw:
        return "tune"
    if "compare" in raw:
        return "compare"
    return "run"


def validate(command: str, config_path: str, overrides) -> "object":
    """Validate the config the way the subcommand will; returns the (base) ExperimentConfig."""
    if command == "run":
        from fedray import config as C

        return C.load(config_path, overrides)
    if command == "compare":
        from fedray import comparison as compare

        return compare.plan(config_path, overrides).base
    from fedray import tune

    return tune.load_spec(config_path, overrides).cfg


@contextlib.contextmanager
def _importable(folder: Path):
    """``folder`` first on ``sys.path`` for the duration (the job's driver and workers start in
    the uploaded working directory, so a plugin ``"mod:Name"`` is imported from there)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:
            pass


def entrypoint(command: str, config_rel: str, overrides, storage: str | None, *, resume: bool = False,
               run_path: str | None = None) -> str:
    """The job's command line; ``run_path``: the stored run folder a resumed ``run`` continues."""
    parts = ["fedray", command, "--resume", run_path] if run_path else ["fedray", command, config_rel]
    for o in overrides:
        parts += ["--set", o]
    if storage:
        parts += ["--storage", storage]
    if command in ("run", "compare"):
        parts.append("--quiet")
    if resume and command == "tune":
        parts.append("--resume")
    return shlex.join(parts)


def runtime_env(working_dir: str | Path, env_file: str | Path | None = None) -> dict:
    """``working_dir`` + default excludes, merged with a runtime-env YAML file (its ``excludes`` are added)."""
    env: dict = {}
    if env_file is not None:
        p = Path(env_file)
        if not p.is_file():
            raise ConfigError("--runtime-env", f"file '{p}' does not exist")
        try:
            env = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError("--runtime-env", f"'{p}' is not valid YAML") from None
        if not isinstance(env, dict):
            raise ConfigError("--runtime-env", f"'{p}' must hold a mapping")
    excludes = list(DEFAULT_EXCLUDES) + [e for e in env.get("excludes", []) or [] if e not in DEFAULT_EXCLUDES]
    # ``ray job stop`` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s);
    # a run needs longer to finish its aggregation, save a checkpoint and store its folder
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": "120", **(env.get("env_vars") or {})}
    env = {**env, "working_dir": str(Path(working_dir).resolve()), "excludes": excludes, "env_vars": env_vars}
    return env


CLIENT_LOGS = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
               "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")
"""Loggers of Ray's job client: a dozen INFO/WARNING lines per submission about packaging the
working directory (which files are ignored, the package name, the closed log stream)."""


@contextlib.contextmanager
def quiet_client_logs():
    """Only errors from Ray's job-client loggers while fedray submits and follows a job (its own
    ``submitted ...`` line says what was uploaded)."""
    import importlib
    import logging

    for name in CLIENT_LOGS:  # imported first: two of them set their own level when imported
        importlib.import_module(name)
    loggers = [logging.getLogger(n) for n in CLIENT_LOGS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def one_line(e: BaseException) -> str:
    """An exception's whole text on one line (Ray's messages span paragraphs)."""
    return " ".join(str(e).split()) or type(e).__name__


def client(address: str):
    """A JobSubmissionClient; an unreachable or refusing head is one FedrayError line."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, auth RuntimeError, bad URL...
        text = one_line(e)
        said = text.replace(address, "")  # a port such as 40383 is not an HTTP 403
        if isinstance(e, AuthenticationError) or re.search(r"\b40[13]\b|authenticat", said, re.I):
            raise FedrayError(f"the Ray cluster at {address} refused the request: {text}") from None
        raise FedrayError(f"cannot reach the Ray job server at {address}: {text}") from None


def follow(c, job_id: str, out=None) -> str:
    """Print the job's logs as they come; return its final status name."""
    import asyncio

    out = out or sys.stdout

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # log streaming is best effort; the status below is what counts
        pass
    while True:
        status = str(c.get_job_status(job_id))
        status = status.split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(1.0)


def submit(address: str, config_path: str, *, overrides=(), storage: str | None = None, command: str | None = None,
           working_dir: str = ".", env_file: str | None = None, wait: bool = True, resume: bool = False,
           out=None) -> dict:
    """Submit one job; returns ``{"job_id", "status", "storage", "entrypoint"}`` (status None with ``wait=False``)."""
    from fedray import storage as S

    address = check_address(address)
    command = command or detect_command(config_path)
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise ConfigError("--working-dir", f"folder '{working_dir}' does not exist")
    cfg_abs = Path(config_path).resolve()
    try:
        config_rel = cfg_abs.relative_to(wd).as_posix()
    except ValueError:
        raise ConfigError("config", f"'{config_path}' is outside the working directory '{wd}' that is uploaded") from None
    with _importable(wd):  # plugins named by import path resolve as the job will: from the working directory
        base = validate(command, config_path, overrides)
    if storage is not None:
        storage = S.normalize(storage)
    elif is_local_address(address):
        storage = str(Path(base.runtime.out_dir).resolve())
    with quiet_client_logs():
        return _submit(address, command, wd, config_rel, base, overrides, storage, env_file, wait, resume, out)


def _submit(address, command, wd, config_rel, base, overrides, storage, env_file, wait, resume, out) -> dict:
    from fedray import storage as S

    c = client(address)
    if storage is None:
        print(f"warning: no --storage given; results are stored in {S.JOB_STORAGE} on the head of {address}",
              file=sys.stderr)
    run_path = None
    if resume and command == "run":  # the interrupted run's folder, as the job stored it
        if storage is None:
            raise ConfigError("--resume", "a run resumes from its stored folder: give --storage (where the "
                                          "interrupted job stored it)")
        run_path = S.join(storage, base.experiment, base.run_name)
        from fedray.runtime import checkpoint

        where = base.runtime.checkpoint_dir or S.join(run_path, "checkpoint")
        if not checkpoint.exists(where):
            raise ConfigError("--resume", f"no checkpoint of the run at '{where}' to resume from")
    ep = entrypoint(command, config_rel, list(overrides), storage, resume=resume, run_path=run_path)
    try:
        job_id = c.submit_job(entrypoint=ep, runtime_env=runtime_env(wd, env_file))
    except Exception as e:
        raise FedrayError(f"job submission to {address} failed: {one_line(e)}") from None
    print(f"submitted {job_id} (working directory {wd} uploaded): {ep}", file=sys.stderr)
    status = follow(c, job_id, out) if wait else None
    return {"job_id": job_id, "status": status, "storage": storage, "entrypoint": ep}
