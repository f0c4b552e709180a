#!/usr/bin/env python3
"""gpuqueue: a GPU job queue server for a small team sharing a few GPU nodes.

Users upload a Python script and a ``config.yaml``; the server queues the job on
the node with the least queued work, runs it there (or on whichever node falls
idle first, users taking turns), and hands back stdout, stderr and the exit
code.  One module, read top to bottom:

    configuration -> errors -> filesystem primitives -> spool -> tokens
    -> executors -> scheduler -> HTTP API -> drop folders -> admin control -> CLI

The spool directory is the only state.  Its layout::

    spool/
      server.lock, server.pid   held by the one server using this spool
      gq_node.py                the node program local jobs' wrappers run
      tmp/<id>/                 an upload being written; never acknowledged yet
      nodes/<n>/pending/<id>/   queued on node n (its planned node)
      nodes/<n>/running/<id>/   claimed by node n's scheduler
      nodes/<n>/drained         present while an admin has node n drained
      done/<id>/                finished: completed, failed or cancelled
      corrupt/<id>.<x>/         a folder that could not be understood; <id>.<x>.REASON says why
      incoming/                 drop folders (see the Drop folders section)
      control/                  admin requests to the running server (Admin control)

A job folder holds ``code.py`` and ``config.yaml`` (token removed), ``job.json``
(the submit record), ``start.json`` once claimed, ``launching`` once it may have
reached its node, ``slurm.json`` (Slurm's job id) on a Slurm node once sbatch
answered, ``cancel`` once a cancel is asked for, and ``result.json`` plus capped
``stdout``/``stderr`` once finished.
While a job runs, its work folder (``work/`` inside the job folder on a local
node, ``<workdir>/<id>`` on an SSH node) holds the files the job's wrapper
(``gq_node.py``) writes: ``launched``, ``pids``, ``stdout``, ``stderr`` and
``result.json``.

Every file is published where no reader looks yet (a temporary name, or a
folder still private to its writer), fsynced, renamed into place, and its
directory fsynced; every state change is one rename.

Recovery at start-up (what is on disk -> what happens):

    tmp/<id>                                 removed: its submit was never answered
    any job folder with result.json          moved to done/ (the move was cut short)
    folder without a readable job.json       moved to corrupt/, a .REASON file beside it
    running/<id> without start.json          back to pending/: it was never launched
    running/<id>, local, work/ not launched  claim the launch ourselves, back to pending/
    running/<id>, SSH, no ``launching``      back to pending/: nothing reached the node
    running/<id>, SSH, remote not launched   claim the launch there, back to pending/
    running/<id>, wrapper still running      re-attached and followed to its end
    running/<id>, wrapper left a result      its output and exit code collected
    running/<id>, wrapper gone, no result    failed with a clear error
    running/<id>, SSH node unreachable       retried with backoff; failed only once the
                                             node stays away ``unreachable_grace``
                                             seconds past the job's time limit
    running/<id>, Slurm, slurm.json          followed in Slurm by that id
    running/<id>, Slurm, launching, no id    looked up in Slurm by name (gq-<id>): followed
                                             if found; failed if it ran and Slurm forgot
                                             it; else back to pending/
    running/<id>, Slurm, no ``launching``    back to pending/: nothing reached sbatch
    incoming/NAME.<id>.accepted, no receipt  its job queued (unless it already is), then
                                             the receipt written

A job is never launched twice: the wrapper claims ``launched`` with O_EXCL before
it starts the job, and recovery claims the same name before requeueing one; a
Slurm job is looked up by name before it is submitted again.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import bottle
import click
import fabric
import filelock
import paramiko
import waitress
import waitress.channel
import waitress.task
import yaml

__version__ = "0.1.0"

log = logging.getLogger("gpuqueue")

###############################################################################
# Configuration ###############################################################
###############################################################################

#: Where ``--config`` points when not given and this file exists.
DEFAULT_CONFIG_FILE = "gpuqueue.yaml"

_REQUIRED = object()
_NUMBER = (int, float)

#: Top-level config keys: (accepted types, default).
_CONFIG_KEYS = {
    "host": (str, "0.0.0.0"),
    "port": (int, 8000),
    "spool": (str, "spool"),
    "tokens": (str, "tokens.yaml"),
    "timeout_multiplier": (_NUMBER, 2),
    "max_expected_time": (_NUMBER, 86400),
    "max_upload_bytes": (int, 16 * 1024 * 1024),
    "output_limit_bytes": (int, 10 * 1024 * 1024),
    "kill_grace": (_NUMBER, 10),
    "log_level": (str, "INFO"),
    "nodes": (list, None),
    "node_defaults": (dict, {}),
    "jump": (dict, None),
    "known_hosts": (str, "~/.ssh/known_hosts"),
    "accept_new_host_keys": (bool, False),
    "keep_remote_dirs": (bool, False),
    "unreachable_grace": (_NUMBER, 300),
    "max_pending_per_user": (int, 100),
    "min_free_bytes": (int, 1024 ** 3),
    "auth_failures_per_minute": (int, 10),
}

#: Keys of one entry under ``nodes`` (and of ``node_defaults``, less id and host).
_NODE_KEYS = {
    "id": (int, _REQUIRED),
    "host": (str, _REQUIRED),
    "port": (int, 22),
    "user": (str, None),
    "key_file": (str, None),
    "password_env": (str, None),
    "python": (str, None),
    "workdir": (str, "~/.gpuqueue"),
    "env": (dict, {}),
    "setup": (str, None),
    "gpus": (str, None),
    "kind": (str, None),
    "partition": (str, None),
    "account": (str, None),
    "gres": (str, None),
    "max_jobs": (int, 50),
}

#: What a node is: ``local`` (this machine; host "local"), ``ssh`` (a GPU machine
#: reached over SSH) or ``slurm`` (a Slurm cluster's login host, reached over SSH:
#: jobs go to sbatch; partition, account, gres and max_jobs are for this kind).
NODE_KINDS = ("local", "ssh", "slurm")

#: Keys of ``jump``: the SSH host every node is reached through.
_JUMP_KEYS = {
    "host": (str, _REQUIRED),
    "port": (int, 22),
    "user": (str, None),
    "key_file": (str, None),
    "password_env": (str, None),
}


class ConfigError(Exception):
    """The config file is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SshTarget:
    """Where and how to log in over SSH: a node or the jump host."""
    host: str
    port: int
    user: str | None
    key_file: str | None
    password_env: str | None


@dataclasses.dataclass(frozen=True)
class Node:
    id: int
    host: str
    python: str
    gpus: str
    env: dict
    workdir: str
    setup: str | None
    ssh: SshTarget | None  # None for a local node
    kind: str = "local"
    slurm: dict | None = None  # partition, account, gres, max_jobs of a slurm node

    @property
    def is_local(self):
        return self.ssh is None


@dataclasses.dataclass(frozen=True)
class Config:
    host: str
    port: int
    spool: Path
    tokens: Path
    timeout_multiplier: float
    max_expected_time: float
    max_upload_bytes: int
    output_limit_bytes: int
    kill_grace: float
    log_level: str
    nodes: tuple
    jump: SshTarget | None
    known_hosts: Path
    accept_new_host_keys: bool
    keep_remote_dirs: bool
    unreachable_grace: float
    max_pending_per_user: int
    min_free_bytes: int
    auth_failures_per_minute: int

    def time_limit(self, expected_time):
        """Seconds a job may run before it is killed as a timeout."""
        return self.timeout_multiplier * expected_time


def _checked(mapping, schema, where):
    """Return mapping with defaults filled in, refusing unknown keys and wrong types."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(map(str, mapping)) - set(schema))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    out = {}
    for key, (types, default) in schema.items():
        if key not in mapping:
            if default is _REQUIRED:
                raise ConfigError(f"{where}: missing key {key!r}")
            out[key] = default
            continue
        value = mapping[key]
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            names = "number" if types is _NUMBER else types.__name__
            raise ConfigError(f"{where}: {key!r} must be a {names}, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {key!r} must be finite")
        out[key] = value
    return out


def _path(value, base):
    return str((base / Path(value).expanduser()).resolve()) if value is not None else None


def _ssh_target(c, base):
    return SshTarget(host=c["host"], port=c["port"], user=c["user"],
                     key_file=_path(c["key_file"], base), password_env=c["password_env"])


def _node(raw, defaults, base, where):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    n = _checked({**defaults, **raw}, _NODE_KEYS, where)
    if not 0 <= n["id"] <= 9999:
        raise ConfigError(f"{where}: 'id' must be between 0 and 9999")
    if not 0 < n["port"] < 65536:
        raise ConfigError(f"{where}: 'port' must be a TCP port")
    local = n["host"] == "local"
    kind = n["kind"] or ("local" if local else "ssh")
    if kind not in NODE_KINDS or (kind == "local") != local:
        raise ConfigError(f"{where}: 'kind' must be local (with host: local), ssh or slurm")
    if kind == "slurm" and n["max_jobs"] < 1:
        raise ConfigError(f"{where}: 'max_jobs' must be at least 1")
    slurm = {k: n[k] for k in ("partition", "account", "gres", "max_jobs")}
    return Node(id=n["id"], host=n["host"],
                python=n["python"] or (sys.executable if local else "python3"),
                gpus=n["gpus"] if n["gpus"] is not None else str(n["id"]),
                env={str(k): str(v) for k, v in n["env"].items()},
                workdir=n["workdir"], setup=n["setup"],
                ssh=None if local else _ssh_target(n, base),
                kind=kind, slurm=slurm if kind == "slurm" else None)


def load_config(path=None):
    """Read the config file (or the built-in default: 8 local nodes) and check it."""
    if path is None:
        raw, base = {}, Path.cwd()
    else:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        base = path.resolve().parent
    c = _checked(raw, _CONFIG_KEYS, "config")
    for key in ("timeout_multiplier", "max_expected_time", "kill_grace", "unreachable_grace"):
        if c[key] <= 0:
            raise ConfigError(f"config: {key!r} must be above 0")
    for key in ("max_upload_bytes", "output_limit_bytes"):
        if c[key] < 1024:
            raise ConfigError(f"config: {key!r} must be at least 1024")
    for key in ("max_pending_per_user", "auth_failures_per_minute", "min_free_bytes"):
        if c[key] < (0 if key == "min_free_bytes" else 1):
            raise ConfigError(f"config: {key!r} is too small")
    if c["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("config: 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    raw_nodes = c["nodes"] if c["nodes"] is not None else [
        {"id": i, "host": "local"} for i in range(8)]
    if not raw_nodes:
        raise ConfigError("config: 'nodes' must list at least one node")
    defaults = c["node_defaults"]
    if {"id", "host"} & set(defaults):
        raise ConfigError("config: node_defaults may not set 'id' or 'host'")
    nodes = tuple(_node(n, defaults, base, f"config: nodes[{i}]") for i, n in enumerate(raw_nodes))
    if len({n.id for n in nodes}) != len(nodes):
        raise ConfigError("config: node ids must be unique")
    return Config(
        host=c["host"], port=c["port"], spool=base / c["spool"], tokens=base / c["tokens"],
        timeout_multiplier=float(c["timeout_multiplier"]),
        max_expected_time=float(c["max_expected_time"]),
        max_upload_bytes=c["max_upload_bytes"], output_limit_bytes=c["output_limit_bytes"],
        kill_grace=float(c["kill_grace"]), log_level=c["log_level"].upper(),
        nodes=tuple(sorted(nodes, key=lambda n: n.id)),
        jump=_ssh_target(_checked(c["jump"], _JUMP_KEYS, "config: jump"), base) if c["jump"] else None,
        known_hosts=Path(_path(c["known_hosts"], base)),
        accept_new_host_keys=c["accept_new_host_keys"], keep_remote_dirs=c["keep_remote_dirs"],
        unreachable_grace=float(c["unreachable_grace"]),
        max_pending_per_user=c["max_pending_per_user"], min_free_bytes=c["min_free_bytes"],
        auth_failures_per_minute=c["auth_failures_per_minute"])


###############################################################################
# Errors ######################################################################
###############################################################################


class ApiError(Exception):
    """An answer to the client: HTTP status and a message for ``{"error": ...}``."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class SpoolBusy(Exception):
    """Another server holds this spool."""


class QueueFull(Exception):
    """A user already has as many pending jobs as allowed."""


class NodeError(Exception):
    """A node could not be reached or answered wrongly; the message is shown in /api/nodes."""


###############################################################################
# Filesystem primitives #######################################################
###############################################################################


def fsync_dir(path):
    """Make a rename or create inside ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd, data):
    """os.write until all of ``data`` is written (a write may stop short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path, data, mode=0o644, sync_dir=True):
    """Publish ``data`` at ``path`` atomically: temp name, fsync, rename, fsync dir.

    ``sync_dir=False`` leaves the directory's fsync to a later write in the same folder.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_json(path, obj):
    write_file(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def read_capped(path, limit, opener=open, size=None):
    """Text of an output file, keeping its head and tail when over ``limit`` bytes.

    The tail holds the traceback of a failed job, so it is kept as well as the
    head.  ``opener`` and ``size`` let the same code read a file on a node by SFTP.
    """
    try:
        size = os.path.getsize(path) if size is None else size(path)
    except OSError:
        return ""
    with opener(path, "rb") as f:
        if size <= limit:
            data = f.read()
        else:
            half = limit // 2
            head = f.read(half)
            f.seek(size - half)
            note = (f"\n[gpuqueue: output truncated, {size - 2 * half} of {size} bytes cut here;"
                    f" the limit is {limit} bytes per stream]\n")
            data = head + note.encode() + f.read(half)
    return data.decode("utf-8", "replace")


def utcnow():
    return datetime.now(timezone.utc)


def isotime(ts):
    """ISO 8601 UTC for a Unix timestamp (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


###############################################################################
# Spool #######################################################################
###############################################################################

#: Job ids: 14 hex digits of microseconds since the epoch, then 10 random ones,
#: so that sorting ids sorts by submit time.
JOB_ID_RE = re.compile(r"\A[0-9a-f]{24}\Z")

STATES = ("pending", "running", "completed", "failed", "cancelled")
FINAL_STATES = STATES[2:]


def new_job_id():
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


@dataclasses.dataclass
class Job:
    """One job as the API shows it; ``status`` mirrors the folder the job is in."""
    id: str
    user_id: str
    competition_id: str
    project_id: str
    expected_time: float
    submitted_at: float
    node_id: int
    priority: int = 0
    status: str = "pending"
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    cancel_requested: bool = False
    slurm: dict | None = None  # on a slurm node: Slurm's id, state and reason, in memory

    META = ("id", "user_id", "competition_id", "project_id", "expected_time", "submitted_at",
            "priority")

    def meta(self):
        return {k: getattr(self, k) for k in self.META}

    @classmethod
    def from_meta(cls, meta, **state):
        """The job a job.json describes; ``priority`` may be absent (0)."""
        fields = {k: meta[k] for k in cls.META if k != "priority"}
        return cls(priority=int(meta.get("priority", 0)), **fields, **state)

    @property
    def state(self):
        """The status users see: a job that Slurm still holds back shows as pending."""
        if self.status == "running" and self.slurm and self.slurm["state"] in SLURM_WAITING:
            return "pending"
        return self.status

    def public(self):
        state = self.state
        out = {
            "job_id": self.id, "status": state, "node_id": self.node_id,
            "user_id": self.user_id, "competition_id": self.competition_id,
            "project_id": self.project_id, "expected_time": self.expected_time,
            "priority": self.priority, "submitted_at": isotime(self.submitted_at),
            "started_at": None if state == "pending" else isotime(self.started_at),
            "finished_at": isotime(self.finished_at), "exit_code": self.exit_code,
            "error": self.error,
        }
        if self.slurm:
            out.update(slurm_job_id=self.slurm["id"], slurm_state=self.slurm["state"],
                       slurm_reason=self.slurm["reason"])
        return out


class FairQueue:
    """One node's pending jobs in the order they are to run: higher ``priority``
    first; within a priority, users take turns (round-robin), each user's own
    jobs oldest first.  Whose turn it is comes from ``served`` ((priority, user)
    -> ticket of that user's last started job of that priority, shared by every
    node's queue): the user served longest ago goes next, so one user's 500 jobs
    do not hold back another's 5.  Turns are kept per priority, so that what
    runs first does not reorder what waits below it.
    """

    def __init__(self, served):
        self.served = served
        self.lanes = {}  # (priority, user) -> that user's pending ids, oldest first
        self.seconds = {}  # pending id -> its expected_time
        # Per lane, expected seconds of its first 0, 1, 2... jobs, so that a status
        # costs O(users), not O(jobs); extended on append, rebuilt after other changes.
        self._sums = {}

    def __len__(self):
        return len(self.seconds)

    def add(self, job):
        key = (job.priority, job.user_id)
        lane = self.lanes.setdefault(key, [])
        self.seconds[job.id] = job.expected_time
        if lane and lane[-1] > job.id:  # back into its place (a requeue)
            bisect.insort(lane, job.id)
            self._sums.pop(key, None)
            return
        lane.append(job.id)
        if key in self._sums:
            self._sums[key].append(self._sums[key][-1] + job.expected_time)

    def remove(self, job):
        key = (job.priority, job.user_id)
        lane = self.lanes[key]
        del lane[bisect.bisect_left(lane, job.id)]
        del self.seconds[job.id]
        self._sums.pop(key, None)
        if not lane:
            del self.lanes[key]

    def ids(self):
        """Every pending id, oldest first."""
        return sorted(self.seconds)

    def _turn(self, key):
        """The sort key of a lane's oldest job: the smallest runs next."""
        return (-key[0], self.served.get(key, 0), self.lanes[key][0])

    def _first(self, key, n):
        """(n, expected seconds) of a lane's first n jobs."""
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = list(itertools.accumulate(
                (self.seconds[i] for i in self.lanes[key]), initial=0.0))
        return n, sums[n]

    def head(self):
        """(turn, id) of the job to run next, or None when the queue is empty."""
        if not self.lanes:
            return None
        turn = min(self._turn(key) for key in self.lanes)
        return turn, turn[2]

    def ahead(self, job):
        """(how many jobs run before ``job`` if no other job arrives, their expected
        seconds), or None when ``job`` is not in this queue.  Each round gives
        every user of a priority one job, in the order of their turns."""
        mine = (job.priority, job.user_id)
        lane = self.lanes.get(mine, ())
        k = bisect.bisect_left(lane, job.id)
        if k == len(lane) or lane[k] != job.id:
            return None
        turn = self._turn(mine)
        count, seconds = self._first(mine, k)
        for key, ids in self.lanes.items():
            if key[0] > job.priority:
                n, t = self._first(key, len(ids))
            elif key[0] == job.priority and key != mine:
                n, t = self._first(key, min(len(ids), k + (self._turn(key) < turn)))
            else:
                continue
            count, seconds = count + n, seconds + t
        return count, seconds


class Spool:
    """The job folders on disk, and the one in-memory index of unfinished jobs.

    Every queue decision happens under ``self.lock``, a threading lock; the
    file lock server.lock, held from open() to close(), keeps other processes
    out.  The lock is never held while a job runs or a node is asked anything;
    fsyncs of whole job folders happen outside it.
    """

    def __init__(self, root, node_ids):
        self.root = Path(root)
        self.node_ids = tuple(node_ids)
        self._tlock = threading.Lock()
        self._server_lock = None
        self.changed = threading.Condition(self._tlock)
        #: Unfinished jobs by id: the only in-memory copy of queue state.  What
        #: follows is derived from it, kept up to date by _queue, _unqueue,
        #: claim and finish, so a submit never walks every queued job.
        self.active = {}
        #: Ticket of the last started job per (priority, user), for FairQueue's
        #: turns.  Kept in memory only: after a restart every user starts even.
        self.served = {}
        self._tickets = itertools.count(1)
        #: Pending jobs per node, in the order they are to run.
        self.queues = {n: FairQueue(self.served) for n in self.node_ids}
        #: Nodes an admin has drained: they start no job until resumed.  Each has
        #: a ``nodes/<n>/drained`` file, so this survives a restart.
        self.drained = set()
        #: Expected seconds of each node's pending jobs.
        self.queued = dict.fromkeys(self.node_ids, 0.0)
        #: Pending jobs per user.
        self.waiting = collections.Counter()
        #: Running jobs per node, by id.
        self.running_jobs = {n: {} for n in self.node_ids}
        #: Ids in done/, oldest first.
        self.done_ids = []
        #: An open fd of each node's pending/ folder: fsyncing a queue after a rename
        #: is then one syscall, not three, on the submit path.
        self._queue_fds = {}
        #: Finished-job counts per node and status, for /api/nodes.
        self.finished = {n: {"completed": 0, "failed": 0, "cancelled": 0} for n in self.node_ids}

    # -- layout --------------------------------------------------------------

    def pending_dir(self, node_id):
        return self.root / "nodes" / str(node_id) / "pending"

    def running_dir(self, node_id):
        return self.root / "nodes" / str(node_id) / "running"

    def folder(self, job):
        """Where an unfinished job's folder is now."""
        d = self.pending_dir if job.status == "pending" else self.running_dir
        return d(job.node_id) / job.id

    # -- opening and recovery ------------------------------------------------

    def open(self):
        """Take the spool for this server (or raise SpoolBusy), then recover it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._server_lock = filelock.FileLock(self.root / "server.lock")
        try:
            self._server_lock.acquire(timeout=0)
        except filelock.Timeout:
            try:
                pid = (self.root / "server.pid").read_text().strip()
            except OSError:
                pid = "unknown"
            raise SpoolBusy(f"another gpuqueue server (pid {pid}) is using the spool "
                            f"{self.root}; stop it first or choose another spool") from None
        write_file(self.root / "server.pid", f"{os.getpid()}\n")
        for d in ("tmp", "done", "corrupt", "incoming", "control"):
            (self.root / d).mkdir(exist_ok=True)
        for n in self.node_ids:
            self.pending_dir(n).mkdir(parents=True, exist_ok=True)
            self.running_dir(n).mkdir(parents=True, exist_ok=True)
            self._queue_fds[n] = os.open(self.pending_dir(n), os.O_RDONLY | os.O_DIRECTORY)
        with self.lock():
            self._recover()

    def close(self):
        for fd in self._queue_fds.values():
            os.close(fd)
        self._queue_fds.clear()
        if self._server_lock is not None:
            self._server_lock.release()

    def lock(self):
        """The queue lock.  A threading lock is enough: server.lock, a file lock held
        for the server's whole life, keeps every other process out of the spool."""
        return self._tlock

    def _recover(self):
        """Bring the folders back to a true state; see the module docstring."""
        for leftover in (self.root / "tmp").iterdir():
            log.warning("removing unacknowledged upload %s", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)
        for name in os.listdir(self.root / "done"):
            if JOB_ID_RE.match(name):
                self._count_finished(self.root / "done" / name)
        for n in self.node_ids:
            if self._drained_marker(n).exists():
                self.drained.add(n)
            for status, d in (("pending", self.pending_dir(n)), ("running", self.running_dir(n))):
                for folder in sorted(d.iterdir()):
                    job = self._load(folder, n, status)
                    if job is None:
                        continue
                    self.active[job.id] = job
                    if job.status == "pending":
                        self._queue(job)
                    else:
                        self.running_jobs[n][job.id] = job
        self.done_ids.sort()
        for d in self.node_ids:
            self._sync_queue(d)

    def _load(self, folder, node_id, status):
        """Read an unfinished job's folder; finish interrupted moves; quarantine junk."""
        if (folder / "result.json").exists():
            self._move_to_done(folder)
            return None
        try:
            meta = read_json(folder / "job.json")
            job = Job.from_meta(meta, node_id=node_id, status=status)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._quarantine(folder, f"unreadable job.json: {exc}")
            return None
        job.cancel_requested = (folder / "cancel").exists()
        if status == "running":
            try:
                job.started_at = read_json(folder / "start.json")["started_at"]
            except (OSError, ValueError, KeyError):
                os.rename(folder, self.pending_dir(node_id) / folder.name)
                job.status = "pending"
                log.info("job %s was claimed but never started: queued again", job.id)
        return job

    def _move_to_done(self, folder):
        dest = self.root / "done" / folder.name
        os.rename(folder, dest)
        fsync_dir(folder.parent)
        self._count_finished(dest)

    def _count_finished(self, folder):
        try:
            r = read_json(folder / "result.json")
            self.finished[r["node_id"]][r["status"]] += 1
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.done_ids.append(folder.name)

    def _queue(self, job):
        """Put a pending job into its node's queue (under the lock)."""
        self.queues[job.node_id].add(job)
        self.queued[job.node_id] += job.expected_time
        self.waiting[job.user_id] += 1

    def _unqueue(self, job):
        """Take a pending job out of its node's queue (under the lock)."""
        self.queues[job.node_id].remove(job)
        self.queued[job.node_id] -= job.expected_time
        self.waiting[job.user_id] -= 1

    def _quarantine(self, folder, reason):
        """Set aside what cannot be understood, never delete it; the reason goes beside it."""
        dest = self.root / "corrupt" / f"{folder.name}.{secrets.token_hex(3)}"
        os.rename(folder, dest)
        write_file(dest.with_name(dest.name + ".REASON"), reason + "\n")
        log.error("quarantined %s: %s", folder, reason)

    # -- submit --------------------------------------------------------------

    def stage(self, job, code, config_data):
        """Write a new job's folder under tmp/, durably, before it is queued."""
        folder = self.root / "tmp" / job.id
        os.mkdir(folder)
        # The folder is private until enqueue renames it into a queue, so its files
        # need no temporary names.  All three are written before any is fsynced, so
        # that one journal commit can carry them all; and plain fds, since each extra
        # syscall is a GIL hand-off between eight busy threads.
        fds = []
        try:
            for name, data in (("code.py", code), ("config.yaml", config_data),
                               ("job.json", json.dumps(job.meta()).encode())):
                fds.append(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                write_all(fds[-1], data)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        fsync_dir(folder)
        return folder

    def enqueue(self, job, staged, online, max_pending):
        """Queue a staged job on the least-loaded node; returns queue_position's pair.

        Raises QueueFull (and leaves the staged folder) when the job's user already
        has ``max_pending`` pending jobs.
        """
        with self.lock():
            if self.waiting[job.user_id] >= max_pending:
                raise QueueFull(self.waiting[job.user_id])
            loads = self._queued_seconds()
            open_ = [n for n in self.node_ids if n not in self.drained]
            # Offline nodes only when none is online; drained ones only when all are.
            candidates = [n for n in open_ if n in online] or open_ or list(self.node_ids)
            job.node_id = min(candidates, key=lambda n: (loads[n], n))
            os.rename(staged, self.pending_dir(job.node_id) / job.id)
            self.active[job.id] = job
            self._queue(job)
            position = self._position(job)
        # The rename is in the journal once this folder is synced; tmp/ needs no sync
        # of its own: after a crash the job is in one place or the other, never both.
        self._sync_queue(job.node_id)
        return position

    def _sync_queue(self, node_id):
        """Make renames into and out of a node's pending/ survive a power cut."""
        os.fsync(self._queue_fds[node_id])

    def _queued_seconds(self, node_id=None):
        """Per node (or for one): expected seconds of its pending jobs plus what
        remains of its running one."""
        now = time.time()
        loads = dict(self.queued)
        for n, running in self.running_jobs.items():
            for job in running.values():
                loads[n] += max(0.0, job.expected_time - (now - (job.started_at or now)))
        return loads if node_id is None else loads[node_id]

    # -- scheduler side ------------------------------------------------------

    def claim(self, node_id):
        """Move the job whose turn it is (see FairQueue) to this node's running/:
        from its own queue, or from the queue of a node that cannot start it now
        (busy or drained).  Placement goes by estimates, which are often wrong: no
        node should idle, nor a user wait, while another node holds their job.
        None when there is nothing to run, or the node is drained."""
        with self.lock():
            if node_id in self.drained:
                return None
            heads = [(q.head(), n) for n, q in self.queues.items() if len(q) and (
                n == node_id or self.running_jobs[n] or n in self.drained)]
            if not heads:
                return None
            (_, job_id), donor = min(heads)
            job = self.active[job_id]
            os.rename(self.pending_dir(donor) / job.id, self.running_dir(node_id) / job.id)
            self._unqueue(job)
            job.node_id, job.status, job.started_at = node_id, "running", time.time()
            self.running_jobs[node_id][job.id] = job
            self.served[job.priority, job.user_id] = next(self._tickets)
        fsync_dir(self.running_dir(node_id))
        self._sync_queue(donor)
        if donor != node_id:
            log.info("job %s planned for node %s taken by idle node %s", job.id, donor, node_id)
        write_json(self.folder(job) / "start.json", {"started_at": job.started_at, "node_id": node_id})
        return job

    def running(self, node_id):
        return list(self.running_jobs[node_id].values())

    def finish(self, job, status, exit_code=None, error=None, stdout="", stderr=""):
        """Record a running job's outcome in its folder, then move the folder to done/."""
        folder = self.folder(job)
        self._write_result(job, folder, status, exit_code, error, stdout, stderr)
        with self.lock():
            del self.running_jobs[job.node_id][job.id]
            self._retire(job, folder, status, exit_code, error)
        self._finished(job, folder, status, error)

    def _write_result(self, job, folder, status, exit_code, error, stdout, stderr):
        job.finished_at = time.time()
        write_file(folder / "stdout", stdout, sync_dir=False)
        write_file(folder / "stderr", stderr, sync_dir=False)
        result = {"status": status, "exit_code": exit_code, "error": error, "node_id": job.node_id,
                  "started_at": job.started_at, "finished_at": job.finished_at}
        if job.slurm:
            result["slurm"] = {k: job.slurm[k] for k in ("id", "state", "reason")}
        write_json(folder / "result.json", result)

    def _retire(self, job, folder, status, exit_code, error):
        """The one move to done/ (under the lock)."""
        os.rename(folder, self.root / "done" / job.id)
        del self.active[job.id]
        job.status, job.exit_code, job.error = status, exit_code, error
        self.finished[job.node_id][status] += 1
        bisect.insort(self.done_ids, job.id)
        self.changed.notify_all()

    def _finished(self, job, folder, status, error):
        fsync_dir(folder.parent)
        shutil.rmtree(self.root / "done" / job.id / "work", ignore_errors=True)
        log.info("job %s user=%s node=%s %s%s", job.id, job.user_id, job.node_id, status,
                 f" ({error})" if error else "")

    # -- API side ------------------------------------------------------------

    def get(self, job_id):
        """The job with this (already validated) id, or None."""
        job = self.active.get(job_id)
        if job is not None:
            return job
        folder = self.root / "done" / job_id
        try:
            meta = read_json(folder / "job.json")
            r = read_json(folder / "result.json")
        except (OSError, ValueError):
            return None
        return Job.from_meta(meta, node_id=r["node_id"], status=r["status"],
                             started_at=r["started_at"], finished_at=r["finished_at"],
                             exit_code=r["exit_code"], error=r["error"], slurm=r.get("slurm"))

    def output(self, job_id):
        folder = self.root / "done" / job_id
        return tuple(read_capped(folder / name, sys.maxsize) for name in ("stdout", "stderr"))

    def queue_position(self, job):
        """(jobs ahead of it in its node's queue, estimated start time), or
        (None, None) when the job is not pending.  The estimate adds the expected
        times of the running job's rest and of those ahead; work taken by idle
        nodes can only make it earlier."""
        with self._tlock:
            return self._position(job)

    def _position(self, job):
        ahead = self.queues[job.node_id].ahead(job)
        if ahead is None:
            return None, None
        running = self._queued_seconds(job.node_id) - self.queued[job.node_id]
        return ahead[0], time.time() + running + ahead[1]

    def request_cancel(self, job):
        """Cancel a pending job now, or mark a running one for its scheduler to kill.

        Returns False when the job had already finished.
        """
        with self.lock():
            if job.id not in self.active:
                return False
            job.cancel_requested = True
            folder = self.folder(job)
            if job.status == "running":
                write_file(folder / "cancel", b"")
                return True
            # Done whole under the lock, so that no scheduler claims it half-way.
            self._unqueue(job)
            self._write_result(job, folder, "cancelled", None, "cancelled while pending", "", "")
            self._retire(job, folder, "cancelled", None, "cancelled while pending")
        self._finished(job, folder, "cancelled", "cancelled while pending")
        return True

    def wait_finished(self, job, timeout):
        with self.changed:
            self.changed.wait_for(lambda: job.id not in self.active, timeout)
        return job.id not in self.active

    def job_ids(self, before=None):
        """Job ids newest first, only those older than ``before`` when it is given."""
        with self._tlock:
            active = sorted(self.active)
            done = self.done_ids[:bisect.bisect_left(self.done_ids, before)] if before \
                else self.done_ids[:]
        if before:
            active = active[:bisect.bisect_left(active, before)]
        return heapq.merge(reversed(active), reversed(done), reverse=True)

    def find(self, user=None, status=None, limit=100, before=None):
        """Up to ``limit`` jobs, newest first, of ``user`` and in ``status`` when
        given, older than the id ``before``; and the cursor for the next page (None
        on the last)."""
        found = []
        for job_id in self.job_ids(before=before):
            job = self.get(job_id)
            if job is None or (user and job.user_id != user) or (status and job.state != status):
                continue
            if len(found) == limit:
                return found, found[-1].id
            found.append(job)
        return found, None

    def node_stats(self):
        loads = self._queued_seconds()
        return {n: {"queued_jobs": len(self.queues[n]), "queued_seconds": round(loads[n], 3),
                    "completed": self.finished[n]["completed"], "failed": self.finished[n]["failed"],
                    "cancelled": self.finished[n]["cancelled"]} for n in self.node_ids}

    def move_pending(self, node_id, online):
        """Move a node's pending jobs to the least-loaded of ``online`` nodes that
        are not drained, oldest first.  Returns the nodes that received jobs.
        """
        online = [n for n in online if n not in self.drained and n != node_id]
        if not online or not self.queues[node_id]:
            return set()
        moved = set()
        with self.lock():
            loads = self._queued_seconds()
            for job_id in self.queues[node_id].ids():
                job = self.active[job_id]
                dest = min(online, key=lambda n: (loads[n], n))
                os.rename(self.pending_dir(node_id) / job_id, self.pending_dir(dest) / job_id)
                self._unqueue(job)
                job.node_id = dest
                self._queue(job)
                loads[dest] += job.expected_time
                moved.add(dest)
        for n in moved | {node_id}:
            self._sync_queue(n)
        log.info("node %s: pending jobs moved to nodes %s", node_id, sorted(moved))
        return moved

    def _drained_marker(self, node_id):
        return self.root / "nodes" / str(node_id) / "drained"

    def set_drained(self, node_id, drained):
        """Drain a node (it starts no more jobs) or resume it; on disk first."""
        marker = self._drained_marker(node_id)
        with self.lock():
            if drained:
                write_file(marker, b"")
                self.drained.add(node_id)
            else:
                marker.unlink(missing_ok=True)
                fsync_dir(marker.parent)
                self.drained.discard(node_id)

    def requeue(self, job):
        """Put a claimed job that never launched back at its place in its node's queue."""
        folder = self.folder(job)
        shutil.rmtree(folder / "work", ignore_errors=True)
        (folder / "start.json").unlink(missing_ok=True)
        with self.lock():
            os.rename(folder, self.pending_dir(job.node_id) / job.id)
            del self.running_jobs[job.node_id][job.id]
            job.status, job.started_at = "pending", None
            self._queue(job)
        self._sync_queue(job.node_id)
        fsync_dir(self.running_dir(job.node_id))


###############################################################################
# Tokens ######################################################################
###############################################################################

#: User names: what may stand in ``user_id`` and in a token record.
USER_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

#: A token chosen by an admin must be at least this long; generated ones are 43.
MIN_TOKEN_LENGTH = 16


def token_hash(token):
    """SHA-256 of the token.  Tokens are long random strings, so a fast hash is
    enough to make a stolen tokens.yaml useless, and a lookup stays cheap."""
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(hash_hex):
    """A short name for a token that reveals nothing about it."""
    return hash_hex[:12]


def _expiry(value):
    """When a token record expires, read leniently: an admin may have edited the
    file by hand (YAML turns unquoted dates into date objects).  A value that
    cannot be read counts as already expired."""
    if value is None:
        return datetime.max.replace(tzinfo=timezone.utc)
    try:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        elif not isinstance(value, datetime):  # a bare date
            value = datetime(value.year, value.month, value.day)
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    except (ValueError, TypeError, AttributeError):
        log.error("token record has an unreadable 'expires': %r", value)
        return datetime.min.replace(tzinfo=timezone.utc)


class Tokens:
    """The token file: hashes only, written atomically with mode 0600.

    The server re-reads it whenever it changes on disk, so ``tokens`` commands
    take effect at once without a restart.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = None
        self._records = []

    def _read(self):
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except FileNotFoundError:
            return []
        records = data.get("tokens", []) if isinstance(data, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{self.path} is not a gpuqueue token file")
        return records

    def records(self):
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                try:
                    self._records = self._read()
                except (OSError, ValueError, yaml.YAMLError) as exc:
                    log.error("token file unreadable, refusing every token: %s", exc)
                    self._records = []
                self._seen = seen
            return self._records

    def authenticate(self, token):
        """The record of a valid token; ApiError 401 otherwise."""
        if not token:
            raise ApiError(401, "missing token: send 'Authorization: Bearer <token>'")
        digest = token_hash(token)
        match = None
        for rec in self.records():
            if hmac.compare_digest(str(rec.get("sha256", "")), digest):
                match = rec
        if match is None:
            raise ApiError(401, "invalid token")
        if match.get("revoked"):
            raise ApiError(401, "token revoked")
        if _expiry(match.get("expires")) <= utcnow():
            raise ApiError(401, "token expired")
        return match

    # -- admin side (CLI) ----------------------------------------------------

    def _change(self, edit):
        """Read, edit and rewrite the file under a lock, so two admins lose nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock"):
            records = self._read()
            result = edit(records)
            write_file(self.path, yaml.safe_dump({"tokens": records}, sort_keys=False), mode=0o600)
        return result

    def create(self, user, token, days, admin):
        if not USER_RE.match(user):
            raise click.ClickException("user must be 1-64 letters, digits or . _ @ - characters")
        if token is None:
            token = secrets.token_urlsafe(32).lstrip("-")  # a leading '-' reads as an option
        elif len(token) < MIN_TOKEN_LENGTH:
            raise click.ClickException(f"a token must be at least {MIN_TOKEN_LENGTH} characters")
        now = utcnow()
        rec = {"sha256": token_hash(token), "user": user, "admin": bool(admin),
               "created": now.isoformat(timespec="seconds"),
               "expires": (now + timedelta(days=days)).isoformat(timespec="seconds"),
               "revoked": None}

        def add(records):
            if any(r.get("sha256") == rec["sha256"] for r in records):
                raise click.ClickException("that token already exists")
            records.append(rec)
        self._change(add)
        return token, rec

    def revoke(self, token_or_fingerprint):
        def mark(records):
            key = token_or_fingerprint
            hits = [r for r in records
                    if r.get("sha256") == token_hash(key)
                    or (len(key) >= 6 and str(r.get("sha256", "")).startswith(key))]
            if len(hits) != 1:
                raise click.ClickException("no such token" if not hits else
                                           "that fingerprint matches several tokens")
            hits[0]["revoked"] = utcnow().isoformat(timespec="seconds")
            return hits[0]
        return self._change(mark)


class AuthThrottle:
    """Slows token guessing: an address that presents more than ``limit`` bad
    tokens within a minute gets 429 until that minute is over."""

    WINDOW = 60.0
    #: Addresses remembered at most; the oldest windows are forgotten first.
    MAX_ADDRESSES = 10000

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._failures = {}  # address -> [window start, count]

    def check(self, addr):
        with self._lock:
            start, count = self._failures.get(addr, (0.0, 0))
            if count >= self.limit and time.monotonic() - start < self.WINDOW:
                raise ApiError(429, "too many failed authentications from this address; "
                                    "try again in a minute")

    def failed(self, addr):
        now = time.monotonic()
        with self._lock:
            entry = self._failures.get(addr)
            if entry is None or now - entry[0] >= self.WINDOW:
                if len(self._failures) >= self.MAX_ADDRESSES:
                    oldest = min(self._failures, key=lambda a: self._failures[a][0])
                    del self._failures[oldest]
                entry = self._failures[addr] = [now, 0]
            entry[1] += 1


###############################################################################
# Executors ###################################################################
###############################################################################
# An executor starts a job on its node and learns how it ended.  Every node
# runs the same wrapper next to the job: it starts code.py in a session of its
# own, enforces the time limit there, kills the job's whole process group on
# SIGTERM (a cancel) or timeout, and leaves result.json behind.  The server
# only launches the wrapper, signals it, and reads its files, so a job ends on
# time even while the server is down, and a restarted server can pick it up.

NODE_PROGRAM = r'''"""gpuqueue's program on a node, written there by the server (no user data in it).

``python gq_node.py run LIMIT GRACE`` is a job's wrapper, in the job's folder: it runs
code.py in a session of its own, kills the job's whole process group on SIGTERM (a
cancel) or at the time limit, and leaves result.json: {"exit_code": N, "reason": null,
"timeout" or "cancelled"}.  It prints {"wrapper": pid, "job": pid} once a SIGTERM
would be taken as a cancel.

``python gq_node.py serve`` is a node's agent, one per SSH connection, started in the
node's workdir.  It reads one JSON command a line (start, cancel, watch, remove, gpus)
and writes one JSON report a line (ready, started, exited, gpus).  It forks a wrapper for each
job, so a job costs no shell or interpreter start-up beyond its own, and the wrappers
live on if the agent or the link dies.
"""
import json, os, signal, subprocess, sys, time

# What only the agent needs is imported in serve(): a job's wrapper starts with
# every job, and these imports alone took a third of its start-up.
GPU_QUERY = @GPU_QUERY@


def gpu_csv():
    """nvidia-smi's reading of this machine's GPUs, or None where there is none."""
    try:
        r = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def put(name, obj):
    with open("." + name, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename("." + name, name)


def proc_state(pid):
    """(state letter, process group) of a process, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def members(pgid):
    """Live (not zombie) processes in the process group, from /proc."""
    live = []
    for pid in os.listdir("/proc"):
        st = proc_state(pid) if pid.isdigit() else None
        if st and st[0] != "Z" and st[1] == pgid:
            live.append(pid)
    return live


def kill_group(pgid, grace):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return  # nothing left in the group: no need to read /proc
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while members(pgid) and time.monotonic() < end:
            time.sleep(0.02)


def wrap(limit, grace, report):
    """Run code.py in the current folder to its end, leaving result.json."""
    try:
        os.close(os.open("launched", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return 75  # launched before, or voided by a recovering server
    env = dict(os.environ)
    with open("env.json") as f:
        env.update(json.load(f))
    waited = {signal.SIGCHLD, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    with open("stdout", "wb") as out, open("stderr", "wb") as err:
        job = subprocess.Popen(
            [sys.executable, "code.py"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=env, start_new_session=True,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, waited))
    pids = {"wrapper": os.getpid(), "job": job.pid}
    put("pids", pids)
    report(pids)
    deadline = time.monotonic() + limit
    reason = None
    while True:
        pid, status = os.waitpid(job.pid, os.WNOHANG)
        if pid:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
        else:
            got = signal.sigtimedwait(waited, min(left, 5.0))
            if got is not None and got.si_signo == signal.SIGTERM:
                reason = "cancelled"
        if reason:
            kill_group(job.pid, grace)
            pid, status = os.waitpid(job.pid, 0)
            break
    kill_group(job.pid, grace)  # whatever the job left behind in its group
    put("result.json", {"exit_code": os.waitstatus_to_exitcode(status), "reason": reason})
    return 0


def say(obj):
    os.write(1, (json.dumps(obj) + "\n").encode())


def start(cmd):
    """Fork a wrapper for a job folder; it gets a session of its own."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        os.chdir(cmd["dir"])
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(os.open("wrapper.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        with open("env.json", "w") as f:
            json.dump(cmd["env"], f)
        code = wrap(float(cmd["limit"]), float(cmd["grace"]), lambda pids: None)
    except BaseException as exc:
        os.write(2, ("gq_node: %r\n" % (exc,)).encode())
    finally:
        os._exit(code)


def outcome(cmd):
    """A finished wrapper's result and output, for its exit report, when the output
    is small enough to travel on the agent's channel; else nothing (the server
    then reads the files)."""
    import base64
    try:
        paths = [os.path.join(cmd["dir"], name) for name in ("stdout", "stderr")]
        if sum(os.path.getsize(p) for p in paths) > cmd.get("inline", 0):
            return {}
        with open(os.path.join(cmd["dir"], "result.json")) as f:
            found = {"result": json.load(f)}
        for name, path in zip(("stdout", "stderr"), paths):
            with open(path, "rb") as f:
                found[name] = base64.b64encode(f.read()).decode()
        return found
    except (OSError, ValueError):
        return {}


def serve():
    import re, selectors, shutil
    job_dir = re.compile(r"\A[0-9a-f]{24}\Z")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # wrappers inherit it
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wake_w)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "command")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    children, watched, pending = {}, {}, b""
    say({"op": "ready", "python": sys.version.split()[0]})
    while True:
        for key, _ in sel.select(0.05 if watched else None):
            if key.data == "child":
                while os.read(wake_r, 512) == 512:
                    pass
                continue
            data = os.read(0, 65536)
            if not data:
                return 0  # the server went away; the wrappers live on
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = json.loads(line)
                op = cmd["op"]
                if op in ("start", "watch", "remove") and not job_dir.match(cmd["dir"]):
                    continue
                if op == "start":
                    pid = start(cmd)
                    children[pid] = cmd
                    say({"op": "started", "id": cmd["id"], "wrapper": pid})
                elif op == "cancel":
                    try:
                        os.kill(int(cmd["wrapper"]), signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                elif op == "watch":
                    pid = int(cmd["wrapper"])
                    try:
                        mine = os.readlink("/proc/%d/cwd" % pid) == os.path.realpath(cmd["dir"])
                    except OSError:
                        mine = False
                    if mine:
                        watched[pid] = cmd["id"]
                    else:
                        say({"op": "exited", "id": cmd["id"]})
                elif op == "remove":
                    shutil.rmtree(cmd["dir"], ignore_errors=True)
                elif op == "gpus":  # holds the agent while nvidia-smi runs: at most 10 s
                    say({"op": "gpus", "csv": gpu_csv()})
        while children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            cmd = children.pop(pid)
            say(dict(outcome(cmd), op="exited", id=cmd["id"]))
        for pid in list(watched):
            st = proc_state(pid)
            if st is None or st[0] == "Z":
                say({"op": "exited", "id": watched.pop(pid)})


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(serve())

    def show(pids):
        try:
            print(json.dumps(pids), flush=True)
        except OSError:
            pass
    sys.exit(wrap(float(sys.argv[2]), float(sys.argv[3]), show))
'''

#: What every node's GPUs are read with, here and in the node program.
GPU_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu",
             "--format=csv,noheader,nounits"]
NODE_PROGRAM = NODE_PROGRAM.replace("@GPU_QUERY@", repr(GPU_QUERY))


def gpu_csv():
    """nvidia-smi's reading of this machine's GPUs, or None where there is none
    (for local nodes; the node program has the same function for SSH nodes)."""
    try:
        r = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def parse_gpus(csv, visible):
    """The GPUs a node's jobs see (``visible``: its CUDA_VISIBLE_DEVICES, indexes or
    UUIDs) from nvidia-smi's CSV; [] when there are none."""
    wanted = {v.strip() for v in visible.split(",")}
    found = []
    for line in (csv or "").splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) != 6 or not wanted & {f[0], f[1]}:
            continue
        try:
            found.append({"index": int(f[0]), "name": f[2], "memory_used_mib": int(f[3]),
                          "memory_total_mib": int(f[4]), "utilization_pct": int(f[5])})
        except ValueError:  # "[N/A]" on some boards
            continue
    return found


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended, as the wrapper left it."""
    exit_code: int | None
    reason: str | None  # None, "timeout", "cancelled" or "lost"
    stdout: str
    stderr: str


class Run:
    """A launched job; ``exited`` is set, and ``on_exit`` called, when its wrapper ends."""

    def __init__(self, job, work, on_exit):
        self.job = job
        self.work = work
        self.wrapper_pid = None
        self.link_lost = False  # ended because the link to its node broke, not by exiting
        self.report = {}  # an SSH agent's exit report: result and output, when small
        self.exited = threading.Event()
        self._on_exit = on_exit

    def ended(self):
        self.exited.set()
        self._on_exit()


def job_env(node, job):
    """Variables every job gets, whatever its node."""
    return {**node.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": node.gpus,
            "GPUQUEUE_JOB_ID": job.id, "PYTHONUNBUFFERED": "1"}


class LocalExecutor:
    """Runs jobs on this machine, detached from the server, in ``work/`` of the job folder."""

    probe_interval = None  # this machine is always there

    def __init__(self, node, config):
        self.node = node
        self.config = config
        # One copy for every local job's wrapper, rewritten at each start.
        self.program = config.spool / "gq_node.py"
        write_file(self.program, NODE_PROGRAM)

    def connect(self):
        pass

    def healthy(self):
        return True

    def start(self, job, folder, on_exit):
        work = folder / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        # work/ is this launch's own: no temporary names or fsyncs needed (after a
        # crash, recovery voids a launch that never claimed ``launched``).
        shutil.copyfile(folder / "code.py", work / "code.py")
        (work / "env.json").write_text(json.dumps(job_env(self.node, job)))
        with open(work / "wrapper.log", "wb") as errlog:
            proc = subprocess.Popen(
                # -S: the wrapper needs only the standard library, and starts faster.
                [self.node.python, "-S", str(self.program), "run",
                 repr(self.config.time_limit(job.expected_time)), repr(self.config.kill_grace)],
                cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog,
                start_new_session=True)
        run = Run(job, work, on_exit)
        # The wrapper prints its pids once it can take a SIGTERM as a cancel.
        if proc.stdout.readline():
            run.wrapper_pid = proc.pid

        def wait():
            proc.stdout.read()
            proc.wait()
            run.ended()
        threading.Thread(target=wait, daemon=True, name=f"wait-{job.id}").start()
        return run

    def reattach(self, job, folder, on_exit):
        """Follow a job launched before a restart; None if it never launched."""
        work = folder / "work"
        if _void_launch(work):
            return None
        run = Run(job, work, on_exit)
        pid = wrapper_pid(lambda: (work / "pids").read_text())
        if pid is None or (work / "result.json").exists() or not _is_wrapper(pid, work):
            run.ended()
            return run
        run.wrapper_pid = pid
        pidfd = os.pidfd_open(pid)

        def wait():
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll()
            os.close(pidfd)
            run.ended()
        threading.Thread(target=wait, daemon=True, name=f"wait-{job.id}").start()
        return run

    def cancel(self, run):
        try:
            os.kill(run.wrapper_pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):
            pass

    def cleanup(self, run):
        pass  # work/ goes with the job folder's move to done/

    def gpu_csv(self):
        return gpu_csv()

    def read_output(self, job, folder, stream, offset, limit):
        """Up to ``limit`` bytes of a running job's stream from ``offset``."""
        try:
            with open(folder / "work" / stream, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def collect(self, run):
        limit = self.config.output_limit_bytes
        out, err = read_capped(run.work / "stdout", limit), read_capped(run.work / "stderr", limit)
        try:
            r = read_json(run.work / "result.json")
            return Outcome(r["exit_code"], r["reason"], out, err)
        except (OSError, ValueError, KeyError):
            return Outcome(None, "lost", out, err)


def _void_launch(work):
    """Claim a run's launch for ourselves; True means its wrapper never started the job."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        os.close(os.open(work / "launched", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def wrapper_pid(read_pids, patience=2.0):
    """A launched wrapper's pid, from its pids file (read by ``read_pids``), or None.

    The wrapper writes the file just after claiming the launch, so after a restart
    it may be a moment late; a file cannot be waited on, so this looks again
    briefly.  Only recovery comes here.
    """
    end = time.monotonic() + patience
    while True:
        try:
            return int(json.loads(read_pids())["wrapper"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            if time.monotonic() > end:
                return None
            time.sleep(0.05)


def _is_wrapper(pid, work):
    """Is ``pid`` still this run's wrapper (not a reused pid)?"""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(work.resolve())
    except OSError:
        return False


#: Seconds allowed for TCP connect, SSH banner, authentication and channel opens.
SSH_TIMEOUT = 10
#: Seconds between SSH keepalives, so a dead link is noticed.
SSH_KEEPALIVE = 5
#: Seconds between health checks of an idle SSH node.
SSH_PROBE_INTERVAL = 15
#: Most seconds between reconnect attempts to an offline node.
SSH_MAX_BACKOFF = 10
#: Seconds a node's ``setup`` line and python start-up may take before the
#: wrapper reports in.
WRAPPER_START_TIMEOUT = 120
#: Seconds a Slurm command (sbatch, squeue, scancel) may take on the login host.
SLURM_TIMEOUT = 60
#: Seconds between looks at a Slurm node's jobs (submit and cancel wake it at once).
SLURM_POLL = 2
#: Seconds between GPU readings of a node, and the most one may take.
GPU_REFRESH = 30
GPU_TIMEOUT = 15
#: Output up to this many bytes (both streams) comes with a job's exit report from
#: the node's agent; more is read over SFTP.  Saves a dozen round trips per job.
INLINE_OUTPUT = 64 * 1024

_known_hosts_lock = threading.Lock()


class _RecordNewKey(paramiko.MissingHostKeyPolicy):
    """Trust on first use (``accept_new_host_keys``): append the new key to known_hosts."""

    def __init__(self, path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _known_hosts_lock, open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("recorded new host key for %s in %s", hostname, self.path)


class _Connection(fabric.Connection):
    """A Fabric Connection with host keys checked and every wait bounded."""

    def __init__(self, target, config, gateway=None):
        connect_kwargs = {"banner_timeout": SSH_TIMEOUT, "auth_timeout": SSH_TIMEOUT,
                          "channel_timeout": SSH_TIMEOUT}
        if target.key_file:
            connect_kwargs.update(key_filename=[target.key_file], look_for_keys=False,
                                  allow_agent=False)
        if target.password_env:
            connect_kwargs["password"] = os.environ.get(target.password_env)
        super().__init__(target.host, user=target.user, port=target.port, gateway=gateway,
                         connect_timeout=SSH_TIMEOUT, connect_kwargs=connect_kwargs,
                         config=fabric.Config(ssh_config=paramiko.SSHConfig()))
        self.client = paramiko.SSHClient()
        if config.known_hosts.exists():
            self.client.load_host_keys(str(config.known_hosts))
        self.client.set_missing_host_key_policy(
            _RecordNewKey(config.known_hosts) if config.accept_new_host_keys
            else paramiko.RejectPolicy())

    def open(self):
        super().open()
        self.transport.set_keepalive(SSH_KEEPALIVE)
        sock = self.transport.sock
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # sshd turns Nagle off on its side only for a connection that holds a pty
        # session; without it, a short report after a quiet spell waits for a
        # delayed ACK (tens of ms).  One idle pty session per connection does it.
        # Keep a reference: Paramiko holds channels weakly, and a channel collected
        # by the garbage collector closes itself from whatever thread is running,
        # which deadlocks a thread already inside a send on this transport.
        self.idle_pty = self.transport.open_session(timeout=SSH_TIMEOUT)
        self.idle_pty.get_pty()
        self.idle_pty.exec_command("exec cat")

    def open_gateway(self):
        """Fabric's, but with a bounded wait for the jump host's forwarding channel."""
        self.gateway.open()
        return self.gateway.transport.open_channel(
            "direct-tcpip", (self.host, int(self.port)), ("", 0), timeout=SSH_TIMEOUT)


class _Agent:
    """``gq_node.py serve`` on one node, over one SSH channel: commands out, reports in.

    A reader thread turns reports into replies (waited for by the scheduler thread)
    and into ``Run.ended()`` calls.  When the channel ends, every run it followed
    is marked ``link_lost`` and ended, so its scheduler finds it again.
    """

    def __init__(self, channel):
        self.channel = channel
        self.runs = {}  # job id -> Run
        self.closed = False
        self._replies = {}
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._listen, daemon=True, name="agent").start()

    def send(self, **command):
        with self._send_lock:  # the scheduler and the GPU telemetry both send
            self.channel.sendall((json.dumps(command) + "\n").encode())

    def reply(self, key, timeout):
        """The report called ``key`` (e.g. ("started", job id)), or None."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._replies or self.closed, timeout)
            return self._replies.pop(key, None)

    def _listen(self):
        pending = b""
        try:
            while True:
                data = self.channel.recv(65536)
                if not data:
                    break
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self._report(json.loads(line))
        except (OSError, ValueError, EOFError) as exc:
            log.warning("node agent link broke: %s", exc)
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for run in list(self.runs.values()):
            run.link_lost = True
            run.ended()
        self.runs.clear()

    def _report(self, msg):
        if msg.get("op") == "exited":
            run = self.runs.pop(msg.get("id"), None)
            if run is not None:
                run.report = msg
                run.ended()
            return
        with self._cond:
            self._replies[(msg.get("op"), msg.get("id"))] = msg
            self._cond.notify_all()


class SshExecutor:
    """Runs jobs on a node over SSH, through the jump host when one is configured.

    Owned by its node's scheduler thread: one persistent connection (and one to
    the jump host), opened once and reused for every job.  On it runs the node's
    agent (``gq_node.py serve``), started once per connection, which launches each
    job and reports its exit at once: no shell start-up per job.  The script
    travels by SFTP; a small output comes back inside the exit report, a large
    one by SFTP.  The only values on a remote command line are the quoted
    workdir and the node's own python and setup line.
    """

    probe_interval = SSH_PROBE_INTERVAL

    def __init__(self, node, config):
        self.node = node
        self.config = config
        self.conn = None
        self._sftp = None
        self._agent = None

    # -- connection ----------------------------------------------------------

    def _up(self):
        return self.conn is not None and self.conn.transport.is_active() and not self._agent.closed

    def connect(self):
        """Make sure the connection and the agent are up; NodeError with the reason if not."""
        if self._up():
            return
        self.close()
        gateway = _Connection(self.config.jump, self.config) if self.config.jump else None
        conn = _Connection(self.node.ssh, self.config, gateway=gateway)
        try:
            conn.open()
            sftp = conn.sftp()
            _mkdirs(sftp, _sftp_path(self.node.workdir))
            agent = self._prepare(conn, sftp)
        except Exception as exc:
            conn.close()
            if gateway is not None:
                gateway.close()
            if isinstance(exc, NodeError):
                raise
            raise NodeError(_ssh_reason(exc, self.node, self.config)) from None
        self.conn, self._sftp, self._agent = conn, sftp, agent

    def _prepare(self, conn, sftp):
        """Start the node's agent on a fresh connection; it is returned."""
        workdir = _sftp_path(self.node.workdir)
        setup = f"{{ {self.node.setup}\n}} && " if self.node.setup else ""
        with sftp.open(f"{workdir}/gq_node.py", "w") as f:
            f.write(NODE_PROGRAM)
        channel = conn.transport.open_session(timeout=SSH_TIMEOUT)
        channel.exec_command(f"cd {shlex.quote(workdir)} && {setup}"
                             f"exec {shlex.quote(self.node.python)} gq_node.py serve")
        agent = _Agent(channel)
        if agent.reply(("ready", None), WRAPPER_START_TIMEOUT) is None:
            if not agent.closed:
                raise NodeError(f"the node's agent did not report in within "
                                f"{WRAPPER_START_TIMEOUT} s: its login shell's start-up "
                                f"files or the setup line may hang")
            why = channel.recv_stderr(4096).decode(errors="replace").strip()
            raise NodeError(f"the node's agent did not start: {why or 'no answer'}")
        return agent

    def close(self):
        if self.conn is not None:
            gateway = self.conn.gateway
            self.conn.close()
            if gateway is not None:
                gateway.close()
        self.conn = self._sftp = None

    def healthy(self):
        try:
            self._guard(lambda sftp: sftp.stat("."))
            return True
        except NodeError:
            return False

    def _guard(self, step, *args):
        """Run an SFTP step, turning any SSH failure into NodeError."""
        try:
            self.connect()
            return step(self._sftp, *args)
        except (NodeError, FileNotFoundError):
            raise
        except Exception as exc:
            self.close()
            raise NodeError(_ssh_reason(exc, self.node, self.config)) from None

    def _send(self, run, **command):
        """Tell the agent something about a run it follows."""
        self.connect()
        if run is not None:
            self._agent.runs[run.job.id] = run
        try:
            self._agent.send(**command)
        except (OSError, EOFError) as exc:
            self.close()
            raise NodeError(_ssh_reason(exc, self.node, self.config)) from None

    def _remote_dir(self, job):
        return f"{_sftp_path(self.node.workdir)}/{job.id}"

    # -- jobs ----------------------------------------------------------------

    def start(self, job, folder, on_exit):
        """Copy the job to a fresh remote folder and have the agent launch it there."""
        remote = self._remote_dir(job)

        def upload(sftp):
            try:
                sftp.mkdir(remote)
            except OSError:  # left by an attempt that never launched
                _rmtree(sftp, remote)
                sftp.mkdir(remote)
            with sftp.open(f"{remote}/code.py", "w") as f:
                f.write((folder / "code.py").read_bytes())
        self._guard(upload)
        write_file(folder / "launching", remote)  # from here on the job may be running
        run = Run(job, remote, on_exit)
        self._send(run, op="start", id=job.id, dir=job.id, env=job_env(self.node, job),
                   limit=self.config.time_limit(job.expected_time), grace=self.config.kill_grace,
                   inline=min(INLINE_OUTPUT, self.config.output_limit_bytes))
        reply = self._agent.reply(("started", job.id), WRAPPER_START_TIMEOUT)
        if reply is None:
            raise NodeError("the node's agent stopped answering")
        run.wrapper_pid = int(reply["wrapper"])
        return run

    def reattach(self, job, folder, on_exit):
        """Find a job launched before a restart or a lost link; None if it never ran."""
        if not (folder / "launching").exists():
            return None
        remote = self._remote_dir(job)

        def claim(sftp):
            try:
                sftp.stat(remote)
            except FileNotFoundError:
                return True
            try:
                sftp.open(f"{remote}/launched", "x").close()
                return True
            except OSError:
                return False
        if self._guard(claim):
            (folder / "launching").unlink()
            return None
        run = Run(job, remote, on_exit)
        run.wrapper_pid = wrapper_pid(lambda: self._guard(_read_text, f"{remote}/pids"))
        if run.wrapper_pid is None:
            run.ended()
        else:
            self._send(run, op="watch", id=job.id, dir=job.id, wrapper=run.wrapper_pid)
        return run

    def cancel(self, run):
        if run.wrapper_pid is not None:
            self._send(None, op="cancel", wrapper=run.wrapper_pid)

    def collect(self, run):
        if run.link_lost:
            raise NodeError(f"lost the link to node {self.node.id} while job {run.job.id} ran")
        r = run.report
        if "result" in r:  # small output came with the exit report
            try:
                out, err = (base64.b64decode(r[s]).decode("utf-8", "replace")
                            for s in ("stdout", "stderr"))
                return Outcome(r["result"]["exit_code"], r["result"]["reason"], out, err)
            except (KeyError, TypeError, ValueError):
                pass  # read the files instead
        limit = self.config.output_limit_bytes

        def fetch(sftp):
            def size(path):
                return sftp.stat(path).st_size
            out = read_capped(f"{run.work}/stdout", limit, sftp.open, size)
            err = read_capped(f"{run.work}/stderr", limit, sftp.open, size)
            try:
                r = json.loads(_read_text(sftp, f"{run.work}/result.json"))
                return Outcome(r["exit_code"], r["reason"], out, err)
            except (FileNotFoundError, ValueError, KeyError):
                return Outcome(None, "lost", out, err)
        return self._guard(fetch)

    def cleanup(self, run):
        """Remove the job's folder on the node, once its outcome is safe in the spool
        (before that, a restart would read a missing folder as 'never launched')."""
        if not self.config.keep_remote_dirs:
            self._send(None, op="remove", dir=run.job.id)

    def gpu_csv(self):
        """nvidia-smi's reading on the node, asked of its agent.  Called from the
        telemetry thread: it uses the agent as it is and never connects."""
        agent = self._agent
        if agent is None or agent.closed:
            raise NodeError(f"node {self.node.id} is not connected")
        try:
            agent.send(op="gpus")
        except (OSError, EOFError) as exc:
            raise NodeError(str(exc)) from None
        reply = agent.reply(("gpus", None), GPU_TIMEOUT)
        if reply is None:
            raise NodeError(f"node {self.node.id} did not report its GPUs")
        return reply.get("csv")

    def read_output(self, job, folder, stream, offset, limit):
        """Up to ``limit`` bytes of a running job's stream from ``offset``, read over
        the node's live connection.  Called from HTTP threads: it opens an SFTP
        channel of its own, leaving the scheduler's channel to the scheduler."""
        conn = self.conn
        if conn is None or not conn.is_connected:
            raise NodeError(f"node {self.node.id} is not connected")
        try:
            with conn.client.open_sftp() as sftp, \
                    sftp.open(f"{self._remote_dir(job)}/{stream}", "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise NodeError(_ssh_reason(exc, self.node, self.config)) from None


class SlurmRefused(Exception):
    """sbatch said no (a bad partition, account or gres): the job fails with its words."""


#: Slurm job states that are not over yet; PENDING and the like show as pending.
SLURM_WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESV_DEL_HOLD", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING")
SLURM_ACTIVE = SLURM_WAITING + ("RUNNING", "COMPLETING", "STAGE_OUT")


class SlurmExecutor(SshExecutor):
    """A Slurm cluster's login host, over the same kind of SSH connection as a node
    (no agent: Slurm runs the jobs).  Each job gets a folder in the workdir, which
    the compute nodes must share (a home folder usually is), holding code.py and
    job.sh; ``sbatch --job-name gq-<id>`` queues it, so that it can be found by
    gpuqueue's id after a crash between sbatch and recording Slurm's id.  Every
    value on a command line is quoted.
    """

    def _up(self):
        return self.conn is not None and self.conn.transport.is_active()

    def __init__(self, node, config):
        super().__init__(node, config)
        self._home = None

    def _prepare(self, conn, sftp):
        """No agent; learn the home folder, as Slurm wants absolute paths."""
        self._home = sftp.normalize(".")
        return None

    def _remote_dir(self, job):
        path = super()._remote_dir(job)
        if path.startswith("/"):
            return path
        if self._home is None:
            raise NodeError(f"node {self.node.id} is not connected")
        return f"{self._home}/{path}"

    def gpu_csv(self):
        return None  # the login host's GPUs are not the jobs' GPUs

    def command(self, *argv):
        """Run a Slurm command on the login host: (exit status, stdout, stderr)."""
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in self.node.env.items())
        line = env + " ".join(shlex.quote(str(a)) for a in argv)
        self.connect()
        try:
            r = self.conn.run(line, hide=True, warn=True, in_stream=False, timeout=SLURM_TIMEOUT)
        except Exception as exc:
            self.close()
            raise NodeError(_ssh_reason(exc, self.node, self.config)) from None
        if r.exited == 127:
            raise NodeError(f"{argv[0]} not found on {self.node.host}: is Slurm's client "
                            "installed there, and on the login shell's PATH?")
        return r.exited, r.stdout, r.stderr

    def submit(self, job, folder):
        """Queue the job with sbatch; Slurm's job id."""
        self.connect()
        remote = self._remote_dir(job)
        env = {k: v for k, v in job_env(self.node, job).items() if k != "CUDA_VISIBLE_DEVICES"}
        script = "#!/bin/sh\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()) \
            + f"exec {shlex.quote(self.node.python)} code.py\n"

        def upload(sftp):
            _rmtree(sftp, remote)  # left by an attempt that never reached Slurm
            sftp.mkdir(remote)
            for name, data in (("code.py", (folder / "code.py").read_bytes()), ("job.sh", script)):
                with sftp.open(f"{remote}/{name}", "w") as f:
                    f.write(data)
        self._guard(upload)
        write_file(folder / "launching", remote)  # from here on Slurm may have it
        limit = math.ceil(self.config.time_limit(job.expected_time))
        days, rest = divmod(limit, 86400)
        argv = ["sbatch", "--parsable", f"--job-name=gq-{job.id}", f"--chdir={remote}",
                f"--output={remote}/stdout", f"--error={remote}/stderr",
                f"--time={days}-{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"]
        argv += [f"--{k}={self.node.slurm[k]}" for k in ("partition", "account", "gres")
                 if self.node.slurm[k]]
        code, out, err = self.command(*argv, f"{remote}/job.sh")
        slurm_id = out.strip().split(";")[0]
        if code != 0 or not slurm_id.isdigit():
            raise SlurmRefused(err.strip() or out.strip() or f"sbatch exited with {code}")
        return slurm_id

    def states(self, job_ids):
        """What Slurm says of gpuqueue's jobs, found by name: {gpuqueue id: (Slurm id,
        state, reason, wait status)}.  A job Slurm no longer remembers is missing."""
        found = {}
        for i in range(0, len(job_ids), 200):  # keep the command line short
            names = ",".join(f"gq-{j}" for j in job_ids[i:i + 200])
            code, out, err = self.command("squeue", "-h", "-t", "all", f"--name={names}",
                                          "-O", "JobID:|,Name:|,State:|,Reason:|,exit_code:|")
            if code != 0:
                raise NodeError(f"squeue failed on {self.node.host}: {err.strip()[:300]}")
            for line in out.splitlines():
                f = [x.strip() for x in line.split("|")]
                if len(f) >= 5 and f[1].startswith("gq-") and f[0].isdigit():
                    wait = int(f[4]) if f[4].lstrip("-").isdigit() else 0
                    found[f[1][3:]] = (f[0], f[2].split()[0] if f[2] else "", f[3], wait)
        return found

    def accounting(self, slurm_id):
        """(state, reason, wait status) of a job the controller has forgotten, from
        sacct; None where Slurm keeps no accounting (sacct then fails)."""
        code, out, _ = self.command("sacct", "-n", "-P", "-X", "-j", slurm_id,
                                    "--format=State,ExitCode")
        lines = out.strip().splitlines() if code == 0 else []
        if not lines or "|" not in lines[0]:
            return None
        state, exit_code = lines[0].split("|")[:2]
        status, _, sig = exit_code.partition(":")
        wait = int(sig) & 0x7F if sig.isdigit() and int(sig) else \
            (int(status) & 0xFF) << 8 if status.isdigit() else 0
        return (state.split() or [""])[0], None, wait

    def cancel(self, slurm_ids):
        code, _, err = self.command("scancel", *slurm_ids)
        if code != 0:
            log.warning("node %s: scancel %s: %s", self.node.id, " ".join(slurm_ids), err.strip())

    def outputs(self, job):
        """(stdout, stderr) of a job's files, capped like every job's."""
        limit = self.config.output_limit_bytes
        remote = self._remote_dir(job)

        def fetch(sftp):
            def size(path):
                return sftp.stat(path).st_size
            return tuple(read_capped(f"{remote}/{s}", limit, sftp.open, size)
                         for s in ("stdout", "stderr"))
        return self._guard(fetch)

    def ran(self, job):
        """Did Slurm ever start the job?  It creates the output files when it does."""
        remote = self._remote_dir(job)
        try:
            self._guard(lambda sftp: sftp.stat(f"{remote}/stdout"))
            return True
        except FileNotFoundError:
            return False

    def remove(self, job):
        if not self.config.keep_remote_dirs:
            self._guard(_rmtree, self._remote_dir(job))


def _sftp_path(path):
    """SFTP starts in the home folder and knows no ``~``."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def _mkdirs(sftp, path):
    path = _sftp_path(path)
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub or sub == ".":
            continue
        try:
            sftp.stat(sub)
        except FileNotFoundError:
            sftp.mkdir(sub)


def _rmtree(sftp, path):
    """Remove a remote job folder (it holds files only)."""
    try:
        names = sftp.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        sftp.remove(f"{path}/{name}")
    sftp.rmdir(path)


def _read_text(sftp, path):
    with sftp.open(path, "r") as f:
        return f.read().decode()


def _ssh_reason(exc, node, config):
    """A short, secret-free reason for /api/nodes."""
    hop = f"jump host {config.jump.host}:{config.jump.port}" if config.jump else "the node"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"host key changed for {exc.hostname}: refused (known_hosts {config.known_hosts})"
    if "not found in known_hosts" in text:
        return f"unknown host key: {text} (add it to {config.known_hosts})"
    return f"{node.ssh.host}:{node.ssh.port} via {hop}: {type(exc).__name__}: {text}"


###############################################################################
# Scheduler ###################################################################
###############################################################################


class Histogram:
    """Seconds counted into cumulative buckets, as Prometheus histograms are."""

    BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.buckets = [0] * len(self.BOUNDS)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds):
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.count += 1
        self.sum += seconds


class NodeWorker:
    """One thread per node: takes the node's next job, runs it, records how it ended.

    It sleeps on ``wake``, which submit, cancel and a job's exit set, so a free
    node starts its next job at once.  It alone uses its executor (and so its
    SSH connection).  While its node is unreachable it is ``offline``: it hands
    its pending jobs to online nodes and retries with backoff.
    """

    def __init__(self, node, spool, executor, config, peers):
        self.node = node
        self.spool = spool
        self.executor = executor
        self.config = config
        self.peers = peers  # every node's worker, by id (this one included)
        self.wake = threading.Event()
        self.state = "online" if node.is_local else "offline"
        self.error = None if node.is_local else "connecting"
        self.gpus = []  # what nvidia-smi last said of the node's GPUs (see watch_gpus)
        self.started = 0  # jobs launched since the server started
        self.dispatch = Histogram()  # seconds from claim to the job's wrapper running

    def start(self):
        threading.Thread(target=self._loop, name=f"node-{self.node.id}", daemon=True).start()

    def _loop(self):
        for job in self.spool.running(self.node.id):
            self._guarded(self._resume, job)
        while True:
            if self.state != "online":
                self._bring_online()
            self.wake.clear()
            job = self.spool.claim(self.node.id)
            if job is None:
                if self.node.id in self.spool.drained:
                    self._shed()
                if not self.wake.wait(self.executor.probe_interval) and not self.executor.healthy():
                    self._set_offline("did not answer a health check")
                continue
            self._guarded(self._execute, job)

    def _guarded(self, step, job):
        """Run one job step; a bug fails that job, never the node's thread."""
        try:
            step(job)
        except Exception as exc:
            log.exception("node %s: job %s failed inside gpuqueue", self.node.id, job.id)
            if job.id in self.spool.active:
                self.spool.finish(job, "failed", error=f"internal error: {exc}")

    # -- node state ----------------------------------------------------------

    def _bring_online(self):
        backoff = 1.0
        while True:
            self._shed()
            try:
                self.executor.connect()
                break
            except NodeError as exc:
                self._set_offline(str(exc))
            # Sleep out the backoff even when submits wake us: they cannot bring the
            # node back, and a connect attempt per submit would burn the CPU.
            time.sleep(backoff)
            backoff = min(backoff * 2, SSH_MAX_BACKOFF)
        self._set_online()

    def _set_online(self):
        if self.state != "online":
            log.info("node %s online", self.node.id)
        self.state, self.error = "online", None

    def _set_offline(self, reason):
        if self.state != "offline" or self.error != reason:
            log.warning("node %s offline: %s", self.node.id, reason)
        self.state, self.error = "offline", reason
        self._shed()

    def _shed(self):
        """Hand this node's pending jobs to online nodes that are not drained."""
        online = [n for n, w in self.peers.items() if w.state == "online" and w is not self]
        for n in self.spool.move_pending(self.node.id, online):
            self.peers[n].wake.set()

    # -- jobs ----------------------------------------------------------------

    def _execute(self, job):
        if job.cancel_requested:
            self.spool.finish(job, "cancelled", error="cancelled before it started")
            return
        log.info("job %s user=%s node=%s running", job.id, job.user_id, self.node.id)
        try:
            run = self.executor.start(job, self.spool.folder(job), self.wake.set)
            self.started += 1
            self.dispatch.observe(time.time() - job.started_at)
        except NodeError as exc:
            self._set_offline(str(exc))
            run = self._reattach(job)
        if run is not None:
            self._follow(job, run)

    def _resume(self, job):
        """A job found running at start-up: follow it, or queue it again if it never ran."""
        run = self._reattach(job)
        if run is not None:
            log.info("job %s re-attached on node %s", job.id, self.node.id)
            self._follow(job, run)

    def _reattach(self, job):
        """Find a job on its node again after a restart or an outage.

        Returns its Run, or None once the job is back in a queue (it never
        launched) or failed (its node stayed away past ``unreachable_grace``
        and past the job's own time limit).
        """
        limit_end = (job.started_at or time.time()) + self.config.time_limit(job.expected_time)
        give_up = max(limit_end, time.time()) + self.config.unreachable_grace
        backoff = 1.0
        while True:
            try:
                run = self.executor.reattach(job, self.spool.folder(job), self.wake.set)
                break
            except NodeError as exc:
                self._set_offline(str(exc))
                if time.time() > give_up:
                    self.spool.finish(job, "failed", error=f"node {self.node.id} unreachable "
                                      f"while the job ran: {exc}")
                    return None
            self.wake.wait(backoff)
            self.wake.clear()
            backoff = min(backoff * 2, SSH_MAX_BACKOFF)
        if run is None:
            log.info("job %s never launched: queued again", job.id)
            self.spool.requeue(job)
            if self.state != "online":
                self._shed()
        else:
            self._set_online()  # it answered
        return run

    def _follow(self, job, run):
        while True:
            try:
                self._wait(job, run)
                o = self.executor.collect(run)
                break
            except NodeError as exc:
                self._set_offline(str(exc))
                run = self._reattach(job)
                if run is None:
                    return
        if o.reason == "cancelled":
            status, error = "cancelled", "cancelled while running"
        elif o.reason == "timeout":
            status, error = "failed", "timeout"
        elif o.reason == "lost":
            status, error = "failed", "the job's wrapper ended without a result (killed or crashed)"
        elif o.exit_code == 0:
            status, error = "completed", None
        elif o.exit_code < 0:
            status, error = "failed", f"killed by signal {-o.exit_code}"
        else:
            status, error = "failed", f"exit code {o.exit_code}"
        self.spool.finish(job, status, o.exit_code, error, o.stdout, o.stderr)
        try:
            self.executor.cleanup(run)
        except NodeError as exc:
            log.warning("job %s: its folder on node %s stays: %s", job.id, self.node.id, exc)

    def _wait(self, job, run):
        """Sleep until the run ends, passing on a cancel once."""
        cancel_sent = False
        while not run.exited.is_set():
            self.wake.clear()
            if job.cancel_requested and not cancel_sent:
                self.executor.cancel(run)
                cancel_sent = True
            if not run.exited.is_set():
                self.wake.wait()

    def info(self):
        running = self.spool.running(self.node.id)
        info = {"id": self.node.id, "host": self.node.host, "state": self.state,
                "drained": self.node.id in self.spool.drained, "error": self.error,
                "running_job": running[0].id if running else None}
        if self.gpus:
            info["gpus"] = self.gpus
        return info


class SlurmWorker(NodeWorker):
    """A Slurm cluster as one node: it hands up to ``max_jobs`` jobs at a time to
    sbatch and lets Slurm decide when and where each runs.  Every SLURM_POLL
    seconds (and at once when woken) it asks squeue about them, passes cancels
    on to scancel, and records the ones that ended.

    A job's Slurm id is recorded in ``slurm.json`` in its folder once sbatch
    answers.  A claimed job without one (a crash or a lost link right around
    sbatch) is looked up by its name, ``gq-<id>``, before anything is sent again,
    so it never becomes two Slurm jobs.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.counts = {}  # Slurm's pending and running counts of our jobs, at the last look

    def _loop(self):
        while True:
            if self.state != "online":
                self._bring_online()
            self.wake.clear()
            try:
                self._recover()
                self._fill()
                self._poll()
            except NodeError as exc:
                self._set_offline(str(exc))
                continue
            self.wake.wait(SLURM_POLL)

    def _step(self, step, job):
        """Like _guarded, but a NodeError goes up: the node is away, the job waits."""
        try:
            step(job)
        except NodeError:
            raise
        except Exception as exc:
            log.exception("node %s: job %s failed inside gpuqueue", self.node.id, job.id)
            if job.id in self.spool.active:
                self.spool.finish(job, "failed", error=f"internal error: {exc}")

    def _fill(self):
        while len(self.spool.running(self.node.id)) < self.node.slurm["max_jobs"]:
            job = self.spool.claim(self.node.id)
            if job is None:
                return
            self._step(self._submit, job)

    def _submit(self, job):
        if job.cancel_requested:
            self.spool.finish(job, "cancelled", error="cancelled before it started")
            return
        try:
            slurm_id = self.executor.submit(job, self.spool.folder(job))
        except SlurmRefused as exc:
            self.spool.finish(job, "failed", error=f"sbatch refused the job: {exc}")
            return
        self._record(job, slurm_id)
        self.started += 1
        self.dispatch.observe(time.time() - job.started_at)
        log.info("job %s user=%s node=%s is Slurm job %s", job.id, job.user_id, self.node.id, slurm_id)

    def _record(self, job, slurm_id):
        write_json(self.spool.folder(job) / "slurm.json", {"slurm_id": slurm_id})
        job.slurm = {"id": slurm_id, "state": "PENDING", "reason": None, "wait": 0,
                     "scancel_sent": False}

    def _recover(self):
        """Settle claimed jobs with no Slurm id in memory: read slurm.json, else
        ask Slurm by name, else queue the job again (it never reached Slurm)."""
        asked = []
        for job in self.spool.running(self.node.id):
            if job.slurm is None:
                try:
                    self._record(job, read_json(self.spool.folder(job) / "slurm.json")["slurm_id"])
                except (OSError, ValueError, KeyError):
                    asked.append(job)
        found = self.executor.states([j.id for j in asked]) if asked else {}
        for job in asked:
            launching = self.spool.folder(job) / "launching"
            if job.id in found:
                self._record(job, found[job.id][0])
                log.info("job %s found again in Slurm as job %s", job.id, found[job.id][0])
            elif launching.exists() and self.executor.ran(job):
                self._end(job, "failed", None, "Slurm ran the job but no longer knows how it ended")
            else:
                launching.unlink(missing_ok=True)
                self.spool.requeue(job)
                log.info("job %s never reached Slurm: queued again", job.id)

    def _poll(self):
        jobs = [j for j in self.spool.running(self.node.id) if j.slurm is not None]
        cancel = [j for j in jobs if j.cancel_requested and not j.slurm["scancel_sent"]]
        if cancel:
            self.executor.cancel([j.slurm["id"] for j in cancel])
            for j in cancel:
                j.slurm["scancel_sent"] = True
        found = self.executor.states([j.id for j in jobs]) if jobs else {}
        self.counts = collections.Counter("pending" if st in SLURM_WAITING else "running"
                                          for _, st, _, _ in found.values() if st in SLURM_ACTIVE)
        for job in jobs:
            if job.id in found:
                _, state, reason, wait = found[job.id]
            else:  # the controller forgot it (MinJobAge): accounting may remember
                known = self.executor.accounting(job.slurm["id"])
                if known is None:
                    self._step(self._forgotten, job)
                    continue
                state, reason, wait = known
            job.slurm.update(state=state, reason=None if reason in ("", "None") else reason, wait=wait)
            if state not in SLURM_ACTIVE:
                self._step(self._finish, job)

    def _forgotten(self, job):
        self._end(job, "failed", None, f"Slurm no longer knows job {job.slurm['id']}, and "
                                       "keeps no accounting")

    def _finish(self, job):
        """How Slurm says the job ended, in gpuqueue's terms; Slurm's reason in ``error``."""
        state, reason, wait = job.slurm["state"], job.slurm["reason"], job.slurm["wait"]
        code = -(wait & 0x7F) if wait & 0x7F else (wait >> 8) & 0xFF
        because = f" (Slurm: {reason})" if reason and reason != "NonZeroExitCode" else ""
        if state == "COMPLETED":
            self._end(job, "completed", 0, None)
        elif state == "CANCELLED" and job.cancel_requested:
            self._end(job, "cancelled", None, "cancelled while in Slurm")
        elif state == "TIMEOUT":
            self._end(job, "failed", code, "timeout")
        elif state == "FAILED":
            what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            self._end(job, "failed", code, what + because)
        else:  # CANCELLED by someone else, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED...
            self._end(job, "failed", code, f"Slurm: {state}{because}")

    def _end(self, job, status, exit_code, error):
        out, err = self.executor.outputs(job)
        self.spool.finish(job, status, exit_code, error, out, err)
        try:
            self.executor.remove(job)
        except NodeError as exc:
            log.warning("job %s: its folder on node %s stays: %s", job.id, self.node.id, exc)

    def info(self):
        info = super().info()
        info["slurm"] = {"pending": self.counts.get("pending", 0),
                         "running": self.counts.get("running", 0)}
        return info


def watch_gpus(workers):
    """The thread that reads every online node's GPUs with nvidia-smi, each about
    every GPU_REFRESH seconds (a node not read yet: every 2 s), over the node's
    existing connection.  A node without nvidia-smi simply shows none."""
    due = dict.fromkeys(workers, 0.0)
    while True:
        for n, w in workers.items():
            now = time.monotonic()
            if w.state != "online":
                due[n] = 0.0  # read again as soon as it is back
            elif now >= due[n]:
                try:
                    w.gpus = parse_gpus(w.executor.gpu_csv(), w.node.gpus)
                    due[n] = now + GPU_REFRESH
                except NodeError:
                    due[n] = now + 2
                except Exception:
                    log.exception("node %s: reading its GPUs failed", n)
                    due[n] = now + GPU_REFRESH
        time.sleep(1)  # a clock for readings that are due, not a wait for an event


###############################################################################
# HTTP API ####################################################################
###############################################################################

#: The keys a job's config.yaml may hold: name -> (types, required).
JOB_KEYS = {
    "competition_id": (str, True),
    "project_id": (str, True),
    "user_id": (str, True),
    "expected_time": (_NUMBER, True),
    "priority": (int, False),
    "token": (str, False),
}

#: A job's ``priority`` lies in this range; only admins may go above 0.
PRIORITY_RANGE = (-100, 100)

#: Upper bound for free-text ids in a job's config.
MAX_ID_LENGTH = 200

#: Bytes of output one /api/logs answer or follow line carries at most.
LOG_CHUNK = 64 * 1024
#: Seconds between looks at a followed job's output while it has nothing new.
LOG_POLL = 0.5
#: Follows served at once (each holds one of waitress's 8 threads).
LOG_FOLLOWERS = 4

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def parse_job_config(data, max_expected_time):
    """The checked mapping from an uploaded config.yaml; ApiError 400 when wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "config_file must be UTF-8 text") from None
    try:
        cfg = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ApiError(400, f"config_file is not valid YAML{where}") from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError):
        raise ApiError(400, "config_file is not valid YAML") from None
    if not isinstance(cfg, dict):
        raise ApiError(400, "config_file must be a YAML mapping of keys to values")
    for key in cfg:
        if key not in JOB_KEYS:
            shown = key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else "…"
            raise ApiError(400, f"config_file: unknown key {shown!r}; allowed: {', '.join(JOB_KEYS)}")
    for key, (types, required) in JOB_KEYS.items():
        if key not in cfg:
            if required:
                raise ApiError(400, f"config_file: missing key {key!r}")
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = {_NUMBER: "a number", int: "a whole number"}.get(types, "a string (quote it)")
            raise ApiError(400, f"config_file: {key!r} must be {kind}")
        if isinstance(value, str) and key != "token" and not (
                0 < len(value) <= MAX_ID_LENGTH and value.isprintable()):
            raise ApiError(400, f"config_file: {key!r} must be 1-{MAX_ID_LENGTH} printable characters")
    try:
        t = float(cfg["expected_time"])
    except OverflowError:
        t = math.inf
    if not math.isfinite(t) or t <= 0 or t > max_expected_time:
        raise ApiError(400, f"config_file: 'expected_time' must be seconds above 0 and at most "
                            f"{max_expected_time:g}")
    cfg["expected_time"] = t
    lo, hi = PRIORITY_RANGE
    if not lo <= cfg.get("priority", 0) <= hi:
        raise ApiError(400, f"config_file: 'priority' must be from {lo} to {hi}")
    return cfg


def _whole_utf8(data):
    """``data`` less a UTF-8 character cut off at its end (it comes in the next read)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:  # the start byte of the last character: is it complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


def _bearer():
    header = bottle.request.get_header("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _upload_part(name):
    """The bytes of the one multipart part called ``name``."""
    parts = bottle.request.POST.getall(name)
    if not parts:
        raise ApiError(400, f"missing multipart part {name!r}")
    if len(parts) > 1:
        raise ApiError(400, f"multipart part {name!r} given more than once")
    part = parts[0]
    if isinstance(part, bottle.FileUpload):
        return part.file.read()
    return part.encode("latin-1")  # a plain field, which submit() had parsed as Latin-1


class Api:
    """The HTTP routes.  Holds no state of its own: the spool, tokens and node
    workers own everything it shows."""

    def __init__(self, config, spool, tokens, workers):
        self.config = config
        self.spool = spool
        self.tokens = tokens
        self.workers = workers
        self.throttle = AuthThrottle(config.auth_failures_per_minute)
        # A follow holds one of waitress's threads while its job runs: cap them, so
        # that followers never take every thread from submit and status.
        self.followers = threading.BoundedSemaphore(LOG_FOLLOWERS)
        self.app = bottle.Bottle(catchall=True)
        self.app.default_error_handler = self._error_page
        for method, path, handler in self.ROUTES:
            self.app.route(path, method, self._json(getattr(self, handler)))
        self.app.route("/docs", "GET", self.docs)
        self.app.route("/ui", "GET", self.ui)
        self.app.route("/ui/job/<job_id>", "GET", self.ui)
        self.app.route("/openapi.json", "GET", lambda: OPENAPI)

    ROUTES = (
        ("GET", "/", "index"),
        ("POST", "/api/submit", "submit"),
        ("GET", "/api/status/<job_id>", "status"),
        ("GET", "/api/results/<job_id>", "results"),
        ("POST", "/api/cancel/<job_id>", "cancel"),
        ("GET", "/api/nodes", "nodes"),
        ("GET", "/api/jobs", "jobs"),
        ("GET", "/api/logs/<job_id>", "logs"),
        ("GET", "/metrics", "metrics"),
    )

    @staticmethod
    def _json(handler):
        def wrapped(**kw):
            try:
                return handler(**kw)
            except ApiError as exc:
                bottle.response.status = exc.status
                return {"error": exc.message}
            except Exception:
                log.exception("internal error on %s %s", bottle.request.method, bottle.request.path)
                bottle.response.status = 500
                return {"error": "internal error; the server log has the details"}
        return wrapped

    @staticmethod
    def _error_page(res):
        """Bottle's own errors (404, 405, ...) as JSON instead of an HTML page."""
        bottle.response.content_type = "application/json"
        messages = {404: "no such route", 405: "method not allowed for this route"}
        return json.dumps({"error": messages.get(res.status_code, res.status_line)})

    # -- helpers -------------------------------------------------------------

    def _authenticate(self, token, source):
        """The token's record; 401 for a bad token, 429 for a source that keeps trying."""
        self.throttle.check(source)
        try:
            return self.tokens.authenticate(token)
        except ApiError:
            if token:
                self.throttle.failed(source)
            raise

    def _user(self):
        """The caller of an HTTP route, from its Bearer token."""
        user = self._authenticate(_bearer(), bottle.request.remote_addr or "-")
        bottle.request.environ["gpuqueue.user"] = user["user"]
        return user

    def _job(self, job_id, user):
        """The job if this user may see it; 404 for unknown, malformed or not theirs."""
        job = self.spool.get(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None or not (user["admin"] or job.user_id == user["user"]):
            raise ApiError(404, "no such job")
        return job

    def _status(self, job):
        out = job.public()
        if job.status == "pending":
            position, start = self.spool.queue_position(job)
            out["queue_position"], out["estimated_start"] = position, isotime(start)
        return out

    # -- routes --------------------------------------------------------------

    def index(self):
        return {"name": "gpuqueue", "version": __version__, "nodes": len(self.workers),
                "queue_length": sum(len(q) for q in self.spool.queues.values()),
                "docs": "/docs"}

    def submit(self):
        req = bottle.request
        if not req.content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with parts 'code' and 'config_file'")
        if req.content_length < 0:  # waitress refuses bodies over max_upload_bytes itself
            raise ApiError(411, "Content-Length required")
        # Parse as Latin-1, which maps every byte to a character and back: a filename
        # in any encoding never fails the upload, and plain fields keep their bytes.
        req.environ["CONTENT_TYPE"] = req.content_type + "; charset=latin1"
        try:
            names = set(req.POST)
        except Exception:
            raise ApiError(400, "malformed multipart body") from None
        extra = names - {"code", "config_file"}
        if extra:
            raise ApiError(400, "unexpected multipart part; send only 'code' and 'config_file'")
        job, (position, start) = self.accept(_upload_part("code"), _upload_part("config_file"),
                                             _bearer(), source=req.remote_addr or "-")
        req.environ["gpuqueue.user"] = job.user_id
        bottle.response.status = 201
        return {"job_id": job.id, "node_id": job.node_id, "status": "pending",
                "queue_position": position, "estimated_start": isotime(start)}

    def accept(self, code, config_data, token=None, job_id=None, source="incoming"):
        """Check a job (script bytes, config.yaml bytes) and queue it; the one way in
        for both uploads and dropped folders.  Returns (job, Spool.queue_position's pair)."""
        if not code.strip():
            raise ApiError(400, "code is empty")
        try:
            code.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "code must be UTF-8 text") from None
        cfg = parse_job_config(config_data, self.config.max_expected_time)
        user = self._authenticate(token or cfg.get("token"), source)
        if cfg["user_id"] != user["user"] and not user["admin"]:
            raise ApiError(403, "user_id in config_file is not the token's user")
        if cfg.get("priority", 0) > 0 and not user["admin"]:
            raise ApiError(403, "only an admin may give a job a priority above 0")
        disk = os.statvfs(self.spool.root)
        if disk.f_bavail * disk.f_frsize < self.config.min_free_bytes + len(code) + len(config_data):
            raise ApiError(507, "the server's spool disk is nearly full; try again later")
        job = Job(id=job_id or new_job_id(), user_id=cfg["user_id"],
                  competition_id=cfg["competition_id"], project_id=cfg["project_id"],
                  expected_time=cfg["expected_time"], priority=cfg.get("priority", 0),
                  submitted_at=time.time(), node_id=-1)
        if "token" in cfg:  # the token never reaches the disk
            kept = {k: cfg[k] for k in JOB_KEYS if k in cfg and k != "token"}
            config_data = ("# token removed by gpuqueue\n"
                           + yaml.dump(kept, Dumper=_YAML_DUMPER)).encode()
        staged = self.spool.stage(job, code, config_data)
        online = {w.node.id for w in self.workers.values() if w.state == "online"}
        try:
            estimate = self.spool.enqueue(job, staged, online, self.config.max_pending_per_user)
        except QueueFull as full:
            shutil.rmtree(staged)
            raise ApiError(429, f"{job.user_id} already has {full} pending jobs, the most "
                                "allowed; submit more once some have started") from None
        for n, worker in self.workers.items():  # its node, and any idle one that may take it
            if n == job.node_id or not self.spool.running_jobs[n]:
                worker.wake.set()
        log.info("job %s user=%s node=%s pending", job.id, job.user_id, job.node_id)
        return job, estimate

    def status(self, job_id):
        return self._status(self._job(job_id, self._user()))

    def results(self, job_id):
        job = self._job(job_id, self._user())
        if job.status in ("pending", "running"):
            raise ApiError(409, f"job is {job.status}; results are ready once it finishes")
        stdout, stderr = self.spool.output(job.id)
        return {"job_id": job.id, "status": job.status, "stdout": stdout, "stderr": stderr,
                "exit_code": job.exit_code, "error": job.error}

    def cancel(self, job_id):
        job = self._job(job_id, self._user())
        if not self.spool.request_cancel(job):
            raise ApiError(409, f"job already {self.spool.get(job.id).status}")
        self.workers[job.node_id].wake.set()
        self.spool.wait_finished(job, self.config.kill_grace + 15)
        return self._status(self.spool.get(job.id))

    def nodes(self):
        stats = self.spool.node_stats()
        return {"nodes": [{**w.info(), **stats[n]} for n, w in sorted(self.workers.items())]}

    def jobs(self):
        user = self._user()
        query = bottle.request.query
        unknown = set(query) - {"user_id", "status", "limit", "cursor"}
        if unknown:
            raise ApiError(400, "unknown query parameter; use user_id, status, limit, cursor")
        if any(len(query.getall(k)) > 1 for k in query):
            raise ApiError(400, "each query parameter may be given once")
        status = query.get("status")
        if status is not None and status not in STATES:
            raise ApiError(400, f"status must be one of {', '.join(STATES)}")
        limit = query.get("limit", "100")
        if not (re.fullmatch(r"[0-9]{1,4}", limit) and 1 <= int(limit) <= 1000):
            raise ApiError(400, "limit must be a whole number from 1 to 1000")
        limit = int(limit)
        cursor = query.get("cursor")
        if cursor is not None and not JOB_ID_RE.match(cursor):
            raise ApiError(400, "malformed cursor")
        owner = query.get("user_id")
        if not user["admin"]:
            if owner not in (None, user["user"]):
                raise ApiError(403, "you may list only your own jobs")
            owner = user["user"]
        found, next_cursor = self.spool.find(owner, status, limit, cursor)
        return {"jobs": [self._status(j) for j in found], "next_cursor": next_cursor}

    def logs(self, job_id):
        """What a job has written so far to stdout or stderr, from a byte offset; or,
        with follow=1, a stream of NDJSON lines until the job ends."""
        job = self._job(job_id, self._user())
        query = bottle.request.query
        if set(query) - {"stream", "offset", "follow"}:
            raise ApiError(400, "unknown query parameter; use stream, offset, follow")
        if any(len(query.getall(k)) > 1 for k in query):
            raise ApiError(400, "each query parameter may be given once")
        stream = query.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise ApiError(400, "stream must be stdout or stderr")
        offset = query.get("offset", "0")
        if not re.fullmatch(r"[0-9]{1,15}", offset):
            raise ApiError(400, "offset must be a whole number of bytes")
        follow = query.get("follow", "0")
        if follow not in ("0", "1"):
            raise ApiError(400, "follow must be 0 or 1")
        if follow == "1":
            return self._follow_log(job, stream, int(offset))
        data, job = self._read_log(job, stream, int(offset))
        return {"job_id": job.id, "status": job.state, "stream": stream, "offset": int(offset),
                "next_offset": int(offset) + len(data), "data": data.decode("utf-8", "replace"),
                "complete": job.status in FINAL_STATES and not data}

    def _read_log(self, job, stream, offset):
        """(bytes from ``offset``, the job as it was when they were read)."""
        for _ in range(3):  # the job may finish, and its folder move, while we read
            job = self.spool.get(job.id)
            if job.status == "pending":
                return b"", job
            if job.status == "running":
                worker = self.workers[job.node_id]
                try:
                    data = worker.executor.read_output(job, self.spool.folder(job), stream,
                                                       offset, LOG_CHUNK)
                except NodeError as exc:
                    raise ApiError(503, f"cannot read the job's output now: {exc}") from None
                if self.spool.get(job.id).status == "running":
                    return _whole_utf8(data), job
                continue
            try:
                with open(self.spool.root / "done" / job.id / stream, "rb") as f:
                    f.seek(offset)
                    return _whole_utf8(f.read(LOG_CHUNK)), job
            except FileNotFoundError:
                return b"", job
        raise ApiError(503, "the job changed state while its output was read; try again")

    def _follow_log(self, job, stream, offset):
        if not self.followers.acquire(blocking=False):
            raise ApiError(503, f"{LOG_FOLLOWERS} outputs are followed already; try again later "
                                "or read with offsets")
        bottle.response.content_type = "application/x-ndjson"

        def lines(job, offset):
            try:
                while True:
                    try:
                        data, job = self._read_log(job, stream, offset)
                    except ApiError as exc:
                        yield json.dumps({"error": exc.message}) + "\n"
                        return
                    if data:
                        yield json.dumps({"offset": offset, "data": data.decode("utf-8", "replace")}) + "\n"
                        offset += len(data)
                    elif job.status in FINAL_STATES:
                        yield json.dumps({"end": True, "status": job.status, "exit_code": job.exit_code,
                                          "error": job.error, "next_offset": offset}) + "\n"
                        return
                    else:
                        self.spool.wait_finished(job, LOG_POLL)
            finally:
                self.followers.release()
        return lines(job, offset)

    def metrics(self):
        """Prometheus text format; no token, like /api/nodes, and no user names."""
        spool = self.spool
        stats = spool.node_stats()
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend((f"# HELP gpuqueue_{name} {help_}", f"# TYPE gpuqueue_{name} {kind}"))
            lines.extend(f"gpuqueue_{name}{labels} {value}" for labels, value in samples)

        nodes = sorted(self.workers.items())
        metric("jobs", "gauge", "Unfinished jobs by state.", [
            ('{state="pending"}', sum(len(q) for q in spool.queues.values())),
            ('{state="running"}', sum(len(r) for r in spool.running_jobs.values()))])
        metric("jobs_started_total", "counter", "Jobs launched since the server started.",
               [(f'{{node="{n}"}}', w.started) for n, w in nodes])
        metric("jobs_finished_total", "counter", "Finished jobs in the spool, by node and status.",
               [(f'{{node="{n}",status="{st}"}}', stats[n][st]) for n, _ in nodes
                for st in FINAL_STATES])
        metric("node_queue_jobs", "gauge", "Pending jobs planned for each node.",
               [(f'{{node="{n}"}}', stats[n]["queued_jobs"]) for n, _ in nodes])
        metric("node_queue_seconds", "gauge", "Expected seconds of work queued on each node.",
               [(f'{{node="{n}"}}', stats[n]["queued_seconds"]) for n, _ in nodes])
        metric("node_up", "gauge", "1 when the node is online.",
               [(f'{{node="{n}"}}', int(w.state == "online")) for n, w in nodes])
        metric("node_drained", "gauge", "1 while an admin has the node drained.",
               [(f'{{node="{n}"}}', int(n in spool.drained)) for n, _ in nodes])
        samples = []
        for n, w in nodes:
            h = w.dispatch
            samples += [(f'_bucket{{node="{n}",le="{b:g}"}}', c) for b, c in zip(h.BOUNDS, h.buckets)]
            samples += [(f'_bucket{{node="{n}",le="+Inf"}}', h.count),
                        (f'_sum{{node="{n}"}}', round(h.sum, 6)), (f'_count{{node="{n}"}}', h.count)]
        metric("dispatch_seconds", "histogram", "From a job's claim to its wrapper running.", samples)
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return "\n".join(lines) + "\n"

    def docs(self):
        bottle.response.content_type = "text/html; charset=utf-8"
        return DOCS_PAGE

    def ui(self, job_id=None):
        """The dashboard (see the Dashboard section); a job's page at /ui/job/<id>."""
        if job_id is not None and not JOB_ID_RE.match(job_id):
            raise bottle.HTTPError(404)
        nonce = secrets.token_urlsafe(16)
        res = bottle.response
        res.content_type = "text/html; charset=utf-8"
        res.set_header("Content-Security-Policy", f"default-src 'none'; script-src 'nonce-{nonce}'; "
                       f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src 'self'; "
                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        res.set_header("X-Content-Type-Options", "nosniff")
        res.set_header("Referrer-Policy", "no-referrer")
        return DASHBOARD.render(nonce=nonce, version=__version__, job_id=job_id,
                                json_job_id=json.dumps(job_id), nodes=self.nodes()["nodes"],
                                gpu_text=gpu_text, duration=duration)


def logged(app):
    """WSGI wrapper: one log line per request (address, method, path, status, user,
    time); never a header, so never a token."""
    def wsgi(environ, start_response):
        began = time.monotonic()
        status = []

        def start(line, headers, exc_info=None):
            status.append(line.split(" ", 1)[0])
            return start_response(line, headers, exc_info)
        try:
            return app(environ, start)
        finally:
            log.info("%s %s %r %s user=%s %.1f ms", environ.get("REMOTE_ADDR", "-"),
                     environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", ""),
                     status[0] if status else "-", environ.get("gpuqueue.user", "-"),
                     (time.monotonic() - began) * 1000)
    return wsgi


class _JsonErrorTask(waitress.task.ErrorTask):
    """waitress's own refusals (a body over the limit, a malformed request) as JSON too."""

    def execute(self):
        e = self.request.error
        if e.code == 413:
            message = f"upload larger than {self.channel.server.adj.max_request_body_size} bytes"
        else:
            message = f"{e.reason}: {e.body}"
        body = json.dumps({"error": message}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(waitress.channel.HTTPChannel):
    error_task_class = _JsonErrorTask


def _openapi():
    """The OpenAPI 3 document, built from small pieces so each shape is written once."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(text, schema="Error"):
        return {"description": text, "content": {"application/json": {"schema": ref(schema)}}}

    errors = {"401": answer("missing, invalid, expired or revoked token"),
              "429": answer("too many failed authentications from this address")}
    job_param = [{"name": "job_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[0-9a-f]{24}$"}}]
    lenient_id = [{**job_param[0], "schema": {"type": "string"}}]
    secured = [{"bearer": []}]
    nullable_str = {"type": ["string", "null"]}
    time_ = {"type": ["string", "null"], "format": "date-time"}
    status = {"type": "string", "enum": list(STATES)}
    job_status = {
        "type": "object",
        "required": ["job_id", "status", "node_id", "user_id", "competition_id", "project_id",
                     "expected_time", "priority", "submitted_at", "started_at", "finished_at",
                     "exit_code", "error"],
        "properties": {
            "job_id": {"type": "string"}, "status": status, "node_id": {"type": "integer"},
            "queue_position": {"type": ["integer", "null"]}, "estimated_start": time_,
            "user_id": {"type": "string"},
            "competition_id": {"type": "string"}, "project_id": {"type": "string"},
            "expected_time": {"type": "number"}, "priority": {"type": "integer"},
            "submitted_at": time_, "started_at": time_,
            "finished_at": time_, "exit_code": {"type": ["integer", "null"]},
            "error": nullable_str, "slurm_job_id": {"type": "string"},
            "slurm_state": {"type": "string"}, "slurm_reason": nullable_str}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpuqueue", "version": __version__,
                 "description": "A GPU job queue: submit a Python script and a config.yaml, "
                                "get back stdout, stderr and the exit code."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "JobStatus": job_status,
                "Submitted": {"type": "object",
                              "required": ["job_id", "node_id", "status", "queue_position",
                                           "estimated_start"],
                              "properties": {"job_id": {"type": "string"},
                                             "node_id": {"type": "integer"},
                                             "status": {"const": "pending"},
                                             "queue_position": {"type": "integer"},
                                             "estimated_start": time_}},
                "Results": {"type": "object",
                            "required": ["job_id", "status", "stdout", "stderr", "exit_code", "error"],
                            "properties": {"job_id": {"type": "string"}, "status": status,
                                           "stdout": {"type": "string"}, "stderr": {"type": "string"},
                                           "exit_code": {"type": ["integer", "null"]},
                                           "error": nullable_str}},
                "Node": {"type": "object",
                         "required": ["id", "host", "state", "drained", "error", "running_job",
                                      "queued_jobs", "queued_seconds", "completed", "failed",
                                      "cancelled"],
                         "properties": {"id": {"type": "integer"}, "host": {"type": "string"},
                                        "state": {"type": "string", "enum": ["online", "offline"]},
                                        "drained": {"type": "boolean"},
                                        "slurm": {"type": "object", "properties": {
                                            "pending": {"type": "integer"},
                                            "running": {"type": "integer"}}},
                                        "gpus": {"type": "array", "items": {
                                            "type": "object",
                                            "required": ["index", "name", "memory_used_mib",
                                                         "memory_total_mib", "utilization_pct"],
                                            "properties": {
                                                "index": {"type": "integer"},
                                                "name": {"type": "string"},
                                                "memory_used_mib": {"type": "integer"},
                                                "memory_total_mib": {"type": "integer"},
                                                "utilization_pct": {"type": "integer"}}}},
                                        "error": nullable_str, "running_job": nullable_str,
                                        "queued_jobs": {"type": "integer"},
                                        "queued_seconds": {"type": "number"},
                                        "completed": {"type": "integer"},
                                        "failed": {"type": "integer"},
                                        "cancelled": {"type": "integer"}}},
            }},
        "paths": {
            "/": {"get": {"summary": "Service info", "responses": {"200": {
                "description": "name, version, node count and queue length",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name", "version", "nodes", "queue_length"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "nodes": {"type": "integer"},
                                   "queue_length": {"type": "integer"},
                                   "docs": {"type": "string"}}}}}}}}},
            "/api/submit": {"post": {
                "summary": "Submit a job",
                "description": "The token comes from the Authorization header or, failing "
                               "that, from the config's `token` key.",
                "security": secured + [{}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["code", "config_file"],
                    "properties": {
                        "code": {"type": "string", "format": "binary",
                                 "description": "the Python script (UTF-8)"},
                        "config_file": {"type": "string", "format": "binary",
                                        "description": "YAML mapping: competition_id, project_id, "
                                                       "user_id, expected_time (seconds), optional "
                                                       "priority (-100 to 100; above 0 for admins "
                                                       "only) and token"}}}}}},
                "responses": {"201": answer("queued", "Submitted"),
                              "400": answer("bad upload or config"), **errors,
                              "403": answer("user_id is not the token's user"),
                              "429": answer("too many failed authentications, or too many "
                                            "pending jobs for this user"),
                              "507": answer("the spool's disk is nearly full"),
                              "411": answer("no Content-Length"),
                              "413": answer("upload too large"),
                              "415": answer("not multipart/form-data")}}},
            "/api/status/{job_id}": {"get": {
                "summary": "A job's status", "security": secured, "parameters": lenient_id,
                "responses": {"200": answer("the job", "JobStatus"), **errors,
                              "404": answer("no such job (or not yours)")}}},
            "/api/results/{job_id}": {"get": {
                "summary": "A finished job's output", "security": secured,
                "parameters": lenient_id,
                "responses": {"200": answer("stdout, stderr and exit code", "Results"), **errors,
                              "404": answer("no such job (or not yours)"),
                              "409": answer("the job has not finished")}}},
            "/api/cancel/{job_id}": {"post": {
                "summary": "Cancel a pending or running job", "security": secured,
                "parameters": lenient_id,
                "responses": {"200": answer("the job after the cancel", "JobStatus"), **errors,
                              "404": answer("no such job (or not yours)"),
                              "409": answer("the job had already finished")}}},
            "/api/nodes": {"get": {
                "summary": "Node statistics (no token needed)",
                "responses": {"200": {"description": "every node", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["nodes"],
                        "properties": {"nodes": {"type": "array", "items": ref("Node")}}}}}}}}},
            "/api/jobs": {"get": {
                "summary": "List jobs, newest first", "security": secured,
                "description": "Users see their own jobs; admins see everyone's.",
                "parameters": [
                    {"name": "user_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "schema": status},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                    {"name": "cursor", "in": "query", "description": "next_cursor of the page before",
                     "schema": {"type": "string", "pattern": "^[0-9a-f]{24}$"}}],
                "responses": {"200": {"description": "a page of jobs", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["jobs", "next_cursor"],
                        "properties": {"jobs": {"type": "array", "items": ref("JobStatus")},
                                       "next_cursor": nullable_str}}}}},
                    "400": answer("bad query parameter"), **errors,
                    "403": answer("another user's jobs")}}},
            "/api/logs/{job_id}": {"get": {
                "summary": "A job's output so far",
                "description": "Bytes of stdout or stderr from `offset`, read from the node while "
                               "the job runs. With follow=1: NDJSON lines ({offset, data}...) until "
                               "a last line {end, status, exit_code, error} or {error}.",
                "security": secured,
                "parameters": lenient_id + [
                    {"name": "stream", "in": "query",
                     "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}}],
                "responses": {"200": {"description": "output", "content": {
                    "application/json": {"schema": {
                        "type": "object",
                        "required": ["job_id", "status", "stream", "offset", "next_offset", "data",
                                     "complete"],
                        "properties": {"job_id": {"type": "string"}, "status": status,
                                       "stream": {"type": "string"}, "offset": {"type": "integer"},
                                       "next_offset": {"type": "integer"}, "data": {"type": "string"},
                                       "complete": {"type": "boolean"}}}},
                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                    "400": answer("bad query parameter"), **errors, "404": answer("no such job"),
                    "503": answer("the node cannot be read now, or too many follows")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format 0.0.4", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/docs": {"get": {"summary": "This document as a page", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {
                    "schema": {"type": "string"}}}}}}},
        },
    }


OPENAPI = _openapi()

#: /docs: renders /openapi.json with a few lines of script; no CDN, works offline.
DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gpuqueue API</title>
<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
h2{border-bottom:1px solid #ccc}.op{margin:1rem 0;padding:.6rem 1rem;background:#f6f8fa;border-radius:6px}
.m{font-weight:bold;font-family:monospace;margin-right:.6rem}code,pre{font-family:monospace}
pre{background:#fff;padding:.5rem;overflow:auto;max-height:20rem}</style></head>
<body><h1>gpuqueue API</h1><p id="about">Loading <a href="/openapi.json">/openapi.json</a>…</p>
<div id="ops"></div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const el = (tag, text) => { const e = document.createElement(tag); if (text) e.textContent = text; return e; };
  document.getElementById('about').textContent = spec.info.description + ' Version ' + spec.info.version + '.';
  const ops = document.getElementById('ops');
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = el('div'); box.className = 'op';
      const head = el('div'); const m = el('span', method.toUpperCase()); m.className = 'm';
      head.append(m, el('code', path), el('span', ' — ' + op.summary)); box.append(head);
      if (op.description) box.append(el('p', op.description));
      if (op.security && op.security.some(s => s.bearer)) box.append(el('p', 'Needs Authorization: Bearer <token>.'));
      for (const p of op.parameters || []) box.append(el('div', p.in + ' parameter ' + p.name + ': ' + JSON.stringify(p.schema)));
      for (const [code, r] of Object.entries(op.responses)) box.append(el('div', code + ' ' + r.description));
      ops.append(box);
    }
  }
  const h = el('h2', 'Schemas'); const pre = el('pre', JSON.stringify(spec.components.schemas, null, 2));
  ops.append(h, pre);
});
</script></body></html>
"""


###############################################################################
# Dashboard ###################################################################
###############################################################################

#: /ui and /ui/job/<id>: one Bottle template.  The server renders the page and
#: what anyone may see (the nodes); the script fills in what needs the token,
#: which is entered once, kept in the browser's localStorage and sent only as a
#: Bearer header.  No external assets: a cluster's head node is often offline.
#: Data reaches the page through textContent only, never as HTML.
DASHBOARD = bottle.SimpleTemplate(r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gpuqueue{{" – job " + job_id if job_id else ""}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="{{nonce}}">
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{display:flex;gap:1rem;align-items:center;padding:.6rem 1.2rem;background:#24292f;color:#fff}
header h1{font-size:1.1rem;margin:0}header a{color:#fff;text-decoration:none}
header form{margin-left:auto;display:flex;gap:.4rem;align-items:center}
main{padding:0 1.2rem 2rem;max-width:80rem}section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:1rem 0;padding:.4rem 1rem 1rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #eaeef2;font-variant-numeric:tabular-nums}
th{font-weight:600;color:#57606a}code,pre,.id{font-family:ui-monospace,monospace;font-size:13px}
pre{background:#f6f8fa;padding:.6rem;max-height:28rem;overflow:auto;white-space:pre-wrap;word-break:break-all}
.online,.completed{color:#1a7f37}.offline,.failed{color:#cf222e}.running{color:#0969da}.pending{color:#9a6700}.cancelled{color:#57606a}
#error{color:#cf222e;min-height:1.2rem;margin:.6rem 0 0}dl{display:grid;grid-template-columns:9rem 1fr;gap:.2rem .8rem}dd{margin:0}
button{cursor:pointer}
</style></head>
<body><header><h1><a href="/ui">gpuqueue</a></h1><span>{{version}}</span>
<form id="login"><span id="who">no token</span>
<input id="token" type="password" placeholder="your token" autocomplete="off" aria-label="token">
<button id="save" type="submit">Use token</button><button id="forget" type="button">Forget</button></form></header>
<main><p id="error" role="alert"></p>
% if job_id is None:
<section><h2>Nodes</h2><table id="nodes"><thead><tr><th>Node</th><th>Host</th><th>State</th>
<th>Running job</th><th>Queued</th><th>Queued work</th><th>GPUs</th></tr></thead><tbody>
% for n in nodes:
<tr><td>{{n["id"]}}</td><td>{{n["host"]}}</td><td class="{{n["state"]}}">{{n["state"]}}{{" (drained)" if n["drained"] else ""}}</td>
<td class="id">{{n["running_job"] or "–"}}</td><td>{{n["queued_jobs"]}}</td><td>{{duration(n["queued_seconds"])}}</td><td>{{gpu_text(n)}}</td></tr>
% end
</tbody></table></section>
<section><h2>Jobs</h2><p>Yours (an admin's token shows everyone's), newest first; your pending ones in each node's queue show their place.</p>
<table id="jobs"><thead><tr><th>Job</th><th>User</th><th>Status</th><th>Node</th><th>Queue</th>
<th>Submitted</th><th>Exit</th></tr></thead><tbody></tbody></table></section>
% else:
<section><h2>Job <span class="id" id="job-id">{{job_id}}</span></h2>
<dl id="job"></dl><button id="cancel" type="button">Cancel this job</button>
<h3>stdout</h3><pre id="stdout"></pre><h3>stderr</h3><pre id="stderr"></pre></section>
% end
</main>
<script nonce="{{nonce}}">
"use strict";
const $ = id => document.getElementById(id);
const JOB = {{!json_job_id}};
let token = localStorage.getItem("gpuqueue.token") || "";
function showError(text) { $("error").textContent = text || ""; }
async function api(path, options) {
  const r = await fetch(path, Object.assign({headers: {"Authorization": "Bearer " + token}}, options || {}));
  const body = await r.json().catch(() => ({error: "HTTP " + r.status}));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, cls, href] of cells) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (href) { const a = document.createElement("a"); a.href = href; a.textContent = text; td.append(a); }
    else td.textContent = text === null || text === undefined ? "–" : String(text);
    tr.append(td);
  }
  return tr;
}
function duration(s) {
  return s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
}
const clock = iso => iso ? new Date(iso).toLocaleString() : null;
function gpuText(n) {
  return (n.gpus || []).map(g => g.name + " " + g.memory_used_mib + "/" + g.memory_total_mib + " MiB " + g.utilization_pct + "%").join("; ") || "–";
}
async function refreshNodes() {
  const r = await fetch("/api/nodes");
  const {nodes} = await r.json();
  $("nodes").tBodies[0].replaceChildren(...nodes.map(n => row([
    [n.id], [n.host], [n.state + (n.drained ? " (drained)" : ""), n.state], [n.running_job, "id"],
    [n.queued_jobs], [duration(n.queued_seconds)], [gpuText(n)]])));
}
async function refreshJobs() {
  const {jobs} = await api("/api/jobs?limit=50");
  $("jobs").tBodies[0].replaceChildren(...jobs.map(j => {
    const queue = j.status === "pending" ? "#" + j.queue_position + ", starts ≈ " + clock(j.estimated_start) : null;
    const tr = row([[j.job_id, "id", "/ui/job/" + j.job_id], [j.user_id], [j.status, "status " + j.status],
                    [j.node_id], [queue], [clock(j.submitted_at)], [j.exit_code]]);
    tr.dataset.job = j.job_id;
    return tr;
  }));
}
const offsets = {stdout: 0, stderr: 0};
async function refreshJob() {
  const j = await api("/api/status/" + JOB);
  const items = [["status", j.status], ["user", j.user_id], ["node", j.node_id], ["priority", j.priority],
    ["queue position", j.queue_position], ["estimated start", clock(j.estimated_start)],
    ["expected", duration(j.expected_time)], ["submitted", clock(j.submitted_at)],
    ["started", clock(j.started_at)], ["finished", clock(j.finished_at)],
    ["exit code", j.exit_code], ["error", j.error]];
  $("job").replaceChildren(...items.filter(([, v]) => v !== null && v !== undefined).flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v); dd.id = "job-" + k.replace(" ", "-");
    if (k === "status") dd.className = v;
    return [dt, dd];
  }));
  $("cancel").hidden = !["pending", "running"].includes(j.status);
  for (const stream of ["stdout", "stderr"]) {
    for (;;) {  // everything new, a chunk at a time
      const part = await api("/api/logs/" + JOB + "?stream=" + stream + "&offset=" + offsets[stream]);
      if (!part.data) break;
      $(stream).append(part.data);
      offsets[stream] = part.next_offset;
    }
  }
}
async function refresh() {
  $("who").textContent = token ? "token set" : "no token";
  $("token").hidden = $("save").hidden = !!token;
  $("forget").hidden = !token;
  try {
    if (JOB === null) await refreshNodes();
    if (!token) return showError("Enter your token to see your jobs.");
    await (JOB === null ? refreshJobs() : refreshJob());
    showError("");
  } catch (e) { showError(e.message); }
}
$("login").addEventListener("submit", ev => {
  ev.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  localStorage.setItem("gpuqueue.token", token);
  refresh();
});
$("forget").addEventListener("click", () => { token = ""; localStorage.removeItem("gpuqueue.token"); refresh(); });
if (JOB !== null) $("cancel").addEventListener("click", async () => {
  try { await api("/api/cancel/" + JOB, {method: "POST"}); } catch (e) { showError(e.message); }
  refresh();
});
refresh();
setInterval(refresh, 2000);
</script></body></html>
""")


def duration(seconds):
    """Seconds for people, as the page's script writes them too."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def gpu_text(node):
    """A node's GPU figures in one line, as the page's script writes them too."""
    return "; ".join(f"{g['name']} {g['memory_used_mib']}/{g['memory_total_mib']} MiB "
                     f"{g['utilization_pct']}%" for g in node.get("gpus") or ()) or "–"


###############################################################################
# Drop folders ################################################################
###############################################################################

#: Seconds a dropped folder must have stayed unchanged before it is taken.
INCOMING_QUIET = 0.5
#: Seconds between looks into incoming/ and control/.
SPOOL_SCAN = 0.25


def watch(incoming, control):
    """The thread that looks into incoming/ and control/.  The standard library
    has no portable way to be told of a new file; one listdir each, four times a
    second, costs next to nothing."""
    _logged_step(incoming.recover)
    while True:
        _logged_step(incoming.scan)
        _logged_step(control.scan)
        time.sleep(SPOOL_SCAN)


def _logged_step(step):
    """A failed look is logged and tried again next time; the thread never dies."""
    try:
        step()
    except Exception:
        log.exception("%s failed", step.__qualname__)


class _Refused(Exception):
    """A dropped folder that is not a job; the message goes into its reason file."""


class Incoming:
    """spool/incoming/: a folder dropped there holding one ``.py`` script and a
    ``config.yaml`` (same keys as an upload, token included) becomes a job.

    The outcome stays where the folder was dropped; nothing dropped is deleted::

        NAME.<job id>.accepted/   the folder as dropped, and NAME.<job id>.receipt.json
        NAME.<time>.refused/      the folder as dropped, and NAME.<time>.reason.txt

    Names starting with '.' are never looked at: copy a folder in under a
    dot-name, then rename it.  A folder must also have been still for
    INCOMING_QUIET seconds.  It is claimed (renamed to .accepted, the job id in
    its name) before its job is queued, so after a crash in between the job is
    queued exactly once at the next start.
    """

    OUTCOME = re.compile(r"\.(?:[0-9a-f]{24}\.(?:accepted|receipt\.json)|[0-9T]{21}Z\.(?:refused|reason\.txt))\Z")
    CLAIMED = re.compile(r"\A(?P<name>.+)\.(?P<job_id>[0-9a-f]{24})\.accepted\Z")

    def __init__(self, spool, api, max_bytes):
        self.dir = spool.root / "incoming"
        self.spool = spool
        self.api = api
        self.max_bytes = max_bytes

    def recover(self):
        """Queue the jobs of folders claimed before a crash that have no receipt."""
        for entry in os.scandir(self.dir):
            m = self.CLAIMED.match(entry.name)
            if m and not (self.dir / f"{m['name']}.{m['job_id']}.receipt.json").exists():
                self._guarded(self._queue, entry.name, m["name"], m["job_id"])

    def scan(self):
        for entry in os.scandir(self.dir):
            if not (entry.name.startswith(".") or self.OUTCOME.search(entry.name)):
                self._guarded(self._take, entry.name)

    def _guarded(self, step, *args):
        try:
            step(*args)
        except Exception:
            log.exception("incoming: could not handle %r", args[0])

    def _take(self, name):
        path = self.dir / name
        if not self._quiet(path):
            return
        try:
            self._files(path)
        except _Refused as exc:
            self._refuse(name, path, str(exc))
            return
        job_id = new_job_id()
        claimed = f"{name}.{job_id}.accepted"
        os.rename(path, self.dir / claimed)
        fsync_dir(self.dir)
        self._queue(claimed, name, job_id)

    def _queue(self, claimed, name, job_id):
        """Queue a claimed folder's job (unless a crash left it queued already), then
        write its receipt."""
        path = self.dir / claimed
        job = self.spool.get(job_id)
        if job is None:
            try:
                script, config = self._files(path)
                job, (position, start) = self.api.accept(script, config, job_id=job_id)
            except (_Refused, ApiError) as exc:
                self._refuse(claimed, path, getattr(exc, "message", str(exc)), name)
                return
        else:
            position, start = self.spool.queue_position(job)
        write_json(self.dir / f"{name}.{job_id}.receipt.json", {
            "job_id": job.id, "node_id": job.node_id, "status": "pending",
            "queue_position": position, "estimated_start": isotime(start),
            "submitted_at": isotime(job.submitted_at),
            "user_id": job.user_id})
        log.info("incoming: %r became job %s", name, job.id)

    def _refuse(self, current, path, reason, name=None):
        base = f"{name or current}.{utcnow().strftime('%Y%m%dT%H%M%S%f')}Z"
        write_file(self.dir / f"{base}.reason.txt", f"refused: {reason}\n")
        os.rename(path, self.dir / f"{base}.refused")
        fsync_dir(self.dir)
        log.warning("incoming: refused %r: %s", name or current, reason)

    @staticmethod
    def _quiet(path):
        """Has nothing in the folder changed for INCOMING_QUIET seconds?"""
        newest = os.lstat(path).st_mtime
        if stat.S_ISDIR(os.lstat(path).st_mode):
            for entry in os.scandir(path):
                st = entry.stat(follow_symlinks=False)
                newest = max(newest, st.st_mtime, st.st_ctime)
        return time.time() - newest >= INCOMING_QUIET

    def _files(self, path):
        """(script bytes, config bytes) of a drop folder, or _Refused saying why not."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise _Refused("a symbolic link; drop a real folder")
        if not stat.S_ISDIR(st.st_mode):
            raise _Refused("not a folder; drop a folder holding one .py script and config.yaml")
        scripts, total = [], 0
        names = sorted(os.listdir(path))
        for n in names:
            st = os.lstat(path / n)
            if stat.S_ISLNK(st.st_mode):
                raise _Refused(f"{n!r} is a symbolic link")
            if stat.S_ISDIR(st.st_mode):
                raise _Refused(f"{n!r} is a folder; nested folders are not accepted")
            if not stat.S_ISREG(st.st_mode):
                raise _Refused(f"{n!r} is not a regular file")
            total += st.st_size
            if total > self.max_bytes:
                raise _Refused(f"larger than {self.max_bytes} bytes in all")
            if n.endswith(".py"):
                scripts.append(n)
            elif n != "config.yaml":
                raise _Refused(f"unexpected file {n!r}; a drop folder holds one .py script "
                               "and config.yaml")
        if len(scripts) != 1 or "config.yaml" not in names:
            raise _Refused("a drop folder holds exactly one .py script and one config.yaml")
        return _read_nofollow(path / scripts[0]), _read_nofollow(path / "config.yaml")


def _read_nofollow(path):
    """A file's bytes, refusing a symbolic link swapped in after it was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise _Refused(f"cannot read {path.name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


###############################################################################
# Admin control ###############################################################
###############################################################################

#: Seconds an admin command waits for the running server's reply.
CONTROL_TIMEOUT = 15
#: Replies nobody collected (their command gave up waiting) go after this long.
CONTROL_REPLY_TTL = 3600


class Control:
    """spool/control/: how the admin commands (``nodes ...``, ``jobs ...``) reach a
    running server, without a restart or a token: whoever may write the spool is
    an admin already.  A command writes ``<name>.request.json``; the server
    carries it out, writes ``<name>.reply.json`` and removes the request.  Every
    request may be carried out twice, so a crash in between does no harm: it is
    carried out again at the next start.  With no server running, a command
    opens the spool itself and carries its request out with this same class.
    """

    REQUEST = re.compile(r"\A(?P<name>[0-9a-f]{24})\.request\.json\Z")
    REPLY = re.compile(r"\A[0-9a-f]{24}\.reply\.json\Z")

    def __init__(self, config, spool, workers=None):
        self.config = config
        self.spool = spool
        self.workers = workers  # None when no server runs
        self.dir = spool.root / "control"

    def scan(self):
        for name in sorted(os.listdir(self.dir)):
            m = self.REQUEST.match(name)
            if m:
                self._answer(m["name"])
            elif self.REPLY.match(name):
                path = self.dir / name
                with contextlib.suppress(FileNotFoundError):  # its command may take it now
                    if time.time() - path.stat().st_mtime > CONTROL_REPLY_TTL:
                        path.unlink()

    def _answer(self, name):
        path = self.dir / f"{name}.request.json"
        try:
            request = read_json(path)
        except (OSError, ValueError) as exc:
            reply = {"ok": False, "error": f"unreadable request: {exc}"}
        else:
            try:
                reply = self.apply(request)
            except Exception as exc:
                log.exception("control: request %s failed", name)
                reply = {"ok": False, "error": f"internal error: {exc}"}
        write_json(self.dir / f"{name}.reply.json", reply)
        path.unlink()
        fsync_dir(self.dir)

    def apply(self, req):
        """Carry out one request; returns the reply: ``ok``, then ``error`` or the data."""
        op = req.get("op") if isinstance(req, dict) else None
        try:
            if op == "nodes":
                return {"ok": True, "nodes": self._nodes()}
            if op in ("drain", "resume"):
                return self._drain(req.get("node"), op == "drain")
            if op == "jobs":
                return self._jobs(req.get("user"), req.get("status"), req.get("limit", 50))
            if op == "cancel":
                return self._cancel(req.get("job"))
        except ApiError as exc:
            return {"ok": False, "error": exc.message}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _wake(self, node_ids):
        for n in node_ids if self.workers else ():
            self.workers[n].wake.set()

    def _nodes(self):
        stats = self.spool.node_stats()
        out = []
        for n in self.config.nodes:
            running = self.spool.running(n.id)
            info = self.workers[n.id].info() if self.workers else {
                "id": n.id, "host": n.host, "state": "server not running",
                "drained": n.id in self.spool.drained, "error": None,
                "running_job": running[0].id if running else None}
            out.append({**info, **stats[n.id]})
        return out

    def _drain(self, node, drained):
        if type(node) is not int or node not in self.spool.node_ids:
            raise ApiError(404, f"no node {node!r}; the nodes are "
                                f"{', '.join(map(str, self.spool.node_ids))}")
        self.spool.set_drained(node, drained)
        if not drained:
            self._wake([node])
            return {"ok": True, "message": f"node {node} resumed"}
        online = [n for n, w in self.workers.items() if w.state == "online"] \
            if self.workers else self.spool.node_ids
        moved = self.spool.move_pending(node, online)
        self._wake(moved)
        running = self.spool.running(node)
        message = f"node {node} drained: it starts no new job"
        if running:
            message += f"; job {running[0].id} runs to its end"
        if moved:
            message += f"; its pending jobs moved to node(s) {', '.join(map(str, sorted(moved)))}"
        return {"ok": True, "message": message}

    def _jobs(self, user, status, limit):
        if status is not None and status not in STATES:
            raise ApiError(400, f"status must be one of {', '.join(STATES)}")
        if not (isinstance(limit, int) and limit > 0):
            raise ApiError(400, "limit must be a whole number above 0")
        found, _ = self.spool.find(user, status, limit)
        jobs = []
        for job in found:
            jobs.append({**job.public(), "queue_position": self.spool.queue_position(job)[0]})
        return {"ok": True, "jobs": jobs}

    def _cancel(self, job_id):
        job = self.spool.get(job_id) if isinstance(job_id, str) and JOB_ID_RE.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no such job {job_id!r}")
        if not self.spool.request_cancel(job):
            raise ApiError(409, f"job {job.id} already {self.spool.get(job.id).status}")
        if job.status != "running":
            return {"ok": True, "message": f"job {job.id} cancelled"}
        self._wake([job.node_id])
        when = "now" if self.workers else "as soon as the server starts"
        return {"ok": True, "message": f"job {job.id} is running on node {job.node_id}: "
                                       f"it is being stopped {when}"}


def control(config, request):
    """Carry out an admin request: through the running server's control/ folder
    or, with no server running, on the spool directly."""
    spool = Spool(config.spool, [n.id for n in config.nodes])
    try:
        spool.open()
    except SpoolBusy:
        return _ask_server(spool.root / "control", request)
    try:
        return Control(config, spool).apply(request)
    finally:
        spool.close()


def _ask_server(folder, request):
    name = new_job_id()
    write_json(folder / f"{name}.request.json", request)
    reply = folder / f"{name}.reply.json"
    deadline = time.monotonic() + CONTROL_TIMEOUT
    while not reply.exists():
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"the server did not answer within {CONTROL_TIMEOUT} s; the request stays in "
                f"{folder} and is carried out when it does")
        time.sleep(0.1)  # a command's own wait, not the server's: nothing to be woken by
    answer = read_json(reply)
    reply.unlink()
    return answer


###############################################################################
# CLI #########################################################################
###############################################################################


@click.group()
@click.option("--config", "config_path", envvar="GPUQUEUE_CONFIG", type=click.Path(dir_okay=False),
              help=f"Config file (default: ./{DEFAULT_CONFIG_FILE} when present, else 8 local nodes).")
@click.pass_context
def cli(ctx, config_path):
    """gpuqueue: a GPU job queue server."""
    if config_path is None and Path(DEFAULT_CONFIG_FILE).exists():
        config_path = DEFAULT_CONFIG_FILE
    try:
        ctx.obj = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--host", help="Address to listen on (default: config 'host').")
@click.option("--port", type=int, help="Port (default: config 'port'; 0 picks a free one).")
@click.pass_obj
def serve(config, host, port):
    """Start the server and one scheduler thread per node."""
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("paramiko").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" per burst
    spool = Spool(config.spool, [n.id for n in config.nodes])
    try:
        spool.open()
    except SpoolBusy as exc:
        raise click.ClickException(str(exc)) from None
    workers = {}
    kinds = {"local": (LocalExecutor, NodeWorker), "ssh": (SshExecutor, NodeWorker),
             "slurm": (SlurmExecutor, SlurmWorker)}
    for n in config.nodes:
        executor_class, worker_class = kinds[n.kind]
        workers[n.id] = worker_class(n, spool, executor_class(n, config), config, workers)
    api = Api(config, spool, Tokens(config.tokens), workers)
    server = waitress.create_server(
        logged(api.app), host=host or config.host, port=config.port if port is None else port,
        threads=8, max_request_body_size=config.max_upload_bytes,
        channel_timeout=60, connection_limit=200, clear_untrusted_proxy_headers=True)
    server.channel_class = _JsonErrorChannel
    control = Control(config, spool, workers)
    _logged_step(control.scan)  # requests left from before a restart: before any job starts
    for w in workers.values():
        w.start()
    threading.Thread(target=watch_gpus, args=(workers,), name="gpus", daemon=True).start()
    threading.Thread(target=watch, name="watch", daemon=True, args=(
        Incoming(spool, api, config.max_upload_bytes), control)).start()
    shown = "127.0.0.1" if server.effective_host in ("0.0.0.0", "::") else server.effective_host
    click.echo(f"gpuqueue {__version__} listening on http://{shown}:{server.effective_port} "
               f"with {len(workers)} node(s); spool {config.spool}", err=False)
    click.echo(f"create a token: python gpuqueue.py tokens create USER --days 30", err=False)
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        spool.close()


@cli.group()
def tokens():
    """Create, list and revoke access tokens."""


@tokens.command("create")
@click.argument("user")
@click.argument("token", required=False)
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True,
              help="Days until the token expires.")
@click.option("--admin", is_flag=True, help="May see and cancel every user's jobs.")
@click.pass_obj
def tokens_create(config, user, token, days, admin):
    """Create a token for USER (a random one unless TOKEN is given)."""
    generated = token is None
    token, rec = Tokens(config.tokens).create(user, token, days, admin)
    click.echo(f"created token {fingerprint(rec['sha256'])} for {user}"
               f"{' (admin)' if admin else ''}, expires {rec['expires']}")
    if generated:
        click.echo(f"token (shown only now): {token}")


@tokens.command("list")
@click.pass_obj
def tokens_list(config):
    """List tokens: user, admin, dates and fingerprint; never the token."""
    click.echo(f"{'FINGERPRINT':<13} {'USER':<20} {'ADMIN':<5} {'CREATED':<25} {'EXPIRES':<25} REVOKED")
    for r in Tokens(config.tokens).records():
        click.echo(f"{fingerprint(str(r.get('sha256'))):<13} {r.get('user', '?'):<20} "
                   f"{'yes' if r.get('admin') else 'no':<5} {r.get('created', ''):<25} "
                   f"{r.get('expires', ''):<25} {r.get('revoked') or '-'}")


@tokens.command("revoke")
@click.argument("token_or_fingerprint")
@click.pass_obj
def tokens_revoke(config, token_or_fingerprint):
    """Revoke a token, given the token itself or its fingerprint."""
    rec = Tokens(config.tokens).revoke(token_or_fingerprint)
    click.echo(f"revoked token {fingerprint(rec['sha256'])} of {rec.get('user')}")


# -- client commands: the HTTP API for people and scripts ----------------------


class Client:
    """The HTTP API as the client commands call it (the standard library's urllib:
    nothing more to install on a user's machine)."""

    def __init__(self, server, token):
        self.server = server.rstrip("/")
        self.token = token

    def _request(self, method, path, body=None, headers=None):
        if not self.token:
            raise click.ClickException("no token: pass --token or set GPUQUEUE_TOKEN")
        return urllib.request.Request(
            self.server + path, data=body, method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})})

    def _open(self, request, timeout=60):
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise click.ClickException(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            raise click.ClickException(f"cannot reach {self.server}: "
                                       f"{getattr(exc, 'reason', exc)}") from None

    def call(self, method, path, body=None, headers=None):
        with self._open(self._request(method, path, body, headers)) as r:
            return json.load(r)

    def lines(self, path):
        """The NDJSON lines of a streamed answer, as they arrive."""
        try:
            with self._open(self._request("GET", path), timeout=None) as r:
                for line in r:
                    yield json.loads(line)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"the stream from {self.server} broke: {exc}") from None

    def submit(self, script, config):
        boundary = secrets.token_hex(16)
        body = b""
        for name, filename, data in (("code", Path(script).name, Path(script).read_bytes()),
                                     ("config_file", Path(config).name, Path(config).read_bytes())):
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{urllib.parse.quote(filename)}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return self.call("POST", "/api/submit", body,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _client_options(command):
    """--server, --token and --json, for a command that talks to the server; the
    command gets ``client`` (a Client) and ``as_json``."""
    @click.option("--server", envvar="GPUQUEUE_URL", default="http://127.0.0.1:8000",
                  show_default=True, help="The server's URL (or GPUQUEUE_URL).")
    @click.option("--token", envvar="GPUQUEUE_TOKEN", help="Your token (or GPUQUEUE_TOKEN).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
    @functools.wraps(command)
    def with_client(*args, server, token, **kw):
        return command(*args, client=Client(server, token), **kw)
    return with_client


def _show(job):
    """A job's status, for people."""
    line = f"{job['job_id']}  {job['status']}  node {job['node_id']}  user {job['user_id']}"
    if job["status"] == "pending" and job.get("queue_position") is not None:
        line += (f"\n  queue position {job['queue_position']}, estimated start "
                 f"{job.get('estimated_start') or '-'}")
    for key in ("submitted_at", "started_at", "finished_at"):
        if job.get(key):
            line += f"\n  {key.replace('_at', ''):<9} {job[key]}"
    if job["status"] in FINAL_STATES:
        line += f"\n  exit code {job['exit_code']}"
        if job["error"] and job["error"] != f"exit code {job['exit_code']}":
            line += f": {job['error']}"
    return line


def _exit_status(results):
    """The shell status that stands for a job's end: its exit code, 128 + the
    signal that killed it, or 1 when it has none (cancelled, timeout, lost)."""
    code = results["exit_code"]
    if code is None:
        return 1
    return 128 - code if code < 0 else min(code, 255)


def _print_results(results, as_json):
    if as_json:
        click.echo(json.dumps(results, indent=1))
        return
    click.echo(results["stdout"], nl=False)
    click.echo(results["stderr"], nl=False, err=True)
    if results["error"]:
        click.echo(f"gpuqueue: job {results['job_id']} {results['status']}: {results['error']}",
                   err=True)


@cli.command()
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.option("-c", "--config", "job_config", required=True,
              type=click.Path(exists=True, dir_okay=False), help="The job's config.yaml.")
@click.option("--wait", is_flag=True, help="Wait for the job, show its progress, print its "
                                           "output and exit with its exit code.")
@_client_options
def submit(script, job_config, wait, client, as_json):
    """Submit SCRIPT with its config.yaml."""
    job = client.submit(script, job_config)
    if not wait:
        click.echo(json.dumps(job, indent=1) if as_json else
                   f"{job['job_id']}  pending on node {job['node_id']}, queue position "
                   f"{job['queue_position']}, estimated start {job['estimated_start']}")
        return
    if not as_json:
        click.echo(f"job {job['job_id']} queued on node {job['node_id']}", err=True)
    results = _wait(client, job["job_id"], show=not as_json)
    _print_results(results, as_json)
    sys.exit(_exit_status(results))


def _wait(client, job_id, show):
    """Poll a job until it ends, with one progress line on stderr; its results."""
    tty = sys.stderr.isatty()
    last = None
    while True:
        job = client.call("GET", f"/api/status/{job_id}")
        if job["status"] in FINAL_STATES:
            if show and tty and last:
                click.echo("", err=True)
            return client.call("GET", f"/api/results/{job_id}")
        if job["status"] == "pending":
            line = (f"pending: queue position {job['queue_position']}, "
                    f"estimated start {job['estimated_start']}")
        else:
            started = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
            elapsed = (datetime.now(timezone.utc) - started).total_seconds()
            line = (f"running on node {job['node_id']}: {elapsed:.0f} s of "
                    f"{job['expected_time']:g} s expected")
        if show and line != last:
            click.echo(("\r\033[K" + line) if tty else line, err=True, nl=not tty)
            last = line
        time.sleep(1)  # a client's poll; the server holds no connection open for it


@cli.command()
@click.argument("job_id")
@_client_options
def status(job_id, client, as_json):
    """A job's status."""
    job = client.call("GET", f"/api/status/{urllib.parse.quote(job_id)}")
    click.echo(json.dumps(job, indent=1) if as_json else _show(job))


@cli.command()
@click.argument("job_id")
@_client_options
def results(job_id, client, as_json):
    """A finished job's stdout (and stderr, on stderr)."""
    _print_results(client.call("GET", f"/api/results/{urllib.parse.quote(job_id)}"), as_json)


@cli.command()
@click.argument("job_id")
@_client_options
def cancel(job_id, client, as_json):
    """Cancel a pending or running job."""
    job = client.call("POST", f"/api/cancel/{urllib.parse.quote(job_id)}")
    click.echo(json.dumps(job, indent=1) if as_json else _show(job))


@cli.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), default="stdout", show_default=True)
@_client_options
def logs(job_id, follow, stream, client, as_json):
    """What a job has written so far, read from its node while it runs."""
    path = f"/api/logs/{urllib.parse.quote(job_id)}?stream={stream}"
    out = sys.stdout
    if not follow:
        offset = 0
        while True:
            part = client.call("GET", f"{path}&offset={offset}")
            if as_json:
                click.echo(json.dumps(part))
            else:
                out.write(part["data"])
            if part["next_offset"] == offset:
                return
            offset = part["next_offset"]
    for line in client.lines(f"{path}&follow=1"):
        if as_json:
            click.echo(json.dumps(line))
        elif "data" in line:
            out.write(line["data"])
            out.flush()
        if line.get("end"):
            return
        if "error" in line:
            raise click.ClickException(f"following the output failed: {line['error']}")
    raise click.ClickException("the output stream ended before the job did")


# -- admin commands: through the spool, on the server's machine -----------------


def _admin(config, request):
    """An admin request's reply, or the command's error."""
    reply = control(config, request)
    if not reply.get("ok"):
        raise click.ClickException(reply.get("error", "failed"))
    return reply


@cli.group()
def nodes():
    """See, drain and resume nodes on a running server (admins: run where the spool is)."""


@nodes.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def nodes_list(config, as_json):
    """Each node: state, drained, running job, queue."""
    found = _admin(config, {"op": "nodes"})["nodes"]
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    click.echo(f"{'NODE':<5} {'HOST':<20} {'STATE':<18} {'DRAINED':<8} {'RUNNING':<25} "
               f"{'QUEUED':>6} {'QUEUED_S':>9}  ERROR")
    for n in found:
        click.echo(f"{n['id']:<5} {n['host'][:20]:<20} {n['state']:<18} "
                   f"{'yes' if n['drained'] else 'no':<8} {n['running_job'] or '-':<25} "
                   f"{n['queued_jobs']:>6} {n['queued_seconds']:>9g}  {n['error'] or ''}")


@nodes.command("drain")
@click.argument("node", type=int)
@click.pass_obj
def nodes_drain(config, node):
    """Let NODE finish its running job and start no new one; its pending jobs move elsewhere."""
    click.echo(_admin(config, {"op": "drain", "node": node})["message"])


@nodes.command("resume")
@click.argument("node", type=int)
@click.pass_obj
def nodes_resume(config, node):
    """Let a drained NODE start jobs again."""
    click.echo(_admin(config, {"op": "resume", "node": node})["message"])


@cli.group(invoke_without_command=True)
@click.option("--status", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--user", help="Only this user's jobs (admins).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@_client_options
@click.pass_context
def jobs(ctx, status, user, limit, client, as_json):
    """Your jobs from the server, newest first (admins on the server's machine also
    have 'jobs list' and 'jobs cancel', which go through the spool)."""
    if ctx.invoked_subcommand is not None:
        return
    query = urllib.parse.urlencode({k: v for k, v in (("status", status), ("user_id", user),
                                                      ("limit", limit)) if v is not None})
    found = client.call("GET", f"/api/jobs?{query}")["jobs"]
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    click.echo(f"{'JOB':<25} {'USER':<16} {'STATUS':<10} {'NODE':>4} {'SUBMITTED':<20} EXIT")
    for j in found:
        click.echo(f"{j['job_id']:<25} {j['user_id'][:16]:<16} {j['status']:<10} {j['node_id']:>4} "
                   f"{j['submitted_at'][:19]:<20} {'-' if j['exit_code'] is None else j['exit_code']}")


@jobs.command("list")
@click.option("--status", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--user", help="Only this user's jobs.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def jobs_list(config, status, user, limit, as_json):
    """Jobs newest first."""
    found = _admin(config, {"op": "jobs", "status": status, "user": user, "limit": limit})["jobs"]
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    click.echo(f"{'JOB':<25} {'USER':<16} {'STATUS':<10} {'NODE':>4} {'POS':>4} {'PRIO':>4} "
               f"{'EXPECTED':>8} {'SUBMITTED':<20} EXIT")
    for j in found:
        position = "-" if j["queue_position"] is None else j["queue_position"]
        click.echo(f"{j['job_id']:<25} {j['user_id'][:16]:<16} {j['status']:<10} {j['node_id']:>4} "
                   f"{position:>4} {j['priority']:>4} {j['expected_time']:>8g} "
                   f"{j['submitted_at'][:19]:<20} "
                   f"{'-' if j['exit_code'] is None else j['exit_code']}")


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_obj
def jobs_cancel(config, job_id):
    """Cancel any user's job, pending or running."""
    click.echo(_admin(config, {"op": "cancel", "job": job_id})["message"])


if __name__ == "__main__":
    cli()
