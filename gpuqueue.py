#!/usr/bin/env python3
"""gpuqueue: a GPU job queue server for a small team sharing a few GPU nodes.

Users upload a Python script and a ``config.yaml``; the server queues the job on
the node with the least queued work, runs it there (or on whichever node falls
idle first, users taking turns), and hands back stdout, stderr and the exit
code.  One module, read top to bottom:

    errors -> configuration -> filesystem primitives -> node program -> spool
    -> tokens -> executors -> job requests -> node workers -> background threads
    -> scheduler (the front door) -> HTTP API -> dashboard -> drop folders
    -> admin control -> CLI

Each piece of state has one owner, which alone changes it: the spool's folders
and its in-memory index (Jobs included) are the Spool's, changed under its lock;
what a job folder holds is JobFolder's to name; a node's connection and the jobs
it follows are its worker's; the names of the files on a node and the messages
to and from its agent are the node program's (NodeFiles, COMMANDS, REPORTS).
The HTTP API, drop folders and admin control reach the queue through the
Scheduler alone.  A job's fields are declared once, in Job; a config key once,
in Config; a job's end travels as one Outcome.

The spool directory is the only state.  Its layout::

    spool/
      server.lock, server.pid   held by the one server using this spool
      tmp/<id>/                 an upload being written; never acknowledged yet
                                (tmp/<array id>/: an array's, queued at recovery once
                                arrays/<array id>.json, its commit point, is written)
      scratch/<name>/           a front end's files in the making (Spool.scratch_dir),
                                emptied at each start
      arrays/<id>.json          an array's record: its user and job ids
      keys/<hash>.json          an Idempotency-Key's record (KEY_TTL)
      outbox/<id>.json          a job's (or an array's) notice, until it is delivered
      nodes/<n>/pending/<id>/   queued on node n (its planned node)
      nodes/<n>/running/<id>/   claimed by node n's scheduler
      nodes/<n>/drained         present while an admin has node n drained
      nodes/<n>/work/           a local node's workdir, unless its config names one
      done/<id>/                finished: completed, failed or cancelled (removed
                                after keep_finished_days, through tmp/<id>.expired)
      done.index                what start-up needs of done/, derived from it (DoneIndex)
      corrupt/<name>.<x>/       what could not be understood; <name>.<x>.REASON says why
                                (removed after keep_finished_days too)
      incoming/                 drop folders (see the Drop folders section)
      claims/                   the server's own claims of drop folders (Incoming)
      control/                  admin requests to the running server (Admin control)

What a job folder holds is JobFolder's to know (see its names).  Every node,
local or remote, runs the node program (its own section below): one agent per
node and a wrapper per job, in ``<workdir>/<id>`` on the node, which holds what
NodeFiles names.

Every file is published where no reader looks yet (a temporary name, or a
folder still private to its writer), fsynced, renamed into place, and its
directory fsynced; every state change is one rename.

Recovery at start-up: what is on disk -> what happens, and the one method
that does it:

    tmp/<id>                                 removed: its submit was never answered
                                             (Spool._recover)
    any job folder with result.json          moved to done/: the move was cut short
                                             (Spool._load)
    not a job: no or bad job.json, a name    moved to corrupt/ with a .REASON file
    that is no id, an id other than its own, (Spool._load, via JobFolder.load)
    a second copy of a job, a stray file
    running/<id> without ``launching``       back to pending/: nothing reached the node
    (nor start.json, of a release before     (Spool._load)
    0.3)
    running/<id>, node folder not launched,  the launch claimed here (``launched`` a link
    or ``launched`` a link to ``void``: a    to ``void``), back to pending/
    recovery cut short after its claim       (AgentExecutor.reattach -> Spool.requeue)
    running/<id>, prepared, never started    back to pending/: its launch is claimed here,
                                             and its wrapper, which waited for its agent's
                                             word, ended with that agent
                                             (AgentExecutor.reattach -> Spool.requeue)
    running/<id>, wrapper still running      followed to its end (AgentExecutor.reattach)
    running/<id>, wrapper of an unknown      stopped, the job failed with the reason
    node protocol                            (AgentExecutor.reattach)
    running/<id>, local, work/ inside it     left by a release before node protocol 2:
                                             its result collected, else stopped and
                                             failed with the reason
                                             (AgentExecutor._old_local_run)
    running/<id>, wrapper left a result      its output and exit code collected
                                             (AgentExecutor.collect)
    running/<id>, wrapper gone, no result    failed with a clear error (AgentExecutor.collect)
    running/<id>, node unreachable           retried with backoff; failed only once the
                                             node stays away ``unreachable_grace``
                                             seconds past the job's time limit
                                             (GpuWorker._reattach)
    running/<id>, Slurm, slurm.json          followed in Slurm by that id
                                             (SlurmWorker._recover)
    running/<id>, Slurm, launching, no id    looked up in Slurm by its attempt's name
                                             (slurm_name: gq-<id>[.<attempt>]): followed
                                             if found; failed if it ran and Slurm forgot
                                             it; else back to pending/
                                             (SlurmWorker._recover)
    running/<id>, Slurm, no ``launching``    back to pending/: nothing reached sbatch
                                             (SlurmWorker._recover)
    claims/<id>.json (a drop folder's claim) its job queued (unless it already is), its
                                             receipt written, its results delivered as
                                             its jobs end (Incoming.recover); a name in
                                             incoming/ that looks like a claim and is
                                             none of these is left alone; a claim whose
                                             folder is gone, dropped (Incoming._queue)
    done.index missing, cut short, or not    made again from each finished job's
    the ids in done/ (count and sum)         result.json (Spool._load_done)

A job is never launched twice: the wrapper claims ``launched`` with O_EXCL before
it starts the job, and recovery claims the same name (as a link, which an O_EXCL
create fails on, so that a later recovery tells its claim from a wrapper's) before
requeueing one; a Slurm job is looked up by name before it is submitted again.
"""

from __future__ import annotations

import abc
import argparse
import base64
import bisect
import collections
import contextlib
import copy
import errno
import dataclasses
import functools
import hashlib
import heapq
import hmac
import http.client
import importlib
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pwd
import re
import secrets
import selectors
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



class _OnFirstUse:
    """A third-party module, imported when first used rather than when gpuqueue.py
    loads: the client commands use none, so gpuqueue.py copied to a laptop runs them
    on a bare python3 (the server's commands import what they need; see main)."""

    def __init__(self, name):
        self._name = name
        self._module = None

    def __getattr__(self, attr):
        if self._module is None:  # requests read bottle.request often: import once
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


bottle = _OnFirstUse("bottle")
filelock = _OnFirstUse("filelock")
yaml = _OnFirstUse("yaml")

__version__ = "0.3.0"

log = logging.getLogger("gpuqueue")

###############################################################################
# Errors ######################################################################
###############################################################################


class GpuqueueError(Exception):
    """Every refusal gpuqueue makes, raised by the core without knowing who asked.

    The HTTP API turns each kind into a status code (one table: HTTP_STATUS), the
    CLI into its one-line error, a drop folder into its reason file.  The message
    is for people: it says what was wrong and, where it can, what to do instead.
    """

    @property
    def message(self):
        return str(self)


class BadRequest(GpuqueueError):
    """What was sent cannot be a job or a request: the message names the part."""


class Unauthorized(GpuqueueError):
    """No token, or one that is unknown, expired or revoked.  ``guess`` is true for
    a token nobody was ever given: only those count towards the throttle."""

    def __init__(self, message, guess=False):
        super().__init__(message)
        self.guess = guess


class Forbidden(GpuqueueError):
    """A valid token that may not do this."""


class NotFound(GpuqueueError):
    """No such job or node (or not one this caller may see)."""


class Conflict(GpuqueueError):
    """Not possible in the job's present state (e.g. results of a running job)."""


class KeyReused(GpuqueueError):
    """An Idempotency-Key sent again with a different request."""


class TooMany(GpuqueueError):
    """A limit on how much one caller may have or do at once; ``retry_after``: seconds
    until it lifts, when known."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(GpuqueueError):
    """Cannot be done now; the same request may work later."""


class DiskFull(Unavailable):
    """The spool's disk is too full to accept more."""


class NodeError(Unavailable):
    """A node could not be reached or answered wrongly; shown in /api/nodes."""


class LeaseUnconfirmed(NodeError):
    """A node did not confirm a job's start before the start's lease ended."""

    def __init__(self, message, lease):
        super().__init__(message)
        self.lease = lease


class ConfigError(GpuqueueError):
    """The config file is wrong; the message names the key."""


class SpoolBusy(GpuqueueError):
    """Another server holds this spool."""


class SlurmRefused(GpuqueueError):
    """sbatch said no (a bad partition, account or gres): the job fails with its words."""


###############################################################################
# Configuration ###############################################################
###############################################################################

#: Where ``--config`` points when not given and this file exists (in the current
#: folder, else beside gpuqueue.py).
DEFAULT_CONFIG_FILE = "gpuqueue.yaml"


def default_config_file():
    """./gpuqueue.yaml, else gpuqueue.yaml beside this file; None when neither is there
    (then the built-in default serves)."""
    for path in (Path(DEFAULT_CONFIG_FILE), Path(__file__).resolve().parent / DEFAULT_CONFIG_FILE):
        if path.exists():
            return path
    return None

_REQUIRED = object()
_NUMBER = (int, float)


def setting(types, default, parse=None, above=None, least=None):
    """A key of the config file, declared on the Config field it becomes: the types
    it accepts, its default, a bound (``above`` or ``least``) and ``parse``, which
    turns the checked value into the field's (it gets the value, the checked
    mapping and the config file's folder).  load_config reads nothing else."""
    return dataclasses.field(metadata={"setting": (types, default, parse, above, least)})


def _number(value, c, base):
    return float(value)


def _relative(value, c, base):
    return base / value


def _path(value, base):
    return str((base / Path(value).expanduser()).resolve()) if value is not None else None


def _log_level(value, c, base):
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("config: 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    return value.upper()


def _nodes(value, c, base):
    raw_nodes = value if value is not None else [{"id": i, "host": "local"} for i in range(8)]
    if not raw_nodes:
        raise ConfigError("config: 'nodes' must list at least one node")
    defaults = c["node_defaults"]
    if {"id", "host"} & set(defaults):
        raise ConfigError("config: node_defaults may not set 'id' or 'host'")
    nodes = tuple(_node(n, defaults, base, f"config: nodes[{i}]", c)
                  for i, n in enumerate(raw_nodes))
    if len({n.id for n in nodes}) != len(nodes):
        raise ConfigError("config: node ids must be unique")
    return tuple(sorted(nodes, key=lambda n: n.id))


def _jump(value, c, base):
    return _ssh_target(_checked(value, _JUMP_KEYS, "config: jump"), base) if value else None


def _environments(value, c, base):
    """``environments``: name -> {python, setup}, what a job asks for by name."""
    out = {}
    for name, env in value.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)):
            raise ConfigError(f"config: environments: {name!r} is not a name (letters, "
                              "digits, '_', '.', '-')")
        env = _checked(env, {"python": (str, _REQUIRED), "setup": (str, None)},
                       f"config: environments: {name}")
        out[name] = Environment(name, env["python"], env["setup"])
    return out


@dataclasses.dataclass(frozen=True)
class Webhooks:
    """Where jobs' notices may go (``allow``: URL prefixes) and the key they are
    signed with (read from the environment variable ``secret_env`` names)."""
    secret: bytes
    allow: tuple


def _webhooks(value, c, base):
    if not value:
        return None
    w = _checked(value, {"secret_env": (str, _REQUIRED), "allow": (list, _REQUIRED)},
                 "config: webhooks")
    secret = os.environ.get(w["secret_env"])
    if not secret:
        raise ConfigError(f"config: webhooks: the environment variable {w['secret_env']} "
                          "(secret_env) is not set; it holds the key notices are signed with")
    for prefix in w["allow"]:
        if not (isinstance(prefix, str) and _url_parts(prefix)):
            raise ConfigError(f"config: webhooks: allow: {prefix!r} is not an http(s) URL")
    return Webhooks(secret.encode(), tuple(w["allow"]))


def _url_parts(url):
    """(scheme, host:port, path) of an http(s) URL without credentials, or None."""
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # a port that is not a number raises here
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or "@" in u.netloc \
            or any(ch.isspace() or ch in "\\" for ch in url):
        return None
    return u.scheme, u.netloc.lower(), u.path or "/"


def url_allowed(url, allow):
    """Is ``url`` under one of the ``allow`` prefixes: the same scheme and host, and a
    path below the prefix's, a whole path segment at a time?"""
    mine = _url_parts(url)
    for prefix in allow:
        theirs = _url_parts(prefix)
        if mine and theirs and mine[:2] == theirs[:2]:
            base = theirs[2].rstrip("/") + "/"
            if mine[2] == theirs[2] or (mine[2].rstrip("/") + "/").startswith(base):
                return True
    return False


#: Held while the machine's python3 is looked for: every node's thread asks at its
#: first job, at the same moment, and a launcher started by each would hold up all.
_SYSTEM_PYTHON_LOCK = threading.Lock()


def system_python():
    """The python3 a user of this machine gets: the first on PATH outside the
    server's own virtualenv, so that jobs never run inside it.  Asked once which
    interpreter it is: a launcher (a pyenv shim, say) would cost every job's start
    its own start-up."""
    with _SYSTEM_PYTHON_LOCK:
        return _system_python()


@functools.cache
def _system_python():
    venv = os.path.realpath(sys.prefix) if sys.prefix != sys.base_prefix else None
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or venv and os.path.realpath(folder).startswith(venv + os.sep):
            continue
        found = shutil.which("python3", path=folder)
        if found:
            try:
                real = subprocess.run([found, "-c", "import sys; print(sys.executable)"],
                                      capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                real = ""
            return real if real and os.path.isfile(real) else found
    base = os.path.join(sys.base_prefix, "bin", "python3")
    return base if os.path.exists(base) else "python3"


def _addresses(values, c, base):
    """``trusted_proxies``: IP addresses, as strings."""
    for v in values:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ConfigError(f"config: trusted_proxies: {v!r} is not an IP address") from None
    return frozenset(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class SshTarget:
    """Where and how to log in over SSH: a node or the jump host."""
    host: str
    port: int
    user: str | None
    key_file: str | None
    password_env: str | None


@dataclasses.dataclass(frozen=True)
class Environment:
    """What a job may ask to run with: an interpreter, and a shell line run first
    (``module load cuda/12``); both the admin's, never a user's."""
    name: str
    python: str
    setup: str | None = None


@dataclasses.dataclass(frozen=True)
class Node:
    id: int
    host: str
    python: str
    gpus: tuple  # its GPUs as CUDA_VISIBLE_DEVICES names them (indexes or UUIDs)
    env: dict
    workdir: str | None  # None: the default (see _NODE_KEYS)
    setup: str | None
    ssh: SshTarget | None  # None for a local node
    kind: str = "local"
    run_as: str | None = None  # a local node's jobs run as this user (the server is root)
    slurm: dict | None = None  # partition, account, gres, max_jobs of a slurm node
    #: The interpreter of its jobs that ask for no environment: ``python`` when given;
    #: None on a local node: the machine's python3 (system_python), never the
    #: server's virtualenv.
    job_python: str | None = "python3"
    environments: tuple = ()  # the names of the config's environments it has
    #: Where ``gpus`` came from: "config", or "default" (then an SSH node's are the
    #: ones its nvidia-smi lists, once read: "nvidia-smi").
    gpus_from: str = "config"

    @property
    def is_local(self):
        return self.ssh is None


@dataclasses.dataclass(frozen=True)
class Config:
    """The server's config: each field is one key of the config file, declared here
    once (``setting``); ``source`` is the file itself, when there is one."""
    host: str = setting(str, "0.0.0.0")
    port: int = setting(int, 8000)
    spool: Path = setting(str, "spool", _relative)
    tokens: Path = setting(str, "tokens.yaml", _relative)
    timeout_multiplier: float = setting(_NUMBER, 2, _number, above=0)
    max_expected_time: float = setting(_NUMBER, 86400, _number, above=0)
    max_upload_bytes: int = setting(int, 16 * 1024 * 1024, least=1024)
    output_limit_bytes: int = setting(int, 10 * 1024 * 1024, least=1024)
    kill_grace: float = setting(_NUMBER, 10, _number, above=0)
    log_level: str = setting(str, "INFO", _log_level)
    node_defaults: dict = setting(dict, {})  # already applied to each of ``nodes``
    nodes: tuple = setting(list, None, _nodes)  # None: 8 local nodes
    jump: SshTarget | None = setting(dict, None, _jump)
    known_hosts: Path = setting(str, "~/.ssh/known_hosts",
                                lambda v, c, base: Path(_path(v, base)))
    accept_new_host_keys: bool = setting(bool, False)
    keep_remote_dirs: bool = setting(bool, False)
    unreachable_grace: float = setting(_NUMBER, 300, _number, above=0)
    node_timeout: float = setting(_NUMBER, 20, _number, above=0)
    max_pending_per_user: int = setting(int, 100, least=1)
    min_free_bytes: int = setting(int, 1024 ** 3, least=0)
    auth_failures_per_minute: int = setting(int, 10, least=1)
    trusted_proxies: frozenset = setting(list, [], _addresses)
    keep_finished_days: float = setting(_NUMBER, 30, _number, least=0)  # 0: forever
    #: Seconds a submit with ?wait=1 waits for its job at most (then: poll results).
    max_wait_seconds: float = setting(_NUMBER, 4 * 3600, _number, above=0)
    #: A GPU using more than this outside the queue takes no job.
    foreign_memory_mib: int = setting(int, 1024, least=0)
    #: A project (an archive as ``code``) unpacked: its bytes and its files.
    max_project_bytes: int = setting(int, 256 * 1024 ** 2, least=1024)
    max_project_files: int = setting(int, 10000, least=1)
    #: What a job leaves in $GPUQUEUE_OUTPUT_DIR that is brought back, at most.
    max_output_files_bytes: int = setting(int, 1024 ** 3, least=0)
    max_output_files: int = setting(int, 1000, least=0)
    environments: dict = setting(dict, {}, _environments)  # name -> Environment
    max_array_size: int = setting(int, 1000, least=1)  # jobs in one array or sweep
    #: Notices of a job's end (``notify``): None when the server sends none.
    webhooks: Webhooks | None = setting(dict, None, _webhooks)
    source: Path | None = None

    def time_limit(self, expected_time):
        """Seconds a job may run before it is killed as a timeout."""
        return self.timeout_multiplier * expected_time

    @property
    def gpu_counts(self):
        return {n.id: len(n.gpus) for n in self.nodes}


#: Top-level config keys: (accepted types, default), from Config's declarations.
_CONFIG_KEYS = {f.name: f.metadata["setting"][:2] for f in dataclasses.fields(Config)
                if "setting" in f.metadata}

#: Keys of one entry under ``nodes`` (and of ``node_defaults``, less id and host).
_NODE_KEYS = {
    "id": (int, _REQUIRED),
    "host": (str, _REQUIRED),
    "port": (int, 22),
    "user": (str, None),
    "key_file": (str, None),
    "password_env": (str, None),
    "python": (str, None),
    "workdir": (str, None),  # ssh: ~/.gpuqueue; local: nodes/<id>/work in the spool
    "env": (dict, {}),
    "setup": (str, None),
    "gpus": ((str, int, list), None),  # "0,1,2,3" or [0, 1, 2, 3]: one job per GPU or more
    "run_as": (str, None),
    "kind": (str, None),
    "partition": (str, None),
    "account": (str, None),
    "gres": (str, None),
    "max_jobs": (int, 50),
    "environments": (list, None),  # the names of ``environments`` it has; default all
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
            names = "number" if types is _NUMBER else " or ".join(
                t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ConfigError(f"{where}: {key!r} must be a {names}, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {key!r} must be finite")
        out[key] = value
    return out


def _ssh_target(c, base):
    return SshTarget(host=c["host"], port=c["port"], user=c["user"],
                     key_file=_path(c["key_file"], base), password_env=c["password_env"])


def _node(raw, defaults, base, where, c):
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
    envs = c["environments"]
    names = list(envs) if n["environments"] is None else n["environments"]
    missing = [e for e in names if e not in envs]
    if missing:
        raise ConfigError(f"{where}: environments: {missing[0]!r} is not one of the "
                          f"config's environments ({', '.join(envs) or 'none'})")
    if n["run_as"] is not None and kind != "local":
        raise ConfigError(f"{where}: 'run_as' is for local nodes; an SSH node's jobs run as "
                          "its SSH user")
    return Node(id=n["id"], host=n["host"],
                python=n["python"] or (sys.executable if local else "python3"),
                gpus=_gpus(n["gpus"], 0 if kind == "ssh" else n["id"], where),
                gpus_from="config" if n["gpus"] is not None else "default",
                env={str(k): str(v) for k, v in n["env"].items()},
                workdir=n["workdir"] or (None if local else "~/.gpuqueue"), setup=n["setup"],
                ssh=None if local else _ssh_target(n, base),
                kind=kind, slurm=slurm if kind == "slurm" else None, run_as=n["run_as"],
                job_python=n["python"] or (None if local else "python3"),
                environments=tuple(dict.fromkeys(names)))


def _gpus(value, default, where):
    """A node's GPUs: "0,1,2,3", a list, one index or UUID; by default ``default`` (an
    SSH node's 0, until its nvidia-smi is read; a local node's id)."""
    if value is None:
        value = [default]
    items = value if isinstance(value, list) else str(value).split(",")
    gpus = tuple(str(g).strip() for g in items)
    if not gpus or any(isinstance(g, (bool, dict, list)) for g in items) or any(
            not re.fullmatch(r"[A-Za-z0-9:_-]{1,64}", g) for g in gpus):
        raise ConfigError(f"{where}: 'gpus' must list GPU indexes or UUIDs, like \"0,1,2,3\"")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{where}: 'gpus' names a GPU twice")
    return gpus


def load_config(path=None):
    """Read the config file (or the built-in default: 8 local nodes, the spool and the
    tokens file beside gpuqueue.py, wherever a command is run from) and check it,
    key by key as Config declares them."""
    if path is None:
        raw, base = {}, Path(__file__).resolve().parent
    else:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        base = path.resolve().parent
    c = _checked(raw, _CONFIG_KEYS, "config")
    values = {}
    for f in dataclasses.fields(Config):
        if "setting" not in f.metadata:
            continue
        _, _, parse, above, least = f.metadata["setting"]
        value = c[f.name]
        if above is not None and value <= above:
            raise ConfigError(f"config: {f.name!r} must be above {above:g}")
        if least is not None and value < least:
            raise ConfigError(f"config: {f.name!r} is too small: it must be at least {least:g}")
        values[f.name] = value if parse is None else parse(value, c, base)
    return Config(**values, source=None if path is None else path.resolve())


###############################################################################
# Filesystem primitives #######################################################
###############################################################################


def no_room(exc):
    """Does ``exc`` say that the disk has no room (ENOSPC, EDQUOT)?"""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc, why):
    """What to raise for ``exc``: DiskFull (``why``, then the system's words: a 507
    for a client, a wait for the scheduler) when it says the disk has no room, else
    ``exc`` itself."""
    return DiskFull(f"{why}: {exc.strerror}") if no_room(exc) else exc


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
    write_files(path.parent, {path.name: data}, mode, sync_dir)


def write_files(folder, files, mode=0o644, sync_dir=True):
    """Publish several files in ``folder`` (name -> data), each atomically as
    write_file does, renamed in the order given: all are written before any is
    fsynced, so that one journal commit can carry them all, and the folder is
    fsynced once."""
    folder, staged = Path(folder), []
    try:
        for name, data in files.items():
            tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
            staged.append((os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp, name))
            write_all(staged[-1][0], data if isinstance(data, bytes) else data.encode())
        for fd, _, _ in staged:
            os.fsync(fd)
        for fd, tmp, name in staged:
            os.rename(tmp, folder / name)
    except BaseException:
        for _, tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd, _, _ in staged:
            os.close(fd)
    if sync_dir:
        fsync_dir(folder)


def only_owner(path, what):
    """ConfigError unless this process's user owns ``path`` (the spool, the token
    file), naming the one to run as: an admin's sudo beside a server of its own
    user would take that server's lock for a job's planted one, act on the spool
    behind its back, and leave files it cannot read."""
    owner = os.stat(path).st_uid
    if owner != os.geteuid():
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise ConfigError(f"{what} {path} belongs to user {name}: run gpuqueue's commands "
                          f"as that user (sudo -u {name} ...)")


def private_lock(path):
    """A file lock at ``path`` that no other user can take: its file is this user's
    own, mode 0600, so a job (running as another user) cannot even open it, and an
    open file is all flock needs.  One of this user's own that others may open (left
    by an older release, which may still hold it) is made 0600; one that is not this
    user's, or no regular file (planted), is removed first: whoever holds it then
    holds nothing."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.unlink(path)
        elif st.st_mode & 0o077:
            os.chmod(path, 0o600)
    return filelock.FileLock(str(path), mode=0o600)


def json_record(obj):
    """A record as the spool keeps it: JSON, a key a line, sorted."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(path, obj):
    write_file(path, json_record(obj))


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def utcnow():
    return datetime.now(timezone.utc)


def isotime(ts):
    """ISO 8601 UTC for a Unix timestamp (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


###############################################################################
# Node program ################################################################
###############################################################################
# What runs on a node beside its jobs.  The server ships this section's own
# source to every node (node_program() makes it a script), so it uses the
# standard library alone and nothing else of this module.
#
# The agent runs once per node, in the node's workdir, over an SSH channel or,
# on this machine, a pipe.  It reads one JSON command a line and writes one
# JSON report a line (COMMANDS and REPORTS declare them; "?": may be absent):
#
#   (at start)                                -> ready {protocol, python}
#   start {id, dir, env, run_as, limit, grace, output_limit, deadline, inline, launch}
#                                             -> started {id, wrapper, launched}
#                                             -> exited {id, result?, stdout?, stderr?, files?}
#                                                once the wrapper ended; small output comes
#                                                along, and whether it left files in its
#                                                outputs folder
#   prepare {id, dir, env, run_as, limit, grace, output_limit, deadline, inline, launch, after}
#                                             -> prepared {id, wrapper}: ready to start
#                                             -> started {id, wrapper, launched} once job
#                                                ``after`` has ended (then exited, as a
#                                                start's)
#                                             -> dropped {id} if its lease (``deadline``)
#                                                is over by then
#   renew {deadline}                          every prepared start's lease, lengthened
#   drop {id}                                 -> dropped {id}: a prepared start never starts
#   watch {id, dir, wrapper}                  -> exited {id}: follow a wrapper launched before
#   cancel {wrapper}                          SIGTERM: the wrapper kills its job's group
#   make {id, dir, files, deadline}           -> made {id, errno?, error?}: a job's fresh
#                                                folder holding ``files`` (name -> base64),
#                                                or why not (none past ``deadline``, its
#                                                lease); ``id`` the request's own
#   remove {dir}                              a finished job's folder: renamed out of the
#                                                way at once, a large one removed beside
#                                                the loop
#   read {id, path, offset, limit}            -> data {id, kind, size, data?}: up to limit
#                                                bytes of a job's file (read_piece), its
#                                                ``id`` the request's own
#   gpus {}                                   -> gpus {reading}: gpu_reading(), or null
#   ping {}                                   -> pong {}, at once: proof the node is alive
#   check {environments, run_as, env}         -> checked {environments}: each one's python
#                                                started (with its setup, as the jobs'
#                                                run_as user, with their base env), or why not
#
# The server reads a job's output and results on the node through the agent
# (open_regular), so that a FIFO, a link or a device planted by a job is named, never
# waited on or followed.  Its listings and copies of a job's files (LocalLink, SshLink)
# walk without following a link and take regular files alone, each read bounded by
# node_timeout.
#
# A job's wrapper is forked from the agent into a session of its own, in the
# job's folder (NodeFiles).  It refuses a start past its ``deadline`` (the
# start's lease), claims ``launched`` (O_EXCL) before it starts the code, so a
# job never starts twice, runs it as ``run_as`` when given, caps each stream at
# ``output_limit`` as it is written, kills the job's whole process group on
# SIGTERM or at the time limit (``limit``, then ``grace``), and leaves
# result.json.  ``launch`` says what to run: {python, setup, entry, archive}; with a
# project (an archive) the wrapper first unpacks it, as the job's user, and the
# job runs inside it.  Either way the job's files go in outputs/ of the folder it
# runs in ($GPUQUEUE_OUTPUT_DIR), which the server brings back once it has ended.
# Wrappers outlive the agent and the server, so a restarted
# server finds them and follows them to their end.

#: The node protocol: sent in ``ready`` and written into each wrapper's ``pids``,
#: so that a server can tell which release started a wrapper it finds running.
PROTOCOL = 4
#: Protocols whose wrappers this release follows to their end.  Protocols 1 to 3
#: left the same files (1's ``pids`` named no protocol; 2 ran code.py alone; 3's
#: agent let the server read the job's files itself).
PROTOCOLS_FOLLOWED = (1, 2, 3, 4)

#: What the server sends the agent: each command's fields.
COMMANDS = {
    "start": ("id", "dir", "env", "run_as", "limit", "grace", "output_limit", "deadline",
              "inline", "launch"),
    "prepare": ("id", "dir", "env", "run_as", "limit", "grace", "output_limit", "deadline",
                "inline", "launch", "after"),
    "renew": ("deadline",),
    "drop": ("id",),
    "watch": ("id", "dir", "wrapper"),
    "cancel": ("wrapper",),
    "make": ("id", "dir", "files", "deadline"),
    "remove": ("dir",),
    "read": ("id", "path", "offset", "limit"),
    "gpus": (),
    "ping": (),
    "check": ("environments", "run_as", "env"),
}
#: What the agent reports: each report's fields ("?": may be absent).
REPORTS = {
    "ready": ("protocol", "python"),
    "started": ("id", "wrapper", "launched"),
    "prepared": ("id", "wrapper"),
    "dropped": ("id",),
    "exited": ("id", "result?", "stdout?", "stderr?", "files?"),
    "made": ("id", "errno?", "error?"),
    "data": ("id", "kind", "size", "data?"),
    "gpus": ("reading",),
    "pong": (),
    "checked": ("environments",),
}


def message(table, op, **fields):
    """One message of the protocol, as the line that carries it; ValueError for
    fields that ``table`` (COMMANDS or REPORTS) does not declare for ``op``.
    Both ends build every message here, so neither can drift from the tables."""
    declared = table[op]
    if not ({f for f in declared if f[-1] != "?"} <= fields.keys()
            <= {f.rstrip("?") for f in declared}):
        raise ValueError(f"{op} carries {', '.join(declared) or 'nothing'}, not "
                         f"{', '.join(sorted(fields)) or 'nothing'}")
    return (json.dumps(dict(fields, op=op)) + "\n").encode()


class NodeFiles:
    """The names in a job's folder on its node, ``<workdir>/<id>``, for both ends:
    the server writes the code (and Slurm's script), the wrapper the rest."""
    CODE = "code.py"          # the job's code, as the server sent it: a script, or
    PROJECT_ARCHIVE = "project.archive"  # a project's archive (tar or zip), which is
    PROJECT = "project"       # unpacked here; the job then runs in this folder
    OUTPUTS = "outputs"       # in the folder the job runs in: its files, brought back
    LAUNCHED = "launched"     # claimed (O_EXCL) by the one wrapper that starts the job,
    #                           or by a recovering server, so that none ever will: as a
    VOID = "void"             # link to this, which says the job never started there
    PIDS = "pids"             # {wrapper, job, protocol}: written once the job runs,
    #                           a started project's first (job null) before its unpack
    STREAMS = ("stdout", "stderr")  # the job's output, capped as it is written
    RESULT = "result.json"    # {exit_code, reason}: written last
    WRAPPER_LOG = "wrapper.log"  # what the wrapper itself wrote to stderr
    SLURM_SCRIPT = "job.sh"   # on a Slurm node, what sbatch runs instead of a wrapper
    #: In the workdir itself: what local agents wrote to stderr.
    AGENT_LOG = "agent.log"

    @classmethod
    def outputs(cls, job_dir, project):
        """Where a job's files are, below the workdir."""
        return f"{job_dir}/{cls.PROJECT}/{cls.OUTPUTS}" if project else \
            f"{job_dir}/{cls.OUTPUTS}"


#: A job id: 24 hex digits, the submit time in microseconds (14), then random
#: bits, so that sorting ids sorts by submit time.  A job's folder on its node
#: is named by it, and the agent touches no other folder.
JOB_ID_PATTERN = "[0-9a-f]{24}"
JOB_ID_RE = re.compile(rf"\A{JOB_ID_PATTERN}\Z")

class ProjectRefused(Exception):
    """An archive gpuqueue will not unpack as a project: which entry, and why."""


#: The longest path of a file inside a project.
MAX_PROJECT_PATH = 1024


def archive_kind(head):
    """"tar" or "zip" when ``head`` (a file's first 512 bytes) opens an archive of
    that kind (tar compressed with gzip, bzip2 or xz too), else None (a script).
    By content: a client's file name says nothing."""
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _project_path(name, seen, files):
    """A member's path made plain ("a/b"), or ProjectRefused naming it."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ProjectRefused("%r: an absolute path" % shown)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ProjectRefused("%r: a path with '..' in it" % shown)
    if "\\" in name or "\0" in name:
        raise ProjectRefused("%r: a backslash or NUL in its path" % shown)
    if len(name.encode()) > MAX_PROJECT_PATH or any(len(p.encode()) > 255 for p in parts):
        raise ProjectRefused("%r: a path longer than %d bytes (or a name longer than 255)"
                             % (shown, MAX_PROJECT_PATH))
    path = "/".join(parts)
    if path in seen:
        raise ProjectRefused("%r: given twice" % shown)
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in files:
            raise ProjectRefused("%r: inside %r, which is a file" % (shown, "/".join(parts[:i])))
    seen.add(path)
    return path


class BoundedStream:
    """A tar's stream (decompressed) read through bounds, so that a small archive
    cannot make its reader hold or churn through much: no single read over
    ``most_read`` (tarfile reads a pax header or a long name whole, at the size it
    states) and no more than ``most_total`` bytes in all, what is skipped counted."""

    def __init__(self, f, most_read, most_total):
        self.f, self.most_read, self.left = f, most_read, most_total

    def read(self, n=-1):
        if n is None or n < 0 or n > self.most_read:
            raise ProjectRefused("an entry's header (a long name, a pax header) of more "
                                 "than %d bytes" % self.most_read)
        data = self.f.read(n)
        self._spend(len(data))
        return data

    def seek(self, pos, whence=0):
        if whence == 0 and pos > self.f.tell():
            self._spend(pos - self.f.tell())
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def _spend(self, n):
        self.left -= n
        if self.left < 0:
            raise ProjectRefused("the archive holds more than its files' bytes allow "
                                 "(max_project_bytes) in headers and data")


def tar_reader(fileobj, max_bytes, max_entries):
    """A tar archive's decompressed stream (gzip, bzip2, xz or none, by its first
    bytes), bounded (BoundedStream): its files' bytes, and room for its entries'
    headers."""
    head = fileobj.read(6)
    fileobj.seek(0)
    if head[:2] == b"\x1f\x8b":
        import gzip
        fileobj = gzip.GzipFile(fileobj=fileobj, mode="rb")
    elif head[:3] == b"BZh":
        import bz2
        fileobj = bz2.BZ2File(fileobj)
    elif head == b"\xfd7zXZ\x00":
        import lzma
        fileobj = lzma.LZMAFile(fileobj)
    return BoundedStream(fileobj, 1 << 21, max_bytes + max_entries * 4096 + (1 << 22))


def unpack_project(fileobj, kind, dest, max_bytes, max_files):
    """Read a project archive (``kind`` from archive_kind) member by member, and with
    ``dest`` write it there: the set of its files' paths.  ProjectRefused for
    absolute paths, '..', links, special files, duplicates, a file where a folder
    is, more than ``max_files`` files and folders, more than ``max_bytes``
    unpacked, long paths.  Memory and work stay bounded: each member is streamed,
    nothing is read past a limit, and every entry counts, even one that adds
    nothing (a folder named again, "./"), against twice ``max_files``."""
    import tarfile
    import zipfile
    seen, files, folders, total, entries = set(), set(), set(), [0], [0]
    most_entries = 2 * max_files + 10

    def member(name, kind_of, opener, mode):
        entries[0] += 1
        if len(seen) >= max_files or entries[0] > most_entries:
            raise ProjectRefused("%r: the project has more than %d files (max_project_files)"
                                 % (name[:200], max_files))
        if kind_of == "link":
            raise ProjectRefused("%r: a link; a project holds files and folders alone"
                                 % name[:200])
        if kind_of == "special":
            raise ProjectRefused("%r: a special file (a device, a fifo); a project holds "
                                 "files and folders alone" % name[:200])
        if kind_of == "dir" and name.rstrip("/") and \
                "/".join(p for p in name.split("/") if p not in ("", ".")) in seen:
            return  # a folder named twice is one folder
        path = _project_path(name, seen, files)
        if not path:
            if kind_of == "file":
                raise ProjectRefused("%r: a file with no name" % name[:200])
            return
        if kind_of == "file" and path in folders:
            raise ProjectRefused("%r: a file where the project has a folder of that name"
                                 % name[:200])
        parts = path.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + (kind_of == "dir")))
        target = os.path.join(dest, path) if dest is not None else None
        if kind_of == "dir":
            if target is not None:
                os.makedirs(target, 0o755, exist_ok=True)
            return
        files.add(path)
        out = None
        if target is not None:
            os.makedirs(os.path.dirname(target) or ".", 0o755, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o755 if mode & 0o111 else 0o644)
            out = os.fdopen(fd, "wb")
        try:
            with opener() as src:
                room = max_bytes - total[0]
                done = 0
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > room:
                        raise ProjectRefused("%r: the project unpacks to more than "
                                             "max_project_bytes (%d bytes)"
                                             % (name[:200], max_bytes))
                    if out is not None:
                        out.write(chunk)
                total[0] += done
        finally:
            if out is not None:
                out.close()

    if kind == "zip":
        with zipfile.ZipFile(fileobj) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                fmt = stat.S_IFMT(mode)
                if info.flag_bits & 0x1:
                    raise ProjectRefused("%r: encrypted" % info.filename[:200])
                kind_of = ("dir" if info.is_dir() or fmt == stat.S_IFDIR else
                           "link" if fmt == stat.S_IFLNK else
                           "file" if fmt in (0, stat.S_IFREG) else "special")
                member(info.filename, kind_of, lambda info=info: zf.open(info), mode)
    else:
        stream = tar_reader(fileobj, max_bytes, most_entries)
        with tarfile.open(fileobj=stream, mode="r:") as tf:
            while True:
                info = tf.next()
                if info is None:
                    break
                tf.members = []  # keep no list of a million members
                kind_of = ("dir" if info.isdir() else "file" if info.isreg() else
                           "link" if info.issym() or info.islnk() else "special")
                if kind_of == "file" and info.size > max_bytes - total[0]:
                    raise ProjectRefused("%r: the project unpacks to more than "
                                         "max_project_bytes (%d bytes)"
                                         % (info.name[:200], max_bytes))
                member(info.name, kind_of, lambda info=info: tf.extractfile(info), info.mode)
    return files


#: What every node's GPUs are read with.
GPU_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu",
             "--format=csv,noheader,nounits"]


#: ...and the processes using them.
GPU_APPS_QUERY = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory",
                  "--format=csv,noheader,nounits"]


#: The most bytes of an nvidia-smi answer read, and the seconds it may take.
GPU_ANSWER_BYTES, GPU_ANSWER_SECONDS = 256 * 1024, 10


class NoReading(Exception):
    """nvidia-smi is there but gave no usable answer: why."""


def nvidia_smi(query):
    """nvidia-smi's answer as text, or None where there is no nvidia-smi.  NoReading
    when what it gave is no answer: it failed, hung, wrote too much, or wrote what
    is not text.  Read with a deadline and a bound, so that a broken driver can
    neither stall the reading nor fill the agent's memory."""
    try:
        proc = subprocess.Popen(query, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NoReading("cannot run nvidia-smi: %s" % (exc.strerror or exc)) from None
    out, end = b"", time.monotonic() + GPU_ANSWER_SECONDS
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise NoReading("nvidia-smi did not answer within %d s" % GPU_ANSWER_SECONDS)
                if not sel.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
                if len(out) > GPU_ANSWER_BYTES:
                    raise NoReading("nvidia-smi wrote more than %d bytes" % GPU_ANSWER_BYTES)
        try:
            code = proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise NoReading("nvidia-smi did not end within %d s" % GPU_ANSWER_SECONDS) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if code != 0:
        raise NoReading("nvidia-smi exited with %d" % code)
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise NoReading("nvidia-smi's answer is not text") from None
    if "\0" in text:
        raise NoReading("nvidia-smi's answer is not text")
    return text


def gpu_reading():
    """This machine's GPUs as nvidia-smi reads them (CSV), and the processes using
    them, each with its user and, when it belongs to a job of this node (its process
    group or session is a running job's), the job's id; None without nvidia-smi;
    {"error": why} when nvidia-smi gave no usable answer."""
    try:
        csv = nvidia_smi(GPU_QUERY)
        app_lines = (nvidia_smi(GPU_APPS_QUERY) or "").splitlines() if csv is not None else ()
    except NoReading as exc:
        return {"error": str(exc)}
    if csv is None:
        return None
    jobs = {}  # process group of each job still running here -> its id
    for name in os.listdir("."):
        if JOB_ID_RE.match(name):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with open_regular(os.path.join(name, NodeFiles.PIDS)) as f:
                    pids = json.loads(f.read(4096))
                if is_wrapper_of(int(pids["wrapper"]), name):
                    jobs[int(pids["job"])] = name
    apps = []
    for line in app_lines:
        f = [x.strip() for x in line.split(",")]
        if len(f) != 3 or not f[1].isdigit():
            continue
        pid = int(f[1])
        user = job = None
        with contextlib.suppress(OSError, KeyError):
            user = pwd.getpwuid(os.stat("/proc/%d" % pid).st_uid).pw_name
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open("/proc/%d/stat" % pid) as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
            job = jobs.get(int(fields[2])) or jobs.get(int(fields[3]))  # group, session
        apps.append({"gpu": f[0], "pid": pid, "memory_mib": int(f[2]) if f[2].isdigit() else None,
                     "user": user, "job": job})
    return {"csv": csv, "apps": apps}


def exit_code_of(wait_status):
    """A wait status as gpuqueue reports it: the exit status, or minus the signal
    that killed the process.  Slurm reports the same wait status."""
    signo = wait_status & 0x7F
    return -signo if signo else (wait_status >> 8) & 0xFF


def cut_note(cut, total, limit):
    """What stands where output was cut out."""
    return ("\n[gpuqueue: output truncated, %d of %d bytes cut here; the limit is %d bytes "
            "per stream]\n" % (cut, total, limit)).encode()


#: Bytes a stream may exceed its limit by: the note that says where it was cut.
CUT_NOTE_ROOM = 200


class NotRegular(OSError):
    """A file a job could have replaced that is not a regular file (a FIFO, a link,
    a device, a folder): never read, never waited on."""


def file_kind(mode):
    """What a file is, in words, for a note."""
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a regular file")


def open_regular(path):
    """Open a file a job may have had its hands on (its own folder, or one it runs
    as the same user as the agent) for reading, if it is a regular file: a link is
    not followed, a FIFO not waited for (O_NONBLOCK), and what it is is looked at
    on the open file (fstat) before anything is read.  NotRegular says what stood
    there instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(errno.ELOOP, "a symbolic link", path) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, file_kind(mode), path)
    return os.fdopen(fd, "rb")


def not_regular_note(name, what):
    """What stands for a stream the job replaced with something that is no file."""
    return ("[gpuqueue: %s is not a regular file but %s (the job replaced it); nothing was "
            "read from it]\n" % (name, what)).encode()


def read_capped(path, limit):
    """An output file's bytes, keeping its head and tail when over ``limit`` bytes
    (the tail holds the traceback of a failed job); b"" when it is missing, and a
    note saying what it was when it is no regular file.  Reads at most ``limit``
    bytes, whatever the file's size, and the size is the one it had when opened."""
    try:
        f = open_regular(path)
    except NotRegular as exc:
        return not_regular_note(os.path.basename(path), exc.strerror)
    except OSError:
        return b""
    with f:
        size = os.fstat(f.fileno()).st_size
        if size <= limit:
            return f.read(size)
        half = limit // 2
        head = f.read(half)
        f.seek(size - half)
        return head + cut_note(size - 2 * half, size, limit) + f.read(half)


def read_small_json(path):
    """A small JSON record a job could have replaced (``pids``, ``result.json``)."""
    with open_regular(path) as f:
        return json.loads(f.read(65536))


#: The most bytes one ``read`` command answers with.
READ_PIECE = 1024 * 1024


def read_piece(path, offset, limit):
    """A ``read`` command's answer: up to ``limit`` bytes of a job's file from
    ``offset``, with what the file is and its size; for the server, which never
    opens such a file itself."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(min(offset, size))
            data = f.read(max(0, min(limit, READ_PIECE, size - offset)))
        return {"kind": "file", "size": size, "data": base64.b64encode(data).decode()}
    except NotRegular as exc:
        return {"kind": exc.strerror, "size": 0}
    except FileNotFoundError:
        return {"kind": "missing", "size": 0}
    except OSError as exc:
        return {"kind": "unreadable: %s" % (exc.strerror or exc), "size": 0}


def open_nofollow(path, mode="rb"):
    """Open a file of this machine's own (a local project being sent) for reading,
    refusing a symbolic link planted in its place."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), mode)


def publish(name, obj, durable=True):
    """Write JSON to ``name`` in the current folder: a fresh temporary name (O_EXCL, so
    nothing planted there is followed), fsync (unless not ``durable``), rename.  A
    folder the job planted at ``name`` (a rename cannot replace it) is moved aside
    first."""
    tmp = ".%s.%d.tmp" % (name, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    try:
        os.rename(tmp, name)
    except IsADirectoryError:
        os.rename(name, "%s.planted.%d" % (name, os.getpid()))
        os.rename(tmp, name)


def make_folder(path, files):
    """A job's fresh folder ``path`` (the agent took one an attempt that never
    launched left out of the way) holding ``files`` (name -> base64), as an SSH
    node's SFTP would make it (the umask applies); {} or, when it cannot be made,
    {errno, error}."""
    try:
        os.mkdir(path, 0o777)
        for name, data in files.items():
            if not name or "/" in name or name.startswith("."):
                raise OSError(errno.EINVAL, "not a file's name: %r" % name)
            fd = os.open(os.path.join(path, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            try:
                view = memoryview(base64.b64decode(data))
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror or str(exc)}
    return {}


def larger_than(path, most):
    """Does the folder tree at ``path`` hold more than ``most`` entries?  Read no
    further than that: one folder of a million names is not read whole."""
    todo, seen = [path], 0
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    seen += 1
                    if seen > most:
                        return True
                    if e.is_dir(follow_symlinks=False):
                        todo.append(e.path)
        except OSError:
            pass  # (what cannot be read cannot be removed at length either)
    return False


def proc_state(pid):
    """(state letter, process group) of a process, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid):
    """Live (not zombie) processes in the process group, from /proc."""
    live = []
    for pid in os.listdir("/proc"):
        st = proc_state(pid) if pid.isdigit() else None
        if st and st[0] != "Z" and st[1] == pgid:
            live.append(pid)
    return live


def is_wrapper_of(pid, folder):
    """Is ``pid`` the wrapper working in ``folder``, not a process that reused its pid?"""
    try:
        return os.readlink("/proc/%d/cwd" % pid) == os.path.realpath(folder)
    except OSError:
        return False


def kill_group(pgid, grace):
    """SIGTERM a job's whole process group, then SIGKILL what is left after ``grace``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return  # nothing left in the group: no need to read /proc
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not group_members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < end:
            time.sleep(0.02)  # no event tells that a whole group has gone


class CappedOutput:
    """One output stream of a job, kept to ``limit`` bytes on disk as it is written:
    everything up to ``limit``; past it, the file keeps its first half while the
    latest half is held here, and close() leaves head, a note and tail.  The cap
    counts bytes as stored, whatever their encoding."""

    def __init__(self, name, limit):
        self.file = open(name, "w+b")
        self.limit, self.half = limit, limit // 2
        self.total = 0
        self.tail = collections.deque()  # the latest chunks past the limit
        self.tail_bytes = 0

    def write(self, data):
        self.total += len(data)
        room = self.limit - self.file.tell()
        if room > 0:
            self.file.write(data[:room])
            self.file.flush()
            data = data[room:]
        if data:
            self.tail.append(data)
            self.tail_bytes += len(data)
            while self.tail_bytes - len(self.tail[0]) >= self.half:
                self.tail_bytes -= len(self.tail.popleft())

    def close(self):
        if self.total > self.limit:
            tail = b"".join(self.tail)
            if len(tail) < self.half:  # the file's second half is tail too
                self.file.seek(self.half)
                tail = self.file.read() + tail
            tail = tail[-self.half:]
            self.file.seek(self.half)
            self.file.truncate()
            self.file.write(cut_note(self.total - self.half - len(tail), self.total, self.limit)
                            + tail)
        self.file.close()


def claim_launch(report):
    """Claim ``launched`` (O_EXCL), so that the job never starts twice; True if this
    wrapper did, and ``report`` says which."""
    try:
        os.close(os.open(NodeFiles.LAUNCHED, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        report(False)
        return False
    report(True)
    return True


def wrap(cmd, report, ended, go=None):
    """Run the job in the current folder to its end, leaving result.json; the exit
    status of the wrapper process itself.  ``report(True)`` once the launch is
    claimed, ``report(False)`` when it may not be: claimed before (by an earlier
    wrapper, or voided by a recovering server), or after the start's lease
    ended (the server may have given the job to another node by then; the
    server's and nodes' clocks are assumed to agree within LEASE_MARGIN).

    A prepared start (``go``, a pipe from the agent) makes everything ready first
    (the project unpacked, the output files open) and then waits: the job starts
    when the agent writes to ``go`` (the GPU it follows on has freed, within its
    lease), and never when the pipe closes first (the start was dropped, or the
    agent went away).  ``ended`` is told, one byte, as soon as the job's own
    process has exited, before the wrapper's own wrap-up, so that a job prepared
    to follow it starts at once."""
    if go is None:
        if time.time() > cmd.get("deadline", math.inf):
            report(False)
            return 75
        if not claim_launch(report):
            return 75
    limit, grace = float(cmd["limit"]), float(cmd["grace"])
    cap = int(cmd.get("output_limit", 10 * 1024 * 1024))
    # ``run_as``: the job runs as that user, with that group alone; the wrapper stays
    # root, so the job cannot touch it, its files, or the agent.
    who = {} if cmd.get("run_as") is None else dict(zip(("user", "group"), cmd["run_as"]),
                                                     extra_groups=[])
    run = cmd["launch"]
    here, why_not = os.getcwd(), None
    if run.get("archive"):  # unpacked as the job's user, in a process of its own
        if go is None:  # claimed already, and an unpack may take a while: a restarted
            # server finds this wrapper by its pids meanwhile, not a job lost.
            publish(NodeFiles.PIDS, {"wrapper": os.getpid(), "job": None,
                                     "protocol": PROTOCOL}, durable=False)
        p = run["archive"]
        r = subprocess.run([run["python"], cmd["program"], "unpack", p["kind"],
                            NodeFiles.PROJECT_ARCHIVE, NodeFiles.PROJECT, str(p["max_bytes"]),
                            str(p["max_files"])], stdin=subprocess.DEVNULL,
                           capture_output=True, **who)
        if r.returncode:
            why_not = "its project could not be unpacked: " + \
                r.stderr.decode("utf-8", "replace").strip()[-1000:]
        here = os.path.join(here, NodeFiles.PROJECT)
    outputs = os.path.join(here, NodeFiles.OUTPUTS)
    if why_not is None:
        try:
            os.mkdir(outputs, 0o755)
            if who:
                os.chown(outputs, *cmd["run_as"], follow_symlinks=False)
        except FileExistsError:
            pass  # the project brought one
        except OSError as exc:
            why_not = "cannot make its outputs folder: %s" % exc
    argv = after_setup(run.get("setup"), [run["python"], run["entry"]])
    stop = []  # a SIGTERM arrived: a cancel
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGCHLD, lambda *a: None)
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, signal.SIGTERM})
    pipes = {}
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ)
    for name in NodeFiles.STREAMS:
        r, w = os.pipe()
        pipes[name] = (r, w, CappedOutput(name, cap))
        sel.register(r, selectors.EVENT_READ, pipes[name][2])
    job = None
    if go is not None and (os.read(go, 1) != b"g" or not claim_launch(report)):
        return 75  # dropped, or claimed by a recovering server: it never starts
    if why_not is None:
        try:
            job = subprocess.Popen(
                argv, cwd=here, stdin=subprocess.DEVNULL, stdout=pipes["stdout"][1],
                stderr=pipes["stderr"][1], start_new_session=True,
                env=dict(os.environ, **cmd["env"], GPUQUEUE_OUTPUT_DIR=outputs), **who)
        except OSError as exc:
            why_not = "cannot start %s: %s" % (run["python"], exc.strerror or exc)
    for r, w, _ in pipes.values():
        os.close(w)
    if job is None:
        for name, (r, _, out) in pipes.items():
            os.close(r)
            if name == "stderr":
                out.write(("gpuqueue: the job did not start: %s\n" % why_not).encode())
            out.close()
        publish(NodeFiles.RESULT, {"exit_code": None, "reason": "not started",
                                   "detail": why_not})
        return 0
    # Only while the wrapper lives is its pids of use, and a power cut ends it: so no
    # fsync (one read as missing or torn after a crash is as a dead wrapper's).
    publish(NodeFiles.PIDS, {"wrapper": os.getpid(), "job": job.pid, "protocol": PROTOCOL},
            durable=False)
    deadline = time.monotonic() + limit
    reason = status = drain_until = None
    while True:
        now = time.monotonic()
        if status is None:
            done, status = os.waitpid(job.pid, os.WNOHANG)
            if not done:
                status = None
                if stop or now >= deadline:
                    reason = "cancelled" if stop else "timeout"
                    kill_group(job.pid, grace)
                    continue
            else:
                with contextlib.suppress(OSError):  # a job prepared to follow starts now
                    os.write(ended, b"e")
                kill_group(job.pid, grace)  # whatever the job left behind in its group
                drain_until = time.monotonic() + 2  # a daemon that left its group may hold a pipe
        open_pipes = len(sel.get_map()) - 1
        if status is not None and (not open_pipes or time.monotonic() > drain_until):
            break
        wait = 1.0 if status is not None else max(0.0, min(deadline - now, 5.0))
        for key, _ in sel.select(wait):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                continue
            data = os.read(key.fd, 65536)
            if data:
                key.data.write(data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
    for _, _, out in pipes.values():
        out.close()
    publish(NodeFiles.RESULT, {"exit_code": exit_code_of(status), "reason": reason})
    return 0


def after_setup(setup, argv):
    """``argv`` run after an environment's ``setup`` shell line, in its shell: a
    command of it that fails stops there, with its status and message (set -e), so
    that no job runs in an environment half set up (a module that would not load)."""
    return ["/bin/sh", "-c", 'set -e\n%s\nexec "$0" "$@"' % setup] + argv if setup else argv


def fork_wrapper(cmd, prepared=False):
    """Fork a wrapper for a job folder, in a session of its own: a Wrapper.  A
    started one has tried to claim the launch (``claimed``); a ``prepared`` one waits
    for its ``go`` (see wrap)."""
    claim_r, claim_w = os.pipe()
    ended_r, ended_w = os.pipe()
    go_r, go_w = os.pipe() if prepared else (None, None)
    pid = os.fork()
    if pid:
        for fd in (claim_w, ended_w, go_r):
            if fd is not None:
                os.close(fd)
        w = Wrapper(pid, cmd, ended_r, go_w, claim_r)
        if not prepared:
            w.take_claim()
        return w
    code = 70
    try:
        # Nothing of the agent's but its own three pipes: a copy of another prepared
        # wrapper's go pipe held here would keep that one from ever seeing it close.
        keep = sorted(fd for fd in (claim_w, ended_w, go_r) if fd is not None)
        for low, high in zip([2] + keep, keep + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        os.setsid()
        cmd["program"] = os.path.abspath(sys.argv[0])  # the unpacker, for a project
        os.chdir(cmd["dir"])
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(os.open(NodeFiles.WRAPPER_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)

        def report(claimed):
            os.write(claim_w, b"1" if claimed else b"0")
            os.close(claim_w)
        code = wrap(cmd, report, ended_w, go_r)
    except BaseException as exc:
        os.write(2, ("gq_node: %r\n" % (exc,)).encode())
    finally:
        os._exit(code)


def exit_report(cmd):
    """A finished wrapper's result and output, for its exit report, when the output
    is small enough to travel on the agent's channel; else nothing (the server
    then asks for the files with ``read``).  A stream the job replaced with what is
    no regular file travels as a note saying so."""
    room = cmd.get("inline", 0)
    outputs = NodeFiles.outputs(cmd["dir"], bool(cmd["launch"].get("archive")))
    try:
        if stat.S_ISDIR(os.lstat(outputs).st_mode):
            with os.scandir(outputs) as entries:
                found = {"files": next(entries, None) is not None}
        else:
            found = {"files": True}  # what the job put there instead: the server says so
    except FileNotFoundError:
        found = {"files": False}  # it never ran
    except OSError:
        found = {}
    try:
        with open_regular(os.path.join(cmd["dir"], NodeFiles.RESULT)) as f:
            found["result"] = json.loads(f.read(65536))
        for name in NodeFiles.STREAMS:
            try:
                with open_regular(os.path.join(cmd["dir"], name)) as f:
                    size = os.fstat(f.fileno()).st_size
                    data = f.read(size) if size <= room else None
            except NotRegular as exc:
                data = not_regular_note(name, exc.strerror)
            except FileNotFoundError:
                data = b""
            if data is None or len(data) > room:
                return {}
            room -= len(data)
            found[name] = base64.b64encode(data).decode()
        return found
    except (OSError, ValueError):
        return {}


#: One report at a time on the channel: a GPU reading is taken beside the loop.
SAYING = threading.Lock()
#: The start of the name in the workdir of a folder the agent is removing (discard):
#: no job's id, so nothing else there is ever taken for it.
GONE = ".gone."
#: Entries of a folder that the agent removes in its loop; one with more goes beside it.
SMALL_TREE = 1000


def check_environments(environments, run_as=None, variables=None):
    """Whether each environment's python starts, with its setup line, as the jobs
    will run it (as ``run_as``, [uid, gid], when the node has one, with the node's
    ``variables``: its env, that user's HOME): name -> None, or the reason it does
    not (what it wrote, that it hung, or what kept it from being tried)."""
    found = {}
    who = {} if run_as is None else dict(user=run_as[0], group=run_as[1], extra_groups=[],
                                         cwd="/")
    for name, env in environments.items():
        argv = after_setup(env.get("setup"),
                           [env["python"], "-c", "import sys; print(sys.version.split()[0])"])
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                               env=dict(os.environ, **(variables or {})), **who)
            found[name] = None if r.returncode == 0 else "%s exited with %d: %s" % (
                ("its setup line or " if env.get("setup") else "") + env["python"], r.returncode,
                r.stderr.decode("utf-8", "replace").strip()[-300:] or "no message")
        except subprocess.TimeoutExpired:
            found[name] = "%s did not start within 60 s" % env["python"]
        except OSError as exc:
            found[name] = "cannot run %s: %s" % (env["python"], exc.strerror or exc)
        except Exception as exc:  # (an answer all the same: the server waits for one)
            found[name] = "cannot check %s: %r" % (env["python"], exc)
    return found


def node_main(argv):
    """The node program's entry: the agent, or (``unpack KIND ARCHIVE DEST MAX_BYTES
    MAX_FILES``) a project's unpacking, which wrappers and Slurm's job.sh run as
    the job's user."""
    if argv[:1] != ["unpack"]:
        return Agent().run()
    kind, archive, dest, max_bytes, max_files = argv[1:]
    try:
        with open(archive, "rb") as f:
            unpack_project(f, kind, dest, int(max_bytes), int(max_files))
    except ProjectRefused as exc:
        sys.stderr.write("%s\n" % exc)
        return 2
    except Exception as exc:  # tarfile, zipfile, zlib: each its own error
        sys.stderr.write("not a readable %s archive: %s\n" % (kind, exc))
        return 2
    return 0


def say(op, **fields):
    """Write one report (REPORTS) to the server."""
    data = message(REPORTS, op, **fields)
    with SAYING:
        while data:
            data = data[os.write(1, data):]


def job_path(path):
    """``path`` if it names something inside a job's folder (its first part a job id,
    no '..'), else None: the agent reads nothing else for the server."""
    parts = path.split("/")
    return path if JOB_ID_RE.match(parts[0]) and not {"", ".", ".."} & set(parts) else None


class Wrapper:
    """A wrapper the agent forked (fork_wrapper): its pid, its start command, the read
    end of its ``ended`` pipe and of the pipe it answers its claim on (until it has),
    and, while it is a prepared start, the write end of its ``go`` pipe."""

    def __init__(self, pid, cmd, ended, go=None, claim=None):
        self.pid, self.cmd, self.ended, self.go, self.claim = pid, cmd, ended, go, claim
        self.claimed = None

    def take_claim(self):
        """Whether the wrapper claimed the launch (a started one says so at once; a
        prepared one once it has its go and all is ready: its project unpacked)."""
        self.claimed = os.read(self.claim, 1) == b"1"
        os.close(self.claim)
        self.claim = None
        return self.claimed

    def drop(self, kill=False):
        """A prepared start that must never start: its go pipe closes, so it ends.
        ``kill`` (only while it is not reaped) ends it at once, with the unpack it may
        be running, which would go on filling the folder removed next.  Without a go
        nothing of the job runs there."""
        for fd in (self.go, self.claim):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.go = self.claim = None
        if kill:
            for end in (os.killpg, os.kill):  # (no group of its own before its setsid)
                with contextlib.suppress(OSError):
                    end(self.pid, signal.SIGKILL)


class Agent:
    """A node's agent: see this section's head.  It launches each job's wrapper, and
    a prepared one (``prepare``) when the job it follows has ended, within the
    start's lease, without waiting for the server: a freed GPU costs no round trip."""

    def __init__(self):
        self.wrappers = {}  # pid -> Wrapper, started or prepared
        self.watched = {}   # pid -> job id: a wrapper launched before this agent
        self.prepared = {}  # job id -> the Wrapper prepared to start once it has ended
        self.running = set()  # ids of the jobs whose process may still run here
        self.sel = selectors.DefaultSelector()
        self.trash = []  # folders out of the way, for the remover thread (discard)
        self.trash_lock = threading.Lock()
        self.remover = None  # that thread, while it has work
        self.discarded = 0

    def discard(self, name):
        """Take a folder in the workdir out of the way at once (a rename), and remove
        it: here when it is small, as most are, else beside the loop, since a job
        may leave a million files and pings, starts and prepared jobs' go would wait
        on their removal.  What an agent that ended left half removed goes at the
        next one's start (run)."""
        self.discarded += 1
        gone = "%s%d.%d.%s" % (GONE, os.getpid(), self.discarded, name)
        try:
            os.rename(name, gone)
        except FileNotFoundError:
            return
        except OSError:  # (what stands at that name must go before it is made again)
            shutil.rmtree(name, ignore_errors=True)
            return
        if larger_than(gone, SMALL_TREE):
            self._remove(gone)
        else:
            shutil.rmtree(gone, ignore_errors=True)

    def _remove(self, gone):
        with self.trash_lock:
            self.trash.append(gone)
            if self.remover is None:
                self.remover = threading.Thread(target=self._empty_trash, daemon=True)
                self.remover.start()

    def _empty_trash(self):
        while True:
            with self.trash_lock:
                if not self.trash:
                    self.remover = None
                    return
                gone = self.trash.pop()
            shutil.rmtree(gone, ignore_errors=True)

    def run(self):
        # A server started by '&' in a script hands a local agent SIGINT and SIGQUIT
        # ignored, and nohup SIGHUP; every job would inherit that, unlike a job over
        # SSH: back to what a login gives (the agent has no terminal to hang up).
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGQUIT, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # wrappers inherit it
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.set_wakeup_fd(wake_w)
        self.sel.register(0, selectors.EVENT_READ, "command")
        self.sel.register(wake_r, selectors.EVENT_READ, "child")
        for name in os.listdir("."):
            if name.startswith(GONE):
                self._remove(name)
        pending = b""
        say("ready", protocol=PROTOCOL, python=sys.version.split()[0])
        while True:
            # A watched wrapper is no child of ours: nothing signals its end, so look.
            for key, _ in self.sel.select(0.05 if self.watched else None):
                if key.data == "child":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                elif key.data == "command":
                    data = os.read(0, 65536)
                    if not data:
                        return 0  # the server went away; the wrappers live on
                    pending += data
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        self.obey(json.loads(line))
                elif key.data[0] == "claim":  # a prepared wrapper answered its go
                    self.sel.unregister(key.fd)
                    self.launched(key.data[1], key.data[1].take_claim())
                else:  # a job's process ended ("e"), or its wrapper did (EOF)
                    byte = b""
                    with contextlib.suppress(OSError):
                        byte = os.read(key.fd, 1)
                    self.sel.unregister(key.fd)
                    os.close(key.fd)
                    # A wrapper that ends without a job is no job's end: a dropped one
                    # may end after the same job started here again.  A claimed one's
                    # end reap() tells.
                    if byte == b"e":
                        self.ended(key.data[1])
            self.reap()

    def reap(self):
        """Report each wrapper that has exited.  Each by its pid: waitpid(-1) would
        also reap nvidia-smi, whose subprocess call in the GPU thread must wait for
        it itself."""
        for pid in list(self.wrappers):
            with contextlib.suppress(ChildProcessError):
                if not os.waitpid(pid, os.WNOHANG)[0]:
                    continue
            w = self.wrappers.pop(pid)
            if w.claimed is None and w.go is None and w.claim is not None:
                self.sel.unregister(w.claim)  # it had its go: its answer is there now
                self.launched(w, w.take_claim())
            if w.claimed:  # launched: its end is reported
                self.ended(w.cmd["id"])
                say("exited", id=w.cmd["id"], **exit_report(w.cmd))
            elif w.claimed is False:  # refused its launch: it ran nothing
                say("exited", id=w.cmd["id"])
            elif w.go is not None:  # a prepared start that ended before its go
                self.prepared = {a: p for a, p in self.prepared.items() if p is not w}
                w.drop()
                say("dropped", id=w.cmd["id"])
        for pid in list(self.watched):
            st = proc_state(pid)
            if st is None or st[0] == "Z":
                job_id = self.watched.pop(pid)
                self.ended(job_id)
                say("exited", id=job_id)

    def ended(self, job_id):
        """A job's process has ended: the job prepared to follow it starts now, if its
        lease holds (after it, the server may have given the job to another node)."""
        self.running.discard(job_id)
        w = self.prepared.pop(job_id, None)
        if w is None:
            return
        try:
            if time.time() > w.cmd["deadline"]:
                raise TimeoutError("its lease is over")
            os.write(w.go, b"g")
        except OSError:  # (or the wrapper is gone already)
            w.drop(kill=True)
            say("dropped", id=w.cmd["id"])
            return
        os.close(w.go)
        w.go = None
        # Its answer comes once it is ready (a project still unpacking takes a while):
        # the loop reads it, and goes on serving meanwhile.
        self.sel.register(w.claim, selectors.EVENT_READ, ("claim", w))

    def launched(self, w, claimed):
        if claimed:
            self.running.add(w.cmd["id"])
        say("started", id=w.cmd["id"], wrapper=w.pid, launched=claimed)

    def fork(self, cmd, prepared):
        w = fork_wrapper(cmd, prepared)
        self.wrappers[w.pid] = w
        self.sel.register(w.ended, selectors.EVENT_READ, ("ended", cmd["id"]))
        return w

    def obey(self, cmd):
        """Carry out one command from the server."""
        op = cmd.get("op")
        if op in ("start", "prepare", "watch", "remove", "make") \
                and not JOB_ID_RE.match(cmd["dir"]):
            if op == "make":
                say("made", id=cmd["id"], errno=errno.EINVAL, error="not a job's folder")
            return  # a job's folder, and nothing else, directly in the workdir
        if op == "start":
            w = self.fork(cmd, prepared=False)
            self.launched(w, w.claimed)
        elif op == "prepare":
            w = self.fork(cmd, prepared=True)
            say("prepared", id=cmd["id"], wrapper=w.pid)
            self.prepared[cmd["after"]] = w
            if cmd["after"] not in self.running:
                self.ended(cmd["after"])  # it is over already
        elif op == "renew":
            for w in self.prepared.values():
                w.cmd["deadline"] = cmd["deadline"]
        elif op == "drop":  # (said only of one really dropped: it may have started,
            for after, w in list(self.prepared.items()):  # or dropped itself, already)
                if w.cmd["id"] == cmd["id"]:
                    del self.prepared[after]
                    w.drop(kill=True)
                    self.discard(w.cmd["dir"])
                    say("dropped", id=cmd["id"])
        elif op == "cancel":  # (a wrapper gone already, its pid reused by another user)
            with contextlib.suppress(OSError):
                os.kill(int(cmd["wrapper"]), signal.SIGTERM)
        elif op == "watch":
            pid = int(cmd["wrapper"])
            if is_wrapper_of(pid, cmd["dir"]):
                self.watched[pid] = cmd["id"]
                self.running.add(cmd["id"])
            else:
                say("exited", id=cmd["id"])
        elif op == "make":  # never past its lease: the server may have given up on it,
            if time.time() <= cmd["deadline"]:  # and made the folder again for another try
                self.discard(cmd["dir"])  # left by an attempt that never launched
                say("made", id=cmd["id"], **make_folder(cmd["dir"], cmd["files"]))
            else:
                say("made", id=cmd["id"], errno=errno.ETIMEDOUT, error="its lease is over")
        elif op == "remove":
            self.discard(cmd["dir"])
        elif op == "read":
            path = job_path(cmd["path"])
            say("data", id=cmd["id"], **(read_piece(path, int(cmd["offset"]),
                                                    int(cmd["limit"]))
                                         if path else {"kind": "not a job's file", "size": 0}))
        elif op == "gpus":  # in a thread: nvidia-smi may take seconds, and pings go on
            threading.Thread(target=lambda: say("gpus", reading=gpu_reading()),
                             daemon=True).start()
        elif op == "ping":
            say("pong")
        elif op == "check":  # in a thread: a setup line may take seconds
            threading.Thread(target=lambda: say("checked", environments=check_environments(
                cmd["environments"], cmd["run_as"], cmd["env"])), daemon=True).start()


###############################################################################
# Spool #######################################################################
###############################################################################

STATES = ("pending", "running", "completed", "failed", "cancelled")
FINAL_STATES = STATES[2:]
#: Where a finished job's files stand: see Job.outputs.
OUTPUT_STATES = ("collecting", "complete", "truncated", "lost", "none")

#: Upper bound for free-text ids in a job's config.
MAX_ID_LENGTH = 200
#: The most retries a job may ask for.
MAX_RETRIES = 10
#: The most jobs one job may wait for (after and after_any together).
MAX_DEPENDENCIES = 1000
#: A notice's tries: the wait after the first failure, doubled each time up to the
#: most, for a day; each try may take NOTICE_TIMEOUT seconds.
NOTICE_BACKOFF, NOTICE_MAX_WAIT, NOTICE_GIVE_UP, NOTICE_TIMEOUT = 1.0, 600.0, 86400.0, 10.0
#: Seconds a submit's Idempotency-Key is remembered.
KEY_TTL = 24 * 3600
#: An Idempotency-Key: printable, and not long.
KEY_RE = re.compile(r"\A[\x21-\x7e]{1,255}\Z")


def new_job_id():
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


def job_field(schema, default=dataclasses.MISSING, *, doc=None, config=None, stored=False,
              key=..., show=None, shown_schema=None, minimum=None, maximum=None, below=None,
              parse=None):
    """A Job field, declared once; submit, job.json, the status record and the
    OpenAPI document are all derived from what it says here.

    ``schema``: OpenAPI's type of its value in the status record, shown under
    ``key`` (default: its name; None: not shown) as ``show(job)`` gives it (default:
    the value itself; ``shown_schema`` its type there when not ``schema``).
    ``config``: "required" or "optional" when config.yaml sets
    it, then checked against ``minimum``, ``maximum`` (a number, or the name of the
    Config key that sets it) and ``below`` (a maximum only admins may pass), or by
    ``parse(key, value, config)``, which returns the checked value.
    ``stored``: kept in job.json."""
    described = {"description": doc} if doc else {}
    meta = {"schema": {**schema, **described}, "config": config,
            "shown_schema": None if shown_schema is None else
            {**shown_schema, **described} if shown_schema else {},
            "stored": stored, "key": key, "show": show, "minimum": minimum,
            "maximum": maximum, "below": below, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def _iso(name):
    return lambda job: isotime(getattr(job, name))


#: A job's own variables (``env``) and a sweep's parameters: names like a shell's.
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


def _array_spec(key, value, config):
    """``array``: N, "A-B" or "A-B%K" (at most K at once, as Slurm writes it): (the
    indexes, the most running at once or None)."""
    m = re.fullmatch(r"(\d{1,7})(?:-(\d{1,7}))?(?:%(\d{1,7}))?", str(value)) \
        if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if m is None:
        raise BadRequest(f"config_file: {key!r} must be a count (32), a range (\"0-31\") or a "
                         "range with the most to run at once (\"0-31%4\")")
    low, high, most = m[1], m[2], m[3]
    indexes = range(int(low), int(high) + 1) if high is not None else range(int(low))
    if not 1 <= len(indexes) <= config.max_array_size:
        raise BadRequest(f"config_file: {key!r} must hold 1 to {config.max_array_size} jobs "
                         "(max_array_size)")
    if most is not None and int(most) < 1:
        raise BadRequest(f"config_file: {key!r}: the most to run at once must be 1 or more")
    return list(indexes), int(most) if most else None


def _sweep_spec(key, value, config):
    """``sweep``: {name: [values]}: one job for every combination, as a list of
    parameter mappings."""
    if not (isinstance(value, dict) and value and all(
            isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(v, list) and v
            for k, v in value.items())):
        raise BadRequest(f"config_file: {key!r} must map names to lists of values, like "
                         "{lr: [0.001, 0.01], batch: [32, 64]}")
    size = math.prod(len(v) for v in value.values())
    if size > config.max_array_size:
        raise BadRequest(f"config_file: {key!r} makes {size} jobs, more than "
                         f"{config.max_array_size} (max_array_size)")
    for v in value.values():
        for item in v:
            if not isinstance(item, (str, int, float, bool)) or isinstance(item, float) \
                    and not math.isfinite(item):
                raise BadRequest(f"config_file: {key!r}: each value must be a string, a "
                                 "number or true/false")
    return [dict(zip(value, combo)) for combo in itertools.product(*value.values())]


_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
_TIME = {"type": "string", "format": "date-time", "nullable": True}
_NULLABLE_STR = {"type": "string", "nullable": True}


@dataclasses.dataclass
class Job:
    """One job as the API shows it; ``status`` mirrors the folder the job is in.
    The Spool owns every Job: only its methods change one, under its lock."""
    id: str = job_field({"type": "string"}, stored=True, key="job_id")
    user_id: str = job_field(_TEXT, doc="the token's user", config="required", stored=True)
    competition_id: str = job_field(_TEXT, doc="free text, for the user's own bookkeeping",
                                    config="required", stored=True)
    project_id: str = job_field(_TEXT, doc="free text, for the user's own bookkeeping",
                                config="required", stored=True)
    expected_time: float = job_field(
        {"type": "number"},
        doc="seconds; the job is killed after timeout_multiplier times this",
        config="required", stored=True, minimum=0, maximum="max_expected_time")
    submitted_at: float = job_field(_TIME, stored=True, show=_iso("submitted_at"))
    node_id: int = job_field({"type": "integer"})
    priority: int = job_field({"type": "integer", "default": 0}, 0,
                              doc="higher runs first; above 0 for admins only",
                              config="optional", stored=True, minimum=-100, maximum=100,
                              below=0)
    gpus: int = job_field({"type": "integer", "default": 1}, 1,
                          doc="GPUs the job needs, all on one node (default 1)",
                          config="optional", stored=True, minimum=1)
    entrypoint: str | None = job_field(
        {**_TEXT, "nullable": True}, None,
        doc="with a project (an archive as code): the script in it to run (default main.py)",
        config="optional", stored=True)
    environment: str | None = job_field(
        {**_TEXT, "nullable": True}, None,
        doc="one of the server's environments (GET /api/nodes lists them); default: the "
        "node's python3", config="optional", stored=True)
    env: dict = job_field(
        {"type": "object", "additionalProperties": {"type": "string"}}, None,
        doc="the job's own environment variables (config.yaml: a mapping; the status "
        "record shows their names alone)", config="optional", stored=True,
        show=lambda job: sorted(job.env or ()),
        shown_schema={"type": "array", "items": {"type": "string"}})
    retries: int = job_field({"type": "integer", "default": 0}, 0,
                             doc="times a failed job is queued again (never a cancelled one)",
                             config="optional", stored=True, minimum=0, maximum=MAX_RETRIES)
    retry_on_exit: list | None = job_field(
        {"type": "array", "items": {"type": "integer"}, "nullable": True}, None,
        doc="with retries: only these exit codes count as a failed attempt (a job whose "
        "node stayed away always counts)", config="optional", stored=True)
    after: list | None = job_field(
        {"type": "array", "items": {"type": "string"}, "nullable": True}, None,
        doc="job ids: this job runs once all of them completed; if one fails or is "
        "cancelled, so is this job", config="optional", stored=True)
    after_any: list | None = job_field(
        {"type": "array", "items": {"type": "string"}, "nullable": True}, None,
        doc="job ids: this job runs once all of them have ended, however they ended",
        config="optional", stored=True)
    #: While pending: the jobs in ``after`` and ``after_any`` that have not ended yet
    #: (kept by the Spool, found again at recovery).
    waiting_on: frozenset = job_field(
        {"type": "array", "items": {"type": "string"}}, frozenset(),
        doc="the jobs it still waits for (after, after_any)", show=lambda job: sorted(job.waiting_on))
    notify: str | None = job_field(
        {**_TEXT, "maxLength": 2000, "nullable": True}, None,
        doc="a URL (under the server's webhooks.allow) that gets the job's status, "
        "signed, when it ends", config="optional", stored=True)
    #: Once it has ended, with ``notify``: where the notice stands.
    notice: str | None = job_field(
        {"type": "string", "nullable": True}, None,
        doc="with notify, once the job has ended: delivered, or pending and why (it is "
        "tried again with backoff for a day), or given up")
    array: tuple | None = job_field(
        {"type": "string"}, None, key=None, show=lambda job: {}, shown_schema={},
        doc="a job array: a count (32), a range (\"0-31\") or a range with the most "
        "to run at once (\"0-31%4\"); each job gets GPUQUEUE_ARRAY_INDEX",
        config="optional", parse=_array_spec)
    sweep: list | None = job_field(
        {"type": "object", "additionalProperties": {"type": "array"}}, None, key=None,
        show=lambda job: {}, shown_schema={}, doc="{name: [values]}: one job for every combination, its "
        "values as JSON in GPUQUEUE_PARAMS", config="optional", parse=_sweep_spec)
    #: In an array: its id, this job's index, how many it has, the most running at
    #: once, and (a sweep's) this job's parameters.
    array_id: str | None = job_field(_NULLABLE_STR, None, stored=True,
                                     doc="the array it is part of")
    array_index: int | None = job_field({"type": "integer", "nullable": True}, None,
                                        stored=True)
    array_size: int | None = job_field({"type": "integer", "nullable": True}, None,
                                       stored=True)
    array_limit: int | None = job_field({"type": "integer", "nullable": True}, None,
                                        stored=True, key=None, show=lambda job: {},
                                        shown_schema={})
    params: dict = job_field({"type": "object", "nullable": True}, None, stored=True,
                             doc="a sweep's values for this job")
    #: Which run of the job this is: 1, then one more for each retry.
    attempt: int = job_field({"type": "integer"}, 1,
                             doc="which run of the job this is (1 + the retries it took)")
    status: str = job_field({"type": "string", "enum": list(STATES)}, "pending",
                            show=lambda job: job.shown_status)
    #: While it runs: the GPUs it got (CUDA_VISIBLE_DEVICES).
    gpu_ids: tuple = job_field(
        {"type": "array", "items": {"type": "string"}, "nullable": True}, (),
        doc="the GPUs it got (CUDA_VISIBLE_DEVICES), once started", key="gpu_indices",
        show=lambda job: list(job.gpu_ids) if job.gpu_ids and job.shown_status != "pending"
        else None)
    started_at: float | None = job_field(
        _TIME, None, show=lambda job: None if job.shown_status == "pending"
        else isotime(job.started_at))
    finished_at: float | None = job_field(_TIME, None, show=_iso("finished_at"))
    exit_code: int | None = job_field({"type": "integer", "nullable": True}, None)
    error: str | None = job_field(_NULLABLE_STR, None)
    cancel_requested: bool = job_field({"type": "boolean"}, False)
    #: Claimed by a node and made ready there, to start as soon as the job it follows
    #: has ended (GpuWorker._prepare): it shows as pending until it has started.
    prepared: bool = job_field({"type": "boolean"}, False, key=None, show=lambda job: {},
                               shown_schema={})
    #: Running, but the job prepared to follow it has started on its GPUs: it has
    #: ended, and is not recorded yet.  /api/nodes shows its successor on them.
    followed: bool = job_field({"type": "boolean"}, False, key=None, show=lambda job: {},
                               shown_schema={})
    #: Once it has ended: where its files stand (OUTPUT_STATES).
    outputs: str | None = job_field(
        {"type": "string", "enum": [*OUTPUT_STATES, None], "nullable": True}, None,
        doc="once it has ended, its files ($GPUQUEUE_OUTPUT_DIR): being brought back, "
        "complete, truncated (past the limits; GET /api/outputs says what was cut), lost "
        "(not brought back, with the reason) or none (it never ran)")
    #: On a slurm node: Slurm's id, state and reason (in memory; replaced whole).
    slurm: dict | None = job_field(
        {"slurm_job_id": {"type": "string"}, "slurm_state": {"type": "string"},
         "slurm_reason": _NULLABLE_STR}, None, key=None,
        show=lambda job: {"slurm_job_id": job.slurm["id"], "slurm_state": job.slurm["state"],
                          "slurm_reason": job.slurm["reason"]} if job.slurm else {})

    @classmethod
    @functools.cache
    def stored(cls):
        """The fields job.json keeps."""
        return tuple(f for f in dataclasses.fields(cls) if f.metadata["stored"])

    @classmethod
    @functools.cache
    def status_keys(cls):
        """(name, key, show) of each field the status record shows (job_field)."""
        return tuple((f.name, f.name if f.metadata["key"] is ... else f.metadata["key"],
                      f.metadata["show"]) for f in dataclasses.fields(cls))

    def meta(self):
        """What job.json holds."""
        return {f.name: getattr(self, f.name) for f in self.stored()}

    @classmethod
    def from_meta(cls, meta, **state):
        """The job a job.json describes; ValueError naming the field that is wrong.
        A field with a default (``priority``, ``gpus``) may be absent: older job.json
        files lack them."""
        if not isinstance(meta, dict):
            raise ValueError("job.json is not a mapping")
        fields = {}
        for f in cls.stored():
            if f.name not in meta and f.default is not dataclasses.MISSING:
                continue
            value, least = meta.get(f.name), f.metadata["minimum"]
            if f.type == "int | None":
                if value is not None and type(value) is not int:
                    raise ValueError(f"job.json: {f.name!r} must be a whole number or null")
            elif f.type == "int":
                if type(value) is not int or (least is not None and value < least):
                    raise ValueError(f"job.json: {f.name!r} must be a whole number"
                                     + ("" if least is None else f" of at least {least}"))
            elif f.type == "str":
                if not isinstance(value, str):
                    raise ValueError(f"job.json: {f.name!r} must be a string")
            elif f.type == "str | None":
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"job.json: {f.name!r} must be a string or null")
            elif f.type == "list | None":
                item = str if f.metadata["schema"]["items"]["type"] == "string" else int
                if value is not None and not (isinstance(value, list) and all(
                        type(v) is item for v in value)):
                    raise ValueError(f"job.json: {f.name!r} must be a list of {item.__name__}")
            elif f.type == "dict":
                if value is not None and not (isinstance(value, dict) and all(
                        isinstance(v, (str, int, float, bool)) for v in value.values())):
                    raise ValueError(f"job.json: {f.name!r} must map names to values")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"job.json: {f.name!r} must be a number")
            fields[f.name] = float(value) if f.type == "float" else value
        return cls(**fields, **state)

    @property
    def shown_status(self):
        """The status users see: a job that Slurm still holds back, or one prepared to
        follow another, shows as pending."""
        if self.status == "running" and (self.prepared or self.slurm
                                         and self.slurm["state"] in SLURM_WAITING):
            return "pending"
        return self.status

    def public(self):
        """The job's status record: each field's ``key`` and ``show`` (job_field)."""
        out = {}
        for name, key, show in self.status_keys():
            value = show(self) if show else getattr(self, name)
            if key is None:
                out.update(value)
            else:
                out[key] = value
        return out


#: The keys a job's config.yaml may hold, from Job's declarations, and the token,
#: which is never stored: name -> (its job_field's metadata).
JOB_KEYS = {**{f.name: f.metadata for f in dataclasses.fields(Job) if f.metadata["config"]},
            "token": {"schema": {"type": "string", "description": "the token, when no "
                                 "Authorization header is sent; never stored"},
                      "config": "optional", "minimum": None, "maximum": None, "below": None,
                      "parse": None}}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job ended, as one value from whoever learnt it (its node's report,
    Slurm, a cancel) to the job's folder: its status, exit code and error, and
    what it left behind: ``streams``, each stream's bytes as stored (capped where
    they were written; a missing one is empty)."""
    status: str
    exit_code: int | None = None
    error: str | None = None
    streams: dict = dataclasses.field(default_factory=dict)
    #: Where the job's files are on its node (below its workdir), to be brought
    #: back; None when there is nothing to bring: it never ran there ("none"), or
    #: its node said it left no file ("complete" at once, see ``outputs``).
    outputs_at: str | None = None
    outputs: str = "none"

    def stream(self, name):
        return self.streams.get(name, b"")


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
        self.seconds = {}  # pending id -> its expected GPU-seconds (expected_time x gpus)
        # Per lane, expected seconds of its first 0, 1, 2... jobs, so that a status
        # costs O(users), not O(jobs); extended on append, rebuilt after other changes.
        self._sums = {}

    def __len__(self):
        return len(self.seconds)

    def add(self, job):
        key = (job.priority, job.user_id)
        lane = self.lanes.setdefault(key, [])
        self.seconds[job.id] = job.expected_time * job.gpus
        if lane and lane[-1] > job.id:  # back into its place (a requeue)
            bisect.insort(lane, job.id)
            self._sums.pop(key, None)
            return
        lane.append(job.id)
        if key in self._sums:
            self._sums[key].append(self._sums[key][-1] + self.seconds[job.id])

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

    def order(self, node_id):
        """(turn, id, ``node_id``) of every job in the order they are to run, lazily:
        each round gives every user of a priority one job, as ``ahead`` counts them.
        A turn after the first compares as a round later than every real one."""
        later = itertools.count(1)
        heap = [(self._turn(key), key, 0) for key in self.lanes]
        heapq.heapify(heap)
        while heap:
            turn, key, i = heapq.heappop(heap)
            lane = self.lanes[key]
            yield turn, lane[i], node_id
            if i + 1 < len(lane):
                heapq.heappush(heap, ((-key[0], math.inf, next(later), lane[i + 1]), key, i + 1))

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


def _escaped(text):
    """``text`` as the inside of a JSON string, in UTF-8."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def _fits(text, room, tail):
    """The most characters of ``text``'s head (or ``tail``) whose escaped form takes
    ``room`` bytes at most."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if len(_escaped(text[-mid:] if tail else text[:mid])) <= room:
            low = mid
        else:
            high = mid - 1
    return low


def json_text(path, most):
    """A stream file's text as the inside of a JSON string (UTF-8; bytes that are no
    UTF-8 as U+FFFD), of ``most`` bytes at most: past it, its head and tail with a
    note between, cut between characters, never inside an escape.  Lines of text
    take at most twice their bytes; what JSON must escape further (control
    characters take six bytes each, invalid UTF-8 three) is what gets cut, so that
    an answer is never many times the output cap."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return b""
    whole = _escaped(text)
    if len(whole) <= most:
        return whole
    half = max(0, most - 300) // 2
    head, tail = _fits(text, half, False), _fits(text, half, True)
    note = (f"\n[gpuqueue: output truncated for this answer, {len(text) - head - tail} of "
            f"{len(text)} characters cut here: it carries at most {most} bytes per stream; "
            "GET /api/logs gives the output as it was stored]\n")
    return _escaped(text[:head]) + _escaped(note) + _escaped(text[len(text) - tail:])


class JobFolder:
    """One job's folder: the only code that knows the names inside it.

    The Spool moves job folders between queues; everything read or written
    inside one goes through here, executors included (they get a JobFolder,
    never a path), so that each file name means one thing everywhere.
    """

    CODE = "code.py"          # the script as uploaded, or
    PROJECT = "project.archive"  # the project (an archive) as uploaded
    CONFIG = "config.yaml"    # the config as uploaded, token removed
    RECORD = "job.json"       # the submit record (Job.meta)
    START = "start.json"      # (claimed by a node, in releases before 0.3)
    LAUNCHING = "launching"   # may have reached its node: where it runs there, since
    #                           when, on which GPUs
    SLURM = "slurm.json"      # on a Slurm node, once sbatch answered: Slurm's job id
    CANCEL = "cancel"         # a cancel was asked for
    ATTEMPT = "attempt"       # after a retry: which run the job is on (absent: its first)
    RESULT = "result.json"    # finished: how (written last; the move to done/ follows)
    STREAMS = ("stdout", "stderr")  # finished: the output, capped
    OUTPUTS = "outputs"       # finished: the job's files, brought back from its node
    OUTPUTS_TMP = ".outputs.tmp"  # ...while they are being brought back
    LISTING = "outputs.json"  # ...and what came back (written last: then they are whole)
    NOTICE = "notice.json"    # with notify: the notice delivered, or given up
    ANSWER = "answer.json"    # GET /api/results's answer, made once it is first asked
    #                           for (answer.<n>.json: an earlier attempt's)
    #: A local job's work folder inside its job folder, as releases before node
    #: protocol 2 made it; recovery meets it after an upgrade.
    OLD_WORK = "work"

    def __init__(self, path):
        self.path = Path(path)

    @property
    def id(self):
        return self.path.name

    # -- a new job -----------------------------------------------------------

    @classmethod
    def create(cls, path, job, code, config_data, code_from=None):
        """Write a new job's folder, durably.  ``path`` must still be private
        (under tmp/), so its files need no temporary names.  ``code_from``: a file
        holding the code already (an array's), linked instead of written again."""
        os.mkdir(path)
        if code_from is not None:
            os.link(code_from, Path(path) / (cls.PROJECT if job.entrypoint else cls.CODE))
        # All three files are written before any is fsynced, so that one journal
        # commit can carry them all; plain fds, as each extra syscall is a GIL
        # hand-off between eight busy threads.
        fds = []
        try:
            for name, data in ((cls.PROJECT if job.entrypoint else cls.CODE, code),
                               (cls.CONFIG, config_data),
                               (cls.RECORD, json.dumps(job.meta()).encode()))[
                                   0 if code_from is None else 1:]:
                fds.append(os.open(Path(path) / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                write_all(fds[-1], data)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        fsync_dir(path)
        return cls(path)

    def load(self, **state):
        """The job this folder holds; ValueError saying why when it cannot be one.
        Ids are checked at this boundary: the folder's name must be a job id, and
        the id inside job.json the same (a copied folder is not a second job)."""
        if not JOB_ID_RE.match(self.id):
            raise ValueError("the folder's name is not a job id")
        try:
            meta = read_json(self.path / self.RECORD)
        except OSError as exc:
            raise ValueError(f"no readable job.json: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"unreadable job.json: {exc}") from None
        job = Job.from_meta(meta, attempt=self.attempt(), **state)
        if job.id != self.id:
            raise ValueError(f"job.json names job {job.id!r}, not the folder's {self.id!r}")
        return job

    def code(self):
        """The script or the project's archive, as uploaded."""
        try:
            return (self.path / self.CODE).read_bytes()
        except FileNotFoundError:
            return (self.path / self.PROJECT).read_bytes()

    # -- claim, launch, cancel -----------------------------------------------

    def started(self):
        """(when the job was started, the GPUs it got), or (None, ()) when nothing of it
        can have reached a node (its claim was cut short before launching was written:
        a release before 0.3 wrote start.json at the claim)."""
        for name in (self.LAUNCHING, self.START):
            try:
                record = read_json(self.path / name)
                value, gpus = record["started_at"], record.get("gpus", [])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    isinstance(gpus, list) and all(isinstance(g, str) for g in gpus):
                return value, tuple(gpus)
        return None, ()

    def launched_where(self):
        """Where on its node the job may run, once an executor said so; else None."""
        try:
            text = (self.path / self.LAUNCHING).read_text()
        except FileNotFoundError:
            return None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return json.loads(text)["where"]
        return text  # (as a release before 0.3 wrote it)

    def mark_launching(self, where, job):
        """From here on the job may be running on its node: where, since when (its
        claim), on which GPUs; recovery reads them (started)."""
        write_json(self.path / self.LAUNCHING, {
            "where": where, "started_at": job.started_at, "node_id": job.node_id,
            "gpus": list(job.gpu_ids)})

    def slurm_id(self):
        try:
            return str(read_json(self.path / self.SLURM)["slurm_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_slurm(self, slurm_id):
        write_json(self.path / self.SLURM, {"slurm_id": slurm_id})

    def cancel_requested(self):
        return (self.path / self.CANCEL).exists()

    def mark_cancel(self):
        write_file(self.path / self.CANCEL, b"")

    def old_run(self, limit):
        """What a local job of a release before node protocol 2 left in its work
        folder here: {"result": its result.json or None, "stdout", "stderr" (capped),
        "wrapper": its wrapper's pid, when it is still that wrapper}; None when
        there is no such folder."""
        work = self.path / self.OLD_WORK
        if not work.is_dir():
            return None
        found = {s: read_capped(work / s, limit) for s in NodeFiles.STREAMS}
        found["result"] = found["wrapper"] = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found["result"] = read_small_json(work / NodeFiles.RESULT)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pid = int(read_small_json(work / NodeFiles.PIDS)["wrapper"])
            found["wrapper"] = pid if is_wrapper_of(pid, work) else None
        return found

    def reset(self):
        """Forget a claim that never launched, before the job is queued again."""
        for name in (self.START, self.LAUNCHING, self.SLURM):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / self.OLD_WORK, ignore_errors=True)

    # -- the end -------------------------------------------------------------

    def has_result(self):
        return (self.path / self.RESULT).exists()

    def write_result(self, result, outcome):
        """The record of how the job ended (``result``) and what it left (``outcome``),
        output first: result.json is the mark of a finished job."""
        write_files(self.path, {**{name: outcome.stream(name) for name in self.STREAMS},
                                self.RESULT: json_record(result)})

    def read_result(self):
        return read_json(self.path / self.RESULT)

    def outputs_state(self, result):
        """Where the job's files stand (OUTPUT_STATES), from its result and listing."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return read_json(self.path / self.LISTING)["state"]
        found = result.get("outputs")
        return found.get("state") if isinstance(found, dict) else None

    def listing(self):
        """outputs.json: what came back; None while nothing is whole yet."""
        try:
            return read_json(self.path / self.LISTING)
        except (OSError, ValueError):
            return None

    def output_file(self, rel):
        """The path of one of the job's files, by its path in the listing."""
        return self.path / self.OUTPUTS / rel

    def store_outputs(self, fetch):
        """Bring the job's files in: ``fetch(folder)`` fills the folder and says what
        it holds (the listing); the folder takes its place, then the listing is
        written, last, so files are never shown whole while half-written.  What a
        try cut short by a crash left is fetch's to judge: a copy starts afresh,
        files already moved in (a local node's) are kept, as they are nowhere else."""
        tmp, final = self.path / self.OUTPUTS_TMP, self.path / self.OUTPUTS
        (self.path / self.LISTING).unlink(missing_ok=True)
        if final.is_dir():  # a try cut short after its rename: fetch sees it again
            if tmp.exists():
                shutil.rmtree(final)
            else:
                os.rename(final, tmp)
        listing = fetch(tmp)  # (tmp may hold what a cut-short try left: files moved in)
        if tmp.is_dir():
            os.rename(tmp, final)
        write_json(self.path / self.LISTING, listing)

    def stream(self, name, attempt=None):
        """The path of a finished job's stdout or stderr (of an earlier ``attempt``)."""
        assert name in self.STREAMS
        return self.path / (name if attempt is None else f"{name}.{attempt}")

    def answer(self, head, most, attempt=None):
        """A finished job's results as one JSON object (``head``, then each stream as
        a JSON string of at most ``most`` bytes: json_text), opened: made once, on
        disk, so that it is sent from the file (by the event loop, holding no
        thread) and an open answer outlives the job's removal.  FileNotFoundError
        when the job is gone."""
        path = self.path / (self.ANSWER if attempt is None else f"answer.{attempt}.json")
        with contextlib.suppress(FileNotFoundError):
            return open(path, "rb")
        body = [json.dumps(head)[:-1].encode()]
        for name in self.STREAMS:
            body += [f', "{name}": "'.encode(), json_text(self.stream(name, attempt), most),
                     b'"']
        try:
            write_file(path, b"".join(body) + b"}", sync_dir=False)
        except OSError as exc:
            if not no_room(exc):
                raise
            return io.BytesIO(b"".join(body) + b"}")  # no room to keep it: sent from memory
        return open(path, "rb")

    def attempt(self):
        try:
            value = int((self.path / self.ATTEMPT).read_text())
        except (OSError, ValueError):
            return 1
        return value if 1 <= value <= MAX_RETRIES + 1 else 1

    def keep_attempt(self, attempt, outcome):
        """Keep a failed attempt's output (as stdout.N, stderr.N and result.N.json)
        and forget its claim, then say the next attempt is on.  A crash in between
        costs at most one more attempt, never a lost job."""
        for name in self.STREAMS:
            write_file(self.path / f"{name}.{attempt}", outcome.stream(name), sync_dir=False)
        write_json(self.path / f"result.{attempt}.json", {
            "attempt": attempt, "exit_code": outcome.exit_code, "error": outcome.error})
        self.reset()
        write_file(self.path / self.ATTEMPT, str(attempt + 1))

    def discard_old_work(self):
        shutil.rmtree(self.path / self.OLD_WORK, ignore_errors=True)


class DoneIndex:
    """spool/done.index: what start-up needs to know of every finished job (its node,
    its status, whether its files are still being brought back), so that a restart
    reads this one file rather than every job's result.json.  It is derived from
    done/ and owned by the Spool, which appends a line as a job finishes (``+ id node
    status c|-``), as its files come back (``c id``) and as retention removes it
    (``- id node status``), never synced: at start the lines are checked against
    done/ itself (the count of job folders and the sum of their ids, one listdir),
    and when they disagree (a power cut lost some, or the file is missing) it is
    made again from the jobs' own records."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None

    def load(self, ids):
        """(node -> status -> count, ids whose files were still being brought back)
        for the finished jobs ``ids`` (done/'s folders), or None when the index does
        not account for exactly them.  A file of mostly stale lines is compacted."""
        want = sum(int(i, 16) for i in ids)
        counts = collections.defaultdict(collections.Counter)
        collecting, lines, total, got = set(), 0, 0, 0
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    parts = line.split()
                    if not line.endswith(b"\n") or not parts:
                        return None  # cut short by a crash
                    lines += 1
                    if parts[0] == b"+" and len(parts) == 5:
                        total, got = total + 1, got + int(parts[1], 16)
                        counts[int(parts[2])][parts[3].decode()] += 1
                        if parts[4] == b"c":
                            collecting.add(parts[1].decode())
                    elif parts[0] == b"-" and len(parts) == 4:
                        total, got = total - 1, got - int(parts[1], 16)
                        counts[int(parts[2])][parts[3].decode()] -= 1
                        collecting.discard(parts[1].decode())
                    elif parts[0] == b"c" and len(parts) == 2:
                        collecting.discard(parts[1].decode())
                    else:
                        return None
        except (OSError, ValueError):
            return None
        if total != len(ids) or got != want:
            return None
        if lines > 2 * total + 1000:
            with contextlib.suppress(OSError):  # (no room: it stays long, and right)
                self._compact()
        return counts, collecting

    def _compact(self):
        """Keep the lines of the jobs still there, and nothing else."""
        gone, collected = set(), set()
        with open(self.path, "rb") as f:
            for line in f:
                parts = line.split()
                (gone if parts[0] == b"-" else collected if parts[0] == b"c" else set()
                 ).add(parts[1])
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, "rb") as f, open(tmp, "wb") as out:
            for line in f:
                parts = line.split()
                if parts[0] == b"+" and parts[1] not in gone:
                    out.write(line if parts[4] != b"c" or parts[1] not in collected
                              else line[:-2] + b"-\n")
        os.replace(tmp, self.path)

    def rebuild(self, entries):
        """Write the index afresh from (id, node, status, collecting) of every job, and
        say what load would of it.  Without room for it (a full disk removed it) it is
        left missing, for the next start to make: nothing but start-up's speed needs it."""
        entries = list(entries)
        counts = collections.defaultdict(collections.Counter)
        for _, node, status, _ in entries:
            counts[node][status] += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as out:
                out.writelines(f"+ {i} {n} {st} {'c' if c else '-'}\n"
                               for i, n, st, c in entries)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("done.index: %s; it is made again at the next start", exc)
            for name in (tmp, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(name)
        return counts, {i for i, _, _, c in entries if c}

    def _append(self, text):
        """One line more.  The index is derived: a line that cannot be written (a full
        disk) makes it stale instead, and the next start makes it again; the job's
        move to done/, which it follows, stands."""
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            write_all(self._fd, text.encode())
        except OSError as exc:
            log.warning("done.index: %s; it is made again at the next start", exc)
            self.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def add(self, job_id, node_id, status, collecting):
        self._append(f"+ {job_id} {node_id} {status} {'c' if collecting else '-'}\n")

    def collected(self, job_id):
        self._append(f"c {job_id}\n")

    def removed(self, job_id, node_id, status):
        self._append(f"- {job_id} {node_id} {status}\n")

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclasses.dataclass(frozen=True)
class NodeState:
    """One node as the queue holds it, at one moment (Spool.node_state): what the
    scheduler decides by, and what /api/nodes shows, taken whole under the lock."""
    running: tuple  # its running jobs
    drained: bool   # an admin has it drained: it starts nothing
    holding: object  # Holding: GPUs kept for a job that waits for more; or None
    foreign: dict   # GPU -> what uses it outside the queue: it takes no new job
    reading: tuple  # nvidia-smi's last reading of its GPUs, which ``foreign`` came from
    reading_error: str | None = None  # why the last reading gave none


class Spool:
    """The job folders on disk, and the one in-memory index of unfinished jobs and
    of each node's GPUs (held for a job, or used outside the queue).

    Everything here is the Spool's alone: other code calls its methods and never
    reads its attributes.  Every change to the index, and to the Jobs in it,
    happens in a method of this class under ``self._lock``, a threading lock;
    readers get copies taken under it (get, node_state), so what they see is
    whole.  The file lock server.lock, held from open() to close(), keeps other
    processes out.  The lock is never held while a job runs or a node is asked
    anything, nor, once open() has recovered the spool, across an fsync: renames
    happen under it, their fsyncs after.
    """

    def __init__(self, root, node_ids, gpu_counts=None):
        self._root = Path(root)
        self._node_ids = tuple(node_ids)
        self._node_dirs = {}  # (node, name) -> its folder (_node_dir)
        self._done_dir = self._root / "done"
        #: GPUs per node (1 unless told): work is planned in GPU-seconds per GPU.
        self._gpu_count = {n: (gpu_counts or {}).get(n, 1) for n in self._node_ids}
        self._lock = threading.Lock()
        self._server_lock = None
        self._changed = threading.Condition(self._lock)
        #: Unfinished jobs by id: the only in-memory copy of queue state.  What
        #: follows is derived from it, kept up to date by _index, _unindex,
        #: claim and _retire, so a submit never walks every queued job.
        self._active = {}
        #: Ticket of the last started job per (priority, user), for FairQueue's
        #: turns.  Kept in memory only: after a restart every user starts even.
        self._served = {}
        self._tickets = itertools.count(1)
        #: Pending jobs per node, in the order they are to run.
        self._queues = {n: FairQueue(self._served) for n in self._node_ids}
        #: Expected GPU-seconds of each node's pending jobs.
        self._pending_seconds = dict.fromkeys(self._node_ids, 0.0)
        #: Pending jobs per user.
        self._pending_per_user = collections.Counter()
        #: Running jobs per node, by id.
        self._running = {n: {} for n in self._node_ids}
        #: Nodes an admin has drained: they start no job until resumed.  Each has
        #: a ``nodes/<n>/drained`` file, so this survives a restart.
        self._drained = set()
        #: Per node: the Holding its scheduler keeps (set by claim), and its last GPU
        #: reading with the GPUs it found used outside the queue (set_gpus).  In
        #: memory only: all are found again.
        self._holding = dict.fromkeys(self._node_ids)
        self._foreign = {n: {} for n in self._node_ids}
        self._reading = dict.fromkeys(self._node_ids, ())
        self._reading_error = dict.fromkeys(self._node_ids)
        #: Ids in done/, oldest first, and the index that spares start-up reading them.
        self._done_ids = []
        self._done_index = DoneIndex(self._root / "done.index")
        #: Finished-job counts per node and status in done/, for /api/nodes.
        self._final_counts = {n: dict.fromkeys(FINAL_STATES, 0) for n in self._node_ids}
        #: Jobs finished since this server started, per node and status: the
        #: counterpart of each worker's ``started``, for /metrics.
        self._finished_here = {n: dict.fromkeys(FINAL_STATES, 0) for n in self._node_ids}
        #: An open fd of each node's pending/ folder: fsyncing a queue after a rename
        #: is then one syscall, not three, on the submit path.
        self._queue_fds = {}
        #: The disk guard's last reading: (when, bytes that may still be accepted).
        self._disk = (-math.inf, 0)
        #: Dependencies: job id -> ids of pending jobs waiting for it to end (those
        #: jobs are in no queue until it has); and jobs to cancel, with the reason,
        #: as their ``after`` dependency did not complete (cancel_doomed).
        self._waiters = collections.defaultdict(set)
        self._doomed = []
        #: How many unfinished jobs name each id in ``after``: retention leaves those
        #: finished jobs, as a restart reads their status again (_waiting_on).
        self._needed = collections.Counter()
        #: Prepared jobs (not started yet): the turn each was chosen in, and the ticket
        #: its claim took (FairQueue), so that one that a job came ahead of in turn
        #: since is found (ahead_in_turn), and a requeue gives its user the turn back.
        self._turns = {}
        #: Called (under the lock) with a node's id when one of its jobs stops waiting,
        #: and with a job's id and status when it starts running or finishes (None).
        self._on_ready = lambda node_id: None
        self._on_change = lambda job_id, status: None
        #: Per node: finished jobs whose files a stopped server had not brought back
        #: yet, (id, where on the node), found at recovery for the node's collector.
        self._uncollected = collections.defaultdict(list)
        #: Running jobs per array that has a limit (``array: "0-31%4"``), and
        #: unfinished jobs per array.
        self._array_running = collections.Counter()
        self._array_open = collections.Counter()
        #: Set when a notice is put in the outbox, for the thread that sends them.
        self._notices = threading.Event()
        #: Finished jobs being read (a tar of their files, a delivery): retention
        #: leaves them until the reading ends, so that no answer is cut short.
        self._kept = collections.Counter()

    @property
    def root(self):
        return self._root

    @property
    def node_ids(self):
        return self._node_ids

    # -- layout --------------------------------------------------------------

    def _node_dir(self, node_id, name):
        """nodes/<node>/<name>, made once: each job's moves ask for these."""
        try:
            return self._node_dirs[node_id, name]
        except KeyError:
            return self._node_dirs.setdefault((node_id, name),
                                              self._root / "nodes" / str(node_id) / name)

    def pending_dir(self, node_id):
        return self._node_dir(node_id, "pending")

    def running_dir(self, node_id):
        return self._node_dir(node_id, "running")

    def work_dir(self, node_id):
        """Where a local node's agent runs its jobs (a node's workdir by default)."""
        return self._node_dir(node_id, "work")

    def incoming_dir(self):
        """Drop folders (see the Drop folders section)."""
        return self._root / "incoming"

    def claims_dir(self):
        """The drop folders' claims, private to the server (see Incoming)."""
        return self._root / "claims"

    def scratch_dir(self, name):
        """A private folder on the spool's disk for a front end's files in the making
        (emptied at each start, as tmp/ is)."""
        path = self._root / "scratch" / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def control_dir(self):
        """Admin requests to the running server (see Admin control)."""
        return self._root / "control"

    def folder(self, job):
        """The folder of an unfinished job, where it is now."""
        d = self.pending_dir if job.status == "pending" else self.running_dir
        return JobFolder(d(job.node_id) / job.id)

    def done_folder(self, job_id):
        return JobFolder(self._done_dir / job_id)

    def folder_of(self, job_id):
        """The job's folder wherever it is now (its queue, running/ or done/), for
        reading alone; None for an unknown job."""
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                return self.folder(job)
        folder = self.done_folder(job_id)
        return folder if folder.path.is_dir() else None

    # -- opening and recovery ------------------------------------------------

    def open(self):
        """Take the spool for this server (or raise SpoolBusy), then recover it: only
        as the spool's own user (only_owner)."""
        self._root.mkdir(parents=True, exist_ok=True)
        only_owner(self._root, "the spool")
        self._server_lock = private_lock(self._root / "server.lock")
        try:
            self._server_lock.acquire(timeout=0)
        except filelock.Timeout:
            try:
                pid = (self._root / "server.pid").read_text().strip()
            except OSError:
                pid = "unknown"
            raise SpoolBusy(f"another gpuqueue server (pid {pid}) is using the spool "
                            f"{self._root}; stop it first or choose another spool") from None
        try:
            write_file(self._root / "server.pid", f"{os.getpid()}\n")
        except OSError as exc:  # a full disk must not keep the server from starting
            log.warning("cannot write %s: %s", self._root / "server.pid", exc.strerror)
        for d in ("tmp", "done", "corrupt", "incoming", "control"):
            (self._root / d).mkdir(exist_ok=True)
        for d in ("claims", "scratch"):
            (self._root / d).mkdir(mode=0o700, exist_ok=True)
        for n in self._node_ids:
            self.pending_dir(n).mkdir(parents=True, exist_ok=True)
            self.running_dir(n).mkdir(parents=True, exist_ok=True)
            self._queue_fds[n] = os.open(self.pending_dir(n), os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            self._recover()
        self.cancel_doomed()  # jobs whose dependency failed while the server was down

    def close(self):
        for fd in self._queue_fds.values():
            os.close(fd)
        self._queue_fds.clear()
        self._done_index.close()
        if self._server_lock is not None:
            self._server_lock.release()

    def _recover(self):
        """Bring the folders back to a true state: the first rows of the recovery
        table in the module docstring; the rest belong to the node workers."""
        self._roll_forward()
        for leftover in (self._root / "tmp").iterdir():
            log.warning("removing unacknowledged upload %s", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in (self._root / "scratch").iterdir():  # said nothing yet to anyone
            shutil.rmtree(leftover, ignore_errors=True)
        self._load_done()
        pending = []
        for n in self._node_ids:
            if self._drained_marker(n).exists():
                self._drained.add(n)
            for status, d in (("pending", self.pending_dir(n)), ("running", self.running_dir(n))):
                for path in sorted(d.iterdir()):
                    try:
                        job = self._load(JobFolder(path), n, status)
                    except OSError as exc:  # e.g. no room for a quarantine's reason
                        log.error("recovery: %s left as it is: %s", path, exc)
                        continue
                    if job is None:
                        continue
                    self._activate(job)
                    if job.array_id:
                        self._array_open[job.array_id] += 1
                    if job.status == "pending":
                        pending.append(job)
                    else:
                        self._running[n][job.id] = job
                        if job.array_limit:
                            self._array_running[job.array_id] += 1
        for job in pending:  # once every unfinished job is known: what each waits for
            job.waiting_on = self._waiting_on(job, {})
            self._index(job)
        self._done_ids.sort()
        for d in self._node_ids:
            self._sync_queue(d)

    def _load_done(self):
        """The finished jobs: their ids from done/, their counts and the ones whose
        files were still being brought back from the index (DoneIndex), or, when it
        does not account for them, from each one's record (and the index anew)."""
        self._done_ids = sorted(name for name in os.listdir(self._root / "done")
                                if JOB_ID_RE.match(name))
        found = self._done_index.load(self._done_ids)
        if found is None:
            if self._done_ids:  # (a new spool has neither: nothing to say)
                log.info("recovery: the index of done/ is missing or stale; it is made "
                         "again from %d finished jobs", len(self._done_ids))
            found = self._done_index.rebuild(map(self._read_final, self._done_ids))
        counts, collecting = found
        for node, by_status in counts.items():
            if node in self._final_counts:
                for status, n in by_status.items():
                    if status in self._final_counts[node]:
                        self._final_counts[node][status] += n
        for job_id in collecting:
            self._note_uncollected(self.done_folder(job_id))

    def _read_final(self, job_id):
        """(id, node, status, still collecting) of a finished job, from its record (node
        -1 and status "unknown" when it cannot be read: it is counted nowhere)."""
        try:
            r = self.done_folder(job_id).read_result()
            return (job_id, int(r["node_id"]), str(r["status"]).split()[0] or "unknown",
                    r.get("outputs", {}).get("state") == "collecting")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            return job_id, -1, "unknown", False

    def _note_uncollected(self, folder):
        """A finished job whose files a stopped server had not brought back yet."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            r = folder.read_result()
            if r.get("outputs", {}).get("state") == "collecting" and \
                    folder.outputs_state(r) == "collecting":
                self._uncollected[r["node_id"]].append((folder.id, r["outputs"]["at"]))

    def _load(self, folder, node_id, status):
        """An unfinished job's folder read back, or None once it was moved on: to
        done/ (its move was cut short), to corrupt/ (not a job) or, if it was claimed
        but never started, back to pending/."""
        if not folder.path.is_dir():
            self.quarantine(folder.path, "not a job folder")
            return None
        if folder.has_result():
            self._move_to_done(folder)
            return None
        try:
            job = folder.load(node_id=node_id, status=status)
        except ValueError as exc:
            self.quarantine(folder.path, str(exc))
            return None
        if job.id in self._active:
            self.quarantine(folder.path, f"a second copy of job {job.id}")
            return None
        job.cancel_requested = folder.cancel_requested()
        if status == "running":
            job.started_at, job.gpu_ids = folder.started()
            if job.started_at is None:
                os.rename(folder.path, self.pending_dir(node_id) / job.id)
                job.status = "pending"
                log.info("job %s was claimed but never started: queued again", job.id)
        return job

    def _move_to_done(self, folder):
        """A job whose move to done/ was cut short: moved now, and counted."""
        dest = self.done_folder(folder.id)
        os.rename(folder.path, dest.path)
        fsync_dir(folder.path.parent)
        _, node, status, collecting = self._read_final(folder.id)
        self._done_index.add(folder.id, node, status, collecting)
        with contextlib.suppress(KeyError):
            self._final_counts[node][status] += 1
        self._note_uncollected(dest)
        self._done_ids.append(folder.id)

    def _index(self, job):
        """Put a pending job into its node's queue, or, while it waits for other jobs,
        beside the jobs it waits for (under the lock)."""
        if job.waiting_on:
            for dep in job.waiting_on:
                self._waiters[dep].add(job.id)
        else:
            self._queues[job.node_id].add(job)
            self._pending_seconds[job.node_id] += job.expected_time * job.gpus
        self._pending_per_user[job.user_id] += 1

    def _unindex(self, job):
        """Take a pending job out of its node's queue (under the lock)."""
        if job.waiting_on:
            for dep in job.waiting_on:
                waiters = self._waiters.get(dep, set())
                waiters.discard(job.id)
                if not waiters:
                    self._waiters.pop(dep, None)
        else:
            self._queues[job.node_id].remove(job)
            self._pending_seconds[job.node_id] -= job.expected_time * job.gpus
        self._pending_per_user[job.user_id] -= 1

    def _activate(self, job):
        """A job is known unfinished (under the lock)."""
        self._active[job.id] = job
        self._needed.update(job.after or ())

    def _deactivate(self, job):
        """A job is finished, or no longer known (under the lock)."""
        if self._active.pop(job.id, None) is not None:
            for dep in job.after or ():
                self._needed[dep] -= 1
                if not self._needed[dep]:
                    del self._needed[dep]

    def _waiting_on(self, job, ended):
        """Which of a pending job's dependencies have not ended (under the lock), and
        adds to ``_doomed`` a job whose ``after`` dependency did not complete: that
        one is counted as waited for too, so that the job waits in no queue, where a
        node could claim it, until cancel_doomed cancels it.  ``ended``: id -> status
        of dependencies read beforehand; one that ended since, or that retention
        removed since, is read now."""
        waiting = set()
        for dep in set(job.after or ()) | set(job.after_any or ()):
            if dep in self._active:
                waiting.add(dep)
                continue
            i = bisect.bisect_left(self._done_ids, dep)
            kept = i < len(self._done_ids) and self._done_ids[i] == dep
            status = (ended.get(dep) if kept else None) or self._ended_status(dep)
            if dep in (job.after or ()) and status != "completed":
                waiting.add(dep)
                if all(doomed != job.id for doomed, _ in self._doomed):
                    self._doomed.append((job.id, f"its dependency {dep} "
                                         + (f"{status}" if status else "no longer exists")))
        return frozenset(waiting)

    def _ended_status(self, job_id):
        try:
            return self.done_folder(job_id).read_result()["status"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _release(self, job, status):
        """A job has ended (under the lock): the jobs waiting for it wait no more for
        it, and those that needed it completed are doomed."""
        for waiter_id in self._waiters.pop(job.id, ()):
            waiter = self._active.get(waiter_id)
            if waiter is None or job.id not in waiter.waiting_on:
                continue
            if status != "completed" and job.id in (waiter.after or ()):
                self._doomed.append((waiter_id, f"its dependency {job.id} {status}"))
                continue
            waiter.waiting_on = waiter.waiting_on - {job.id}
            if not waiter.waiting_on:
                self._queues[waiter.node_id].add(waiter)
                self._pending_seconds[waiter.node_id] += waiter.expected_time * waiter.gpus
                self._on_ready(waiter.node_id)

    def call_when_ready(self, callback):
        """``callback(node id)``, under the lock, when a job of that node stops waiting
        for others: its scheduler is to look (so it must only set an event)."""
        self._on_ready = callback

    def call_on_change(self, callback):
        """``callback(job id, status)``, under the lock, when a job starts running
        ("running") or has finished (None: it is in done/, its results readable): it
        must only take note."""
        self._on_change = callback

    def cancel_doomed(self):
        """Cancel every pending job whose ``after`` dependency failed or was
        cancelled, saying which: never left pending forever (and their own waiters
        in turn)."""
        while True:
            with self._lock:
                if not self._doomed:
                    return
                job_id, why = self._doomed.pop(0)
            try:
                self.request_cancel(job_id, why)
            except Exception:  # (a full disk): the next job's end tries again; the one
                with self._lock:  # whose end this follows is recorded whatever comes
                    self._doomed.insert(0, (job_id, why))
                log.exception("job %s: its cancel (%s) could not be recorded yet", job_id, why)
                return

    def quarantine(self, path, reason):
        """Set aside what cannot be understood, never delete it; the reason goes beside it."""
        dest = self._root / "corrupt" / f"{path.name}.{secrets.token_hex(3)}"
        os.rename(path, dest)
        log.error("quarantined %s: %s", path, reason)
        write_file(dest.with_name(dest.name + ".REASON"), reason + "\n")

    # -- submit --------------------------------------------------------------

    def admit(self, size, min_free):
        """DiskFull unless the disk keeps ``min_free`` bytes after ``size`` more.
        Looked at (one statvfs) at most once a second; in between, what was
        admitted since is counted off the last reading."""
        now = time.monotonic()
        with self._lock:
            when, room = self._disk
            if now - when >= 1.0:
                disk = os.statvfs(self._root)
                when, room = now, disk.f_bavail * disk.f_frsize - min_free
            size += 4 * 4096  # the job's folder and its small files take blocks too
            if room < size:
                self._disk = (when, room)
                raise DiskFull("the server's spool disk is nearly full; try again later")
            self._disk = (when, room - size)

    def stage(self, job, code, config_data):
        """Write a new job's folder under tmp/, durably, before it is queued;
        DiskFull (and nothing left behind) when the disk has no room for it."""
        path = self._root / "tmp" / job.id
        try:
            return JobFolder.create(path, job, code, config_data)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise disk_full(exc, "the server's spool disk is full (try again later)") from None

    def enqueue(self, job, staged, online, max_pending, able=None, ended=None):
        """Queue a staged job on the least-loaded node (of ``able``, those that can run
        it, when given); returns queue_position's pair.  A job with dependencies waits
        beside them (``ended``: the statuses of those already over, read before).

        Raises TooMany (and removes the staged folder) when the job's user already
        has ``max_pending`` pending jobs.
        """
        with self._lock:
            waiting = self._pending_per_user[job.user_id]
            if waiting < max_pending:
                self._place(job, staged.path, self._loads(), online, able, ended)
                position = self._position(job)
        if waiting >= max_pending:
            shutil.rmtree(staged.path)
            raise TooMany(f"{job.user_id} already has {waiting} pending jobs, the most "
                          "allowed; submit more once some have started")
        # The rename is in the journal once this folder is synced; tmp/ needs no sync
        # of its own: after a crash the job is in one place or the other, never both.
        self._sync_queue(job.node_id)
        return position

    def _place(self, job, path, loads, online, able, ended):
        """Move a staged job's folder into the queue of the least-loaded node that can
        take it, and index it (under the lock)."""
        big = [n for n in self._node_ids if self._gpu_count[n] >= job.gpus
               and (able is None or n in able)] or list(able or self._node_ids)
        open_ = [n for n in big if n not in self._drained]
        # Offline nodes only when none is online; drained ones only when all are.
        candidates = [n for n in open_ if n in online] or open_ or big
        job.node_id = min(candidates, key=lambda n: (loads[n], n))
        os.rename(path, self.pending_dir(job.node_id) / job.id)
        self._activate(job)
        if job.array_id:
            self._array_open[job.array_id] += 1
        job.waiting_on = self._waiting_on(job, ended or {})
        self._index(job)
        loads[job.node_id] += job.expected_time * job.gpus / self._gpu_count[job.node_id]

    # -- arrays ----------------------------------------------------------------

    def stage_array(self, array_id, jobs, code, config_data):
        """Write an array's job folders under tmp/<array id>/, durably, the code
        stored once (each folder holds a hard link to it); DiskFull, with nothing
        left behind, when the disk has no room."""
        base = self._root / "tmp" / array_id
        try:
            os.mkdir(base)
            write_file(base / JobFolder.CODE, code)
            for job in jobs:
                JobFolder.create(base / job.id, job, code, config_data,
                                 code_from=base / JobFolder.CODE)
            fsync_dir(base)
        except OSError as exc:
            shutil.rmtree(base, ignore_errors=True)
            raise disk_full(exc, "the server's spool disk is full (try again later)") from None
        return base

    def enqueue_array(self, array_id, jobs, base, online, max_pending, able, ended):
        """Queue every job of a staged array, or none.  The array's record in arrays/
        is the commit point: written (durably) once its jobs are staged and fit the
        user's pending cap; from then on recovery queues whatever of it is still in
        tmp/, and before it, removes it all.  TooMany when the array does not fit."""
        user = jobs[0].user_id
        with self._lock:
            waiting = self._pending_per_user[user]
            fits = waiting + len(jobs) <= max_pending
            if fits:  # held while it is queued: its room under the cap, and the array
                self._pending_per_user[user] += len(jobs)  # open (its notice not due)
                self._array_open[array_id] += 1
        if not fits:
            shutil.rmtree(base)
            raise TooMany(f"{user} has {waiting} pending jobs; {len(jobs)} more would pass "
                          f"the most allowed ({max_pending}): the array is refused whole")
        try:
            if jobs[0].notify:  # due once every job of it has ended (notices_due)
                (self._root / "outbox").mkdir(exist_ok=True)
                write_json(self._root / "outbox" / f"{array_id}.json", {
                    "url": jobs[0].notify, "array_id": array_id, "body": None, "tries": 0,
                    "next": 0, "since": None, "error": None})
            self.commit_array(array_id, jobs)
            with self._lock:
                loads = self._loads()
                for job in jobs:
                    self._place(job, base / job.id, loads, online, able, ended)
        finally:
            with self._lock:
                self._pending_per_user[user] -= len(jobs)
                self._array_open[array_id] -= 1
                if not self._array_open[array_id]:
                    del self._array_open[array_id]
                    self._notices.set()  # (every job of it ended already)
        for n in {job.node_id for job in jobs}:
            self._sync_queue(n)
        shutil.rmtree(base)  # its code stays, linked from each job's folder

    def commit_array(self, array_id, jobs):
        """Write an array's record: from here on, all its staged jobs are queued."""
        (self._root / "arrays").mkdir(exist_ok=True)
        write_json(self._root / "arrays" / f"{array_id}.json", {
            "array_id": array_id, "user_id": jobs[0].user_id, "job_ids": [j.id for j in jobs],
            "limit": jobs[0].array_limit, "submitted_at": jobs[0].submitted_at})

    def array(self, array_id):
        """An array's record (its user and job ids), or None."""
        try:
            return read_json(self._root / "arrays" / f"{array_id}.json")
        except (OSError, ValueError):
            return None

    def _roll_forward(self):
        """At recovery: queue the jobs of arrays committed before a crash that are
        still in tmp/ (they go to the nodes in turn; idle nodes even it out)."""
        for base in (self._root / "tmp").iterdir():
            if not (JOB_ID_RE.match(base.name) and self.array(base.name) is not None):
                continue
            for i, folder in enumerate(sorted(p for p in base.iterdir() if p.is_dir())):
                node = self._node_ids[i % len(self._node_ids)]
                os.rename(folder, self.pending_dir(node) / folder.name)
                log.info("recovery: job %s of array %s queued", folder.name, base.name)
            for n in self._node_ids:
                self._sync_queue(n)

    def _may_start(self, job):
        """May this pending job start now, as far as its array's limit says?"""
        return not job.array_limit or self._array_running[job.array_id] < job.array_limit

    def _array_left(self, job):
        """A running job of a limited array stopped running (under the lock)."""
        if job.array_limit and job.status == "running":
            self._array_running[job.array_id] -= 1

    def _sync_queue(self, node_id):
        """Make renames into and out of a node's pending/ survive a power cut."""
        os.fsync(self._queue_fds[node_id])

    def _loads(self, node_id=None):
        """Per node (or for one): expected GPU-seconds of its pending jobs plus what
        remains of its running ones, per GPU of the node (under the lock)."""
        if node_id is not None:
            return self._pending_seconds[node_id] / self._gpu_count[node_id] \
                + self._running_load(node_id)
        return {n: self._loads(n) for n in self._node_ids}

    def _running_load(self, node_id):
        """What remains of a node's running jobs, in expected GPU-seconds per GPU."""
        now = time.time()
        return sum(max(0.0, job.expected_time - (now - (job.started_at or now))) * job.gpus
                   for job in self._running[node_id].values()) / self._gpu_count[node_id]

    # -- scheduler side ------------------------------------------------------

    def claim(self, node_id, choose=None, prepared=False):
        """Move the job that ``choose`` picks to this node's running/, and return it
        (None when it picks none, or the node is drained).

        ``choose(candidates, states)`` gets the candidates, (job, its queue's node)
        pairs, lazily in the order they are to run: this node's own queue and every
        other node's, by their turns (see FairQueue); and ``states``, every node's
        NodeState by id.  It returns ((job, node, gpus) or None, the Holding this
        node is to keep or None); it is the scheduler's rule for which may start
        here now (GpuWorker.choose).  It runs under the lock, so what it sees
        cannot change meanwhile.  Without one, the rule of an idle node of one GPU:
        the first job in turn of its own queue or of a node that is busy or drained.
        A ``prepared`` job is claimed to start once the job it follows has ended
        (GpuWorker._prepare): it shows as pending until ``launched``."""
        if choose is None:
            def choose(candidates, states):
                return next(((job, n, ()) for job, n in candidates if n == node_id
                             or states[n].running or states[n].drained), None), None
        with self._lock:
            if node_id in self._drained:
                self._holding[node_id] = None  # a drained node holds no GPUs for anyone
                return None
            orders = [q.order(n) for n, q in self._queues.items() if len(q)]
            states = _States(self._state)
            picked, self._holding[node_id] = choose(
                ((self._active[job_id], n) for _, job_id, n in heapq.merge(*orders)
                 if self._may_start(self._active[job_id])), states)
            if picked is None:
                return None
            job, donor, gpus = picked
            os.rename(self.pending_dir(donor) / job.id, self.running_dir(node_id) / job.id)
            self._unindex(job)
            job.node_id, job.status, job.started_at = node_id, "running", time.time()
            job.gpu_ids, job.prepared, job.followed = tuple(gpus), prepared, False
            self._running[node_id][job.id] = job
            key = (job.priority, job.user_id)
            turn, ticket = (-job.priority, self._served.get(key, 0), job.id), next(self._tickets)
            self._served[key] = ticket
            if prepared:  # the turn it was chosen in, and the ticket its claim took
                self._turns[job.id] = (turn, ticket)
            if job.array_limit:
                self._array_running[job.array_id] += 1
            if not prepared:
                self._on_change(job.id, "running")
        fsync_dir(self.running_dir(node_id))
        self._sync_queue(donor)
        if donor != node_id:
            log.info("job %s planned for node %s taken by idle node %s", job.id, donor, node_id)
        return job

    def _state(self, node_id):
        """A node's NodeState (under the lock)."""
        return NodeState(running=tuple(self._running[node_id].values()),
                         drained=node_id in self._drained, holding=self._holding[node_id],
                         foreign=self._foreign[node_id], reading=self._reading[node_id],
                         reading_error=self._reading_error[node_id])

    def node_state(self, node_id):
        """A node's NodeState now, its running jobs copies: for any thread."""
        with self._lock:
            state = self._state(node_id)
            return dataclasses.replace(state, running=tuple(map(copy.copy, state.running)))

    def node_states(self):
        """Every node's NodeState now (node_state's), taken at one moment."""
        with self._lock:
            return {n: dataclasses.replace(state, running=tuple(map(copy.copy, state.running)))
                    for n in self._node_ids for state in (self._state(n),)}

    def set_gpu_count(self, node_id, count):
        """A node's GPUs were found to be ``count`` (an SSH node's nvidia-smi)."""
        with self._lock:
            self._gpu_count[node_id] = count

    def set_gpus(self, node_id, reading, foreign, error=None):
        """Record a node's GPU reading and, from it, which of its GPUs are used
        outside the queue (GPU -> why), or ``error``, why there is no reading (then
        nothing is known to be used outside it); returns the GPUs recorded so before."""
        with self._lock:
            before, self._foreign[node_id] = self._foreign[node_id], dict(foreign)
            self._reading[node_id] = tuple(reading)
            self._reading_error[node_id] = error
        return before

    def running_on(self, node_id):
        """A node's running jobs, for its own worker: the Spool's Jobs themselves,
        to hand back to its methods (other threads: node_state)."""
        with self._lock:
            return list(self._running[node_id].values())

    def launched(self, job, after):
        """A prepared job has started on its node (now), on the GPUs of the job
        ``after`` (an id), which has therefore ended."""
        with self._lock:
            job.prepared, job.started_at = False, time.time()
            self._turns.pop(job.id, None)
            if (followed := self._running[job.node_id].get(after)) is not None:
                followed.followed = True
            self._on_change(job.id, "running")

    def note_slurm(self, job, **fields):
        """Record what Slurm says of a job (its id, state, reason, exit code), as a
        new dict: a reader's copy of the job keeps the one it had."""
        with self._lock:
            job.slurm = {**(job.slurm or {}), **fields}

    def forget(self, job):
        """Drop a running job that cannot be recorded at all from the index, so that
        it does not hold its node forever (its folder stays for an admin)."""
        with self._lock:
            if self._running[job.node_id].pop(job.id, None) is not None:
                self._array_left(job)
            self._deactivate(job)
            self._turns.pop(job.id, None)
            self._changed.notify_all()

    def finish(self, job, outcome):
        """Record a running job's Outcome in its folder, then move the folder to done/.

        A folder that vanished (a job can reach its own) is made again from what is
        known in memory, and the job fails saying so; DiskFull when the disk has no
        room for the record (the job stays as it was: try again later)."""
        folder = self.folder(job)
        try:
            if not folder.path.is_dir():
                outcome = dataclasses.replace(
                    outcome, status="failed",
                    error="its folder in the spool was removed while it ran")
                shutil.rmtree(self._root / "tmp" / job.id, ignore_errors=True)
                staged = JobFolder.create(self._root / "tmp" / job.id, job, b"", b"")
                os.rename(staged.path, folder.path)
            finished_at = self._write_result(job, folder, outcome)
        except OSError as exc:
            raise disk_full(exc, "no room on the spool's disk") from None
        with self._lock:
            del self._running[job.node_id][job.id]
            self._retire(job, folder, outcome, finished_at)
        self._synced_final(job, folder, outcome)
        self.cancel_doomed()

    def _write_result(self, job, folder, outcome):
        """Write how the job ended into its folder; when it did (the job itself
        learns it as it retires).  A notice asked for is in the outbox first: after
        a crash it goes at least once, never not at all."""
        finished_at = time.time()
        if job.notify and not job.array_id:  # an array's jobs: one notice for it all
            self._post_notice(job, outcome, finished_at)
        result = {"status": outcome.status, "exit_code": outcome.exit_code,
                  "error": outcome.error, "node_id": job.node_id,
                  "started_at": job.started_at, "finished_at": finished_at,
                  "gpus": list(job.gpu_ids)}
        if job.slurm:
            result["slurm"] = {k: job.slurm[k] for k in ("id", "state", "reason")}
        result["outputs"] = ({"state": "collecting", "at": outcome.outputs_at}
                             if outcome.outputs_at else {"state": outcome.outputs})
        folder.write_result(result, outcome)
        return finished_at

    def _retire(self, job, folder, outcome, finished_at):
        """The one move to done/ (under the lock)."""
        os.rename(folder.path, self.done_folder(job.id).path)
        self._array_left(job)
        if job.array_id:
            self._array_open[job.array_id] -= 1
            if not self._array_open[job.array_id]:
                del self._array_open[job.array_id]
                self._notices.set()  # its notice, if it asked for one, is due
        self._deactivate(job)
        self._turns.pop(job.id, None)
        job.status, job.exit_code, job.error = outcome.status, outcome.exit_code, outcome.error
        job.finished_at = finished_at
        job.outputs = "collecting" if outcome.outputs_at else outcome.outputs
        self._final_counts[job.node_id][outcome.status] += 1
        self._finished_here[job.node_id][outcome.status] += 1
        bisect.insort(self._done_ids, job.id)
        self._done_index.add(job.id, job.node_id, outcome.status, bool(outcome.outputs_at))
        self._release(job, outcome.status)
        self._changed.notify_all()
        self._on_change(job.id, None)

    def _synced_final(self, job, folder, outcome):
        """After the move to done/: make it durable, and log it."""
        fsync_dir(folder.path.parent)
        self.done_folder(job.id).discard_old_work()
        log.info("job %s user=%s node=%s %s%s", job.id, job.user_id, job.node_id,
                 outcome.status, f" ({outcome.error})" if outcome.error else "")

    def expire(self, before):
        """Remove finished jobs that finished before ``before`` (a Unix time), and
        what was quarantined before it; returns how many of each.  Only a job
        submitted before then can have finished before then, and ids begin with
        the submit time, so the candidates are the head of the done ids.  One that an
        unfinished job names in ``after`` stays: a restart reads its status again, and
        one gone would cancel that job (_waiting_on)."""
        with self._lock:
            head = self._done_ids[:bisect.bisect_left(self._done_ids,
                                                      f"{int(before * 1e6):014x}")]
        jobs = 0
        for job_id in head:
            folder = self.done_folder(job_id)
            _, node, status, _ = self._read_final(job_id)
            try:
                finished = float(folder.read_result()["finished_at"])
            except (OSError, ValueError, KeyError, TypeError):
                finished = folder.path.stat().st_mtime
            if finished >= before:
                continue
            with self._lock:
                if self._kept[job_id] or self._needed[job_id]:
                    continue  # being read, or needed: at a later sweep
                del self._done_ids[bisect.bisect_left(self._done_ids, job_id)]
                counted = self._final_counts.get(node)
                if counted is not None and counted.get(status, 0) > 0:
                    counted[status] -= 1
                self._done_index.removed(job_id, node, status)
                gone = self._root / "tmp" / f"{job_id}.expired"
                os.rename(folder.path, gone)  # one step out of sight; tmp/ is cleared at start
            shutil.rmtree(gone, ignore_errors=True)
            jobs += 1
        quarantined = 0
        corrupt = self._root / "corrupt"
        for name in os.listdir(corrupt):
            if name.endswith(".REASON"):
                continue
            reason = corrupt / f"{name}.REASON"
            with contextlib.suppress(FileNotFoundError):
                when = (reason if reason.exists() else corrupt / name).lstat().st_mtime
                if when < before:
                    path = corrupt / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    reason.unlink(missing_ok=True)
                    quarantined += 1
        return jobs, quarantined

    # -- front-door side -----------------------------------------------------

    @contextlib.contextmanager
    def kept(self, job_id):
        """Keep a finished job from retention while it is read."""
        with self._lock:
            self._kept[job_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._kept[job_id] -= 1
                if not self._kept[job_id]:
                    del self._kept[job_id]

    def get(self, job_id):
        """A copy of the job with this (already validated) id as it is now, or None."""
        with self._lock:
            job = self._active.get(job_id)
            if job is not None:
                return copy.copy(job)
        folder = self.done_folder(job_id)
        try:
            job = folder.load(node_id=-1)  # node and status come from result.json
        except ValueError:
            return None
        try:
            r = folder.read_result()
            job.node_id, job.status, job.exit_code, job.error = (
                r["node_id"], r["status"], r["exit_code"], r["error"])
            job.started_at, job.finished_at, job.slurm = (
                r["started_at"], r["finished_at"], r.get("slurm"))
            job.outputs = folder.outputs_state(r)
            if job.notify:
                job.notice = self._notice_state(job.array_id or job_id)
            job.gpu_ids = tuple(map(str, r.get("gpus") or ()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return job

    # -- retry-safe submits ----------------------------------------------------

    def _key_path(self, user, key):
        digest = hashlib.sha256(f"{user}\0{key}".encode()).hexdigest()
        return self._root / "keys" / f"{digest}.json"

    def key_record(self, user, key):
        """What a submit with this user's Idempotency-Key left (KEY_TTL seconds at
        most), or None."""
        try:
            record = read_json(self._key_path(user, key))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("at", 0) < time.time() - KEY_TTL:
            return None
        return record

    def remember_key(self, user, key, record):
        """Keep a submit's Idempotency-Key record, durably: written before the job is
        queued (its id chosen), and again with the answer once it is."""
        (self._root / "keys").mkdir(exist_ok=True)
        write_json(self._key_path(user, key), record)

    def expire_keys(self):
        """Remove Idempotency-Key records past KEY_TTL; how many."""
        gone = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._root / "keys"):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < time.time() - KEY_TTL:
                        os.unlink(entry.path)
                        gone += 1
        return gone

    # -- notices (notify) --------------------------------------------------------

    def _post_notice(self, job, outcome, finished_at):
        body = {"job_id": job.id, "user_id": job.user_id, "status": outcome.status,
                "exit_code": outcome.exit_code, "error": outcome.error,
                "node_id": job.node_id, "attempt": job.attempt,
                "submitted_at": isotime(job.submitted_at),
                "started_at": isotime(job.started_at), "finished_at": isotime(finished_at)}
        (self._root / "outbox").mkdir(exist_ok=True)
        write_json(self._root / "outbox" / f"{job.id}.json",
                   {"url": job.notify, "body": body, "tries": 0, "next": 0,
                    "since": finished_at, "error": None})
        self._notices.set()

    def wait_for_notices(self, timeout):
        """Sleep until a notice is put in the outbox (or a sender is done), or
        ``timeout`` seconds."""
        self._notices.wait(timeout)
        self._notices.clear()

    def notices_changed(self):
        """A sender is done: what its host has due next may go."""
        self._notices.set()

    def notices_due(self):
        """The outbox's notices whose time has come: (job id, entry) pairs; and
        the seconds until the next one is due (None: no other waits)."""
        due, nearest, now = [], None, time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._root / "outbox"):
                if not (entry.name.endswith(".json") and JOB_ID_RE.match(entry.name[:-5])):
                    continue
                try:
                    notice = read_json(entry.path)
                    if notice.get("body") is None:  # an array's, once it has all ended
                        notice = self._array_notice(entry.name[:-5], notice)
                        if notice is None:
                            continue
                    when = float(notice["next"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if when <= now:
                    due.append((entry.name[:-5], notice))
                else:
                    nearest = min(nearest or math.inf, when - now)
        return due, nearest

    def _array_notice(self, array_id, notice):
        """An array's notice, once every job of it has ended: its body (each state's
        count), kept in the outbox; None while some run or wait."""
        with self._lock:
            if self._array_open.get(array_id):
                return None
        record = self.array(array_id)
        if record is None:  # a crash before the array's commit: it never was
            (self._root / "outbox" / f"{array_id}.json").unlink(missing_ok=True)
            return None
        counts = dict.fromkeys(FINAL_STATES, 0)
        for job_id in record["job_ids"]:
            job = self.get(job_id)
            if job is not None and job.status in counts:
                counts[job.status] += 1
        notice = {**notice, "since": time.time(), "body": {
            "array_id": array_id, "user_id": record["user_id"], "status": "ended",
            "size": len(record["job_ids"]), "counts": counts, "job_ids": record["job_ids"]}}
        write_json(self._root / "outbox" / f"{array_id}.json", notice)
        return notice

    def notice_tried(self, job_id, notice, error):
        """A try that failed: the notice waits (backoff) or, after NOTICE_GIVE_UP,
        is given up, which the job's status says."""
        path = self._root / "outbox" / f"{job_id}.json"
        tries = notice["tries"] + 1
        if time.time() - notice["since"] > NOTICE_GIVE_UP:
            self._notice_done(job_id, {"state": "given up", "tries": tries, "error": error})
            return
        write_json(path, {**notice, "tries": tries, "error": error,
                          "next": time.time() + min(NOTICE_BACKOFF * 2 ** (tries - 1),
                                                    NOTICE_MAX_WAIT)})

    def notice_delivered(self, job_id, notice):
        self._notice_done(job_id, {"state": "delivered", "tries": notice["tries"] + 1,
                                   "error": None})

    def _notice_done(self, job_id, record):
        """Where a notice ended: beside the job's record, or an array's."""
        path = self.done_folder(job_id).path / JobFolder.NOTICE
        if self.array(job_id) is not None:
            path = self._root / "arrays" / f"{job_id}.notice.json"
        with contextlib.suppress(FileNotFoundError):  # retention took the job meanwhile
            write_json(path, {**record, "at": time.time()})
        (self._root / "outbox" / f"{job_id}.json").unlink(missing_ok=True)

    def _notice_state(self, job_id):
        """Where a finished job's notice stands, for its status."""
        try:
            n = read_json(self._root / "outbox" / f"{job_id}.json")
            return ("pending" if not n["tries"] else
                    f"pending: {n['tries']} tries failed, the last with: {n['error']}")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            n = read_json(self.done_folder(job_id).path / JobFolder.NOTICE
                          if self.array(job_id) is None
                          else self._root / "arrays" / f"{job_id}.notice.json")
            return n["state"] + (f" after {n['tries']} tries: {n['error']}"
                                 if n["state"] != "delivered" else "")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def uncollected(self, node_id):
        """The node's finished jobs whose files are still to be brought back, found
        at recovery: (id, where on the node) pairs, handed out once."""
        with self._lock:
            return self._uncollected.pop(node_id, [])

    def store_outputs(self, job_id, fetch):
        """Bring a finished job's files into its folder (JobFolder.store_outputs);
        FileNotFoundError when the job is gone (retention removed it meanwhile)."""
        folder = self.done_folder(job_id)
        if not folder.has_result():
            raise FileNotFoundError(errno.ENOENT, "no such finished job", job_id)
        folder.store_outputs(fetch)
        with self._lock:
            self._done_index.collected(job_id)

    def outputs(self, job_id):
        """(a finished job's listing, or None while its files are not whole; its
        JobFolder, to find each file)."""
        folder = self.done_folder(job_id)
        return folder.listing(), folder

    def is_active(self, job_id):
        """Is the job still unfinished?"""
        with self._lock:
            return job_id in self._active

    def pending_ids(self, node_id):
        """A node's pending job ids, oldest first."""
        with self._lock:
            return self._queues[node_id].ids()

    def queue_position(self, job):
        """(jobs ahead of it: those prepared on its node, then those before it in its
        node's queue; estimated start time), or (None, None) when the job is not
        pending (a prepared one included: Scheduler.shown gives it 0).  The estimate
        adds the expected times of the running jobs' rest and of those ahead; work
        taken by idle nodes can only make it earlier."""
        with self._lock:
            live = self._active.get(job.id)
            return self._position(live) if live is not None else (None, None)

    def _position(self, job):
        """Jobs prepared on the node come first: they are claimed already, to start
        as the jobs they follow end (their time is in the running load, roughly)."""
        if job.status != "pending":
            return None, None
        ahead = self._queues[job.node_id].ahead(job)
        if ahead is None:
            return None, None
        n = job.node_id
        prepared = sum(1 for j in self._running[n].values() if j.prepared)
        return (ahead[0] + prepared,
                time.time() + self._running_load(n) + ahead[1] / self._gpu_count[n])

    def request_cancel(self, job_id, why=None):
        """Cancel a pending job now (``why``: not by a user, but because...), or mark a
        running one for its scheduler to kill;
        either is on disk before it shows.  Returns False when the job had already
        finished.  A pending job leaves its queue under the lock, so that no
        scheduler claims it; its record is written after, and its move to done/ is
        under the lock again."""
        while True:
            with self._lock:
                job = self._active.get(job_id)
                if job is None:
                    return False
                if job.cancel_requested:
                    return True  # asked for already
                folder = self.folder(job)
                running = job.status == "running"
                if not running:
                    self._unindex(job)  # pending still, but in no queue: claimed by no one
                    job.cancel_requested = True
            if not running:
                break
            try:
                folder.mark_cancel()
            except FileNotFoundError:
                continue  # it ended, or went back to its queue, meanwhile: look again
            except OSError as exc:
                raise disk_full(exc, "no room on the spool's disk for the cancel") from None
            with self._lock:
                job.cancel_requested = True
            return True
        outcome = Outcome("cancelled", error=f"cancelled while pending: {why}" if why
                          else "cancelled while pending")
        try:
            finished_at = self._write_result(job, folder, outcome)
        except BaseException as exc:
            with self._lock:
                job.cancel_requested = False
                if job.waiting_on:  # what it waited for may have ended meanwhile
                    job.waiting_on = self._waiting_on(job, {})
                self._index(job)
                if not job.waiting_on:
                    self._on_ready(job.node_id)
            raise disk_full(exc, "no room on the spool's disk for the cancel") from None
        with self._lock:
            self._retire(job, folder, outcome, finished_at)
        self._synced_final(job, folder, outcome)
        self.cancel_doomed()
        return True

    def wait_finished(self, job_id, timeout):
        with self._changed:
            return self._changed.wait_for(lambda: job_id not in self._active, timeout)

    def ahead_in_turn(self, job_id, fits):
        """Has a pending job come ahead in turn of the prepared job ``job_id`` (another
        user's, or of a higher priority, since it was chosen), one that ``fits(job,
        its queue's node, every node's NodeState)`` (called under the lock: it must
        not take it)?"""
        with self._lock:
            turn = self._turns.get(job_id)
            if turn is None:
                return False
            orders = [q.order(n) for n, q in self._queues.items() if len(q)]
            states = _States(self._state)
            for seen, (t, other, n) in enumerate(heapq.merge(*orders)):
                if seen == CLAIM_DEPTH or t >= turn[0]:
                    return False
                job = self._active[other]
                if self._may_start(job) and fits(job, n, states):
                    return True
        return False

    def statuses(self, job_ids):
        """Each job's status as shown (None: finished or gone), under one lock."""
        with self._lock:
            return {i: self._active[i].shown_status if i in self._active else None
                    for i in job_ids}

    def job_ids(self, before=None):
        """Job ids newest first, only those older than ``before`` when it is given.
        Finished ones are taken a few hundred at a time, as they are read, so that a
        page costs what it shows, not the size of done/; a job that finished
        meanwhile, seen among both, is given once."""
        with self._lock:
            active = sorted(self._active)
        if before:
            active = active[:bisect.bisect_left(active, before)]
        last = None
        for job_id in heapq.merge(reversed(active), self._done_newest_first(before),
                                  reverse=True):
            if job_id != last:
                yield job_id
            last = job_id

    def _done_newest_first(self, before):
        while True:
            with self._lock:
                end = bisect.bisect_left(self._done_ids, before) if before \
                    else len(self._done_ids)
                chunk = self._done_ids[max(0, end - 256):end]
            if not chunk:
                return
            yield from reversed(chunk)
            before = chunk[0]

    def find(self, user=None, status=None, limit=100, before=None, among=None):
        """Up to ``limit`` jobs (copies), newest first, of ``user`` and in ``status``
        when given, older than the id ``before``, of the ids ``among`` (an array's);
        and the cursor for the next page (None on the last)."""
        found = []
        ids = self.job_ids(before=before) if among is None else \
            sorted((i for i in among if before is None or i < before), reverse=True)
        for job_id in ids:
            job = self.get(job_id)
            if job is None or (user and job.user_id != user) or (status and job.shown_status != status):
                continue
            if len(found) == limit:
                return found, found[-1].id
            found.append(job)
        return found, None

    def counts(self):
        """(pending, running) jobs over all nodes."""
        with self._lock:
            return (sum(len(q) for q in self._queues.values()),
                    sum(len(r) for r in self._running.values()))

    def node_stats(self):
        with self._lock:
            loads = self._loads()
            return {n: {"queued_jobs": len(self._queues[n]), "queued_seconds": round(loads[n], 3),
                        **self._final_counts[n]} for n in self._node_ids}

    def finished_here(self):
        """Jobs finished since this server started: node -> status -> count."""
        with self._lock:
            return {n: dict(c) for n, c in self._finished_here.items()}

    def move_pending(self, node_id, online):
        """Move a node's pending jobs to the least-loaded of ``online`` nodes that
        are not drained, oldest first.  Returns the nodes that received jobs.
        ``online`` maps each node to whether it can run a job (its environment).
        """
        moved = set()
        with self._lock:
            takes = online
            online = [n for n in online if n not in self._drained and n != node_id]
            if not online or not self._queues[node_id]:
                return set()
            loads = self._loads()
            for job_id in self._queues[node_id].ids():
                job = self._active[job_id]
                fits = [n for n in online if self._gpu_count[n] >= job.gpus and takes[n](job)]
                if not fits:
                    continue  # no online node is big enough: it waits here
                dest = min(fits, key=lambda n: (loads[n], n))
                os.rename(self.pending_dir(node_id) / job_id, self.pending_dir(dest) / job_id)
                self._unindex(job)
                job.node_id = dest
                self._index(job)
                loads[dest] += job.expected_time * job.gpus / self._gpu_count[dest]
                moved.add(dest)
        for n in moved | {node_id}:
            self._sync_queue(n)
        log.info("node %s: pending jobs moved to nodes %s", node_id, sorted(moved))
        return moved

    def close_to_others(self):
        """Make the spool the server's alone, but for a way through to the local nodes'
        workdirs inside it (for ``run_as``): no other user may list or open anything
        else here.  Each job's own folder there is its user's."""
        for d in [self._root, self._root / "nodes"] + [self._root / "nodes" / str(n)
                                                       for n in self._node_ids]:
            os.chmod(d, 0o711)
        for n in self._node_ids:
            self.work_dir(n).mkdir(exist_ok=True)
            os.chmod(self.work_dir(n), 0o711)
            for d in (self.pending_dir(n), self.running_dir(n)):
                os.chmod(d, 0o700)
        for name in ("tmp", "done", "corrupt", "incoming", "control"):
            mode = (self._root / name).stat().st_mode
            if name == "incoming" and mode & 0o070:
                continue  # an admin shared it with a team's group on purpose (README)
            os.chmod(self._root / name, 0o700)

    def _drained_marker(self, node_id):
        return self._root / "nodes" / str(node_id) / "drained"

    def is_drained(self, node_id):
        with self._lock:
            return node_id in self._drained

    def set_drained(self, node_id, drained):
        """Drain a node (it starts no more jobs) or resume it; on disk first."""
        marker = self._drained_marker(node_id)
        if drained:
            write_file(marker, b"")
        else:
            marker.unlink(missing_ok=True)
            fsync_dir(marker.parent)
        with self._lock:
            (self._drained.add if drained else self._drained.discard)(node_id)
            if drained:
                self._holding[node_id] = None

    def retry(self, job, outcome):
        """Queue a failed job again for its next attempt, its output kept aside; its
        node's queue takes it back at its place (an idle node may take it from there,
        and an offline node hands it on)."""
        folder = self.folder(job)
        try:
            folder.keep_attempt(job.attempt, outcome)
        except OSError as exc:
            raise disk_full(exc, "no room on the spool's disk") from None
        with self._lock:
            os.rename(folder.path, self.pending_dir(job.node_id) / job.id)
            del self._running[job.node_id][job.id]
            self._array_left(job)
            job.status, job.started_at, job.gpu_ids = "pending", None, ()
            # (A cancel that came since the attempt ended stays: its mark moved with the
            # folder, and the next claim records it.)
            job.attempt, job.slurm = job.attempt + 1, None
            job.prepared = job.followed = False
            self._index(job)
            self._changed.notify_all()
        self._sync_queue(job.node_id)
        fsync_dir(self.running_dir(job.node_id))
        log.info("job %s user=%s node=%s failed (%s): attempt %d of %d queued", job.id,
                 job.user_id, job.node_id, outcome.error, job.attempt, job.retries + 1)

    def requeue(self, job):
        """Put a claimed job that never launched back at its place in its node's queue."""
        folder = self.folder(job)
        folder.reset()
        with self._lock:
            os.rename(folder.path, self.pending_dir(job.node_id) / job.id)
            del self._running[job.node_id][job.id]
            self._array_left(job)
            job.status, job.started_at, job.gpu_ids = "pending", None, ()
            job.prepared = job.followed = False
            turn = self._turns.pop(job.id, None)
            key = (job.priority, job.user_id)
            if turn is not None and self._served.get(key) == turn[1]:
                self._served[key] = turn[0][1]  # it never ran: its user's turn is back
            self._index(job)
        self._sync_queue(job.node_id)
        fsync_dir(self.running_dir(job.node_id))


class _States(dict):
    """Every node's NodeState (inside claim), or its room (Worker._rooms), each
    made when first asked for."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, node_id):
        state = self[node_id] = self._make(node_id)
        return state


###############################################################################
# Tokens ######################################################################
###############################################################################

#: User names: what may stand in ``user_id`` and in a token record.
USER_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

#: A token chosen by an admin must be at least this long (the original server's
#: example token is 15), and gets a warning below SHORT_TOKEN; generated ones are 43.
MIN_TOKEN_LENGTH = 8
SHORT_TOKEN = 16
#: Seconds between looks at the token file for changes.
TOKENS_RECHECK = 1.0


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
        self._looked = -math.inf
        self._records = []
        self.unreadable = None  # why the file could not be read, while it cannot

    def _read(self):
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except FileNotFoundError:
            return []
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"{self.path} is not readable YAML: {exc}") from None
        records = data.get("tokens", []) if isinstance(data, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ConfigError(f"{self.path} is not a gpuqueue token file")
        return records

    def records(self, fresh=True):
        """The current records.  Unless ``fresh``, the file is looked at (one stat)
        at most once a second, not on every request: revocations are seen within a
        second, and a token not found is looked for again at once."""
        now = time.monotonic()
        with self._lock:
            if not fresh and now - self._looked < TOKENS_RECHECK:
                return self._records
            self._looked = now
            try:
                st = os.stat(self.path)
                seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                seen = None
            if seen != self._seen:
                try:
                    self._records = self._read()
                except (OSError, ConfigError) as exc:
                    log.error("token file unreadable, refusing every token: %s", exc)
                    self._records, self.unreadable = [], str(exc)
                else:
                    self.unreadable = None
                self._seen = seen
            return self._records

    def authenticate(self, token):
        """The record of a valid token; Unauthorized otherwise."""
        if not token:
            raise Unauthorized("missing token: send the header 'Authorization: Bearer <token>' "
                               "(curl: -H 'Authorization: Bearer <token>') with the token an "
                               "admin gave you")
        digest = token_hash(token)
        match = self._find(digest, self.records(fresh=False)) or self._find(digest, self.records())
        if match is None and self.unreadable:
            raise Unavailable("the server cannot read its token file now; try again later")
        if match is None:
            raise Unauthorized("invalid token", guess=True)
        if match.get("revoked"):
            raise Unauthorized("token revoked")
        if _expiry(match.get("expires")) <= utcnow():
            raise Unauthorized("token expired")
        return match

    @staticmethod
    def _find(digest, records):
        match = None
        for rec in records:  # every record compared, in constant time each
            if hmac.compare_digest(str(rec.get("sha256", "")), digest):
                match = rec
        return match

    # -- admin side (CLI) ----------------------------------------------------

    def _change(self, edit):
        """Read, edit and rewrite the file under a lock, so two admins lose nothing;
        only as its own user (only_owner)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            only_owner(self.path, "the token file")
        with private_lock(str(self.path) + ".lock"):
            records = self._read()
            result = edit(records)
            write_file(self.path, yaml.safe_dump({"tokens": records}, sort_keys=False), mode=0o600)
        return result

    def create(self, user, token, days, admin):
        if not USER_RE.match(user):
            raise BadRequest("user must be 1-64 letters, digits or . _ @ - characters")
        if token is None:
            token = secrets.token_urlsafe(32).lstrip("-")  # a leading '-' reads as an option
        elif len(token) < MIN_TOKEN_LENGTH:
            raise BadRequest(f"a token must be at least {MIN_TOKEN_LENGTH} characters")
        now = utcnow()
        rec = {"sha256": token_hash(token), "user": user, "admin": bool(admin),
               "created": now.isoformat(timespec="seconds"),
               "expires": (now + timedelta(days=days)).isoformat(timespec="seconds"),
               "revoked": None}

        def add(records):
            if any(r.get("sha256") == rec["sha256"] for r in records):
                raise Conflict("that token already exists")
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
                raise NotFound("no such token") if not hits else \
                    Conflict("that fingerprint matches several tokens")
            hits[0]["revoked"] = utcnow().isoformat(timespec="seconds")
            return hits[0]
        return self._change(mark)


class AuthThrottle:
    """Slows token guessing without locking a team out.  Within a minute, an address
    that presents more than ``limit`` different unknown tokens, or any one unknown
    token presented more than ``limit`` times, gets 429 (with Retry-After) until the
    minute is over.  Known tokens that expired or were revoked are no guesses (a
    dashboard left open keeps presenting one), and nothing counts while the token
    file cannot be read: the Unauthorized raised then says whether it was a guess."""

    WINDOW = 60.0
    #: Addresses and tokens remembered at most; the oldest windows go first.
    MAX_KEYS = 10000

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._windows = {}  # ("address" | "token", key) -> [window start, set of failures]

    @staticmethod
    def _keys(addr, token):
        keys = [("address", addr)]
        if token:
            keys.append(("token", fingerprint(token_hash(token))))
        return keys

    def check(self, addr, token):
        now = time.monotonic()
        with self._lock:
            for key in self._keys(addr, token):
                start, failures = self._windows.get(key, (0.0, ()))
                if len(failures) >= self.limit and now - start < self.WINDOW:
                    what = "address" if key[0] == "address" else "token"
                    raise TooMany(f"too many failed authentications from this {what}; try again "
                                  "in a minute", retry_after=math.ceil(self.WINDOW - (now - start)))

    def failed(self, addr, token):
        now = time.monotonic()
        with self._lock:
            for kind, key in self._keys(addr, token):
                entry = self._windows.get((kind, key))
                if entry is None or now - entry[0] >= self.WINDOW:
                    if len(self._windows) >= self.MAX_KEYS:
                        del self._windows[min(self._windows, key=lambda k: self._windows[k][0])]
                    entry = self._windows[kind, key] = [now, set()]
                # An address counts different tokens; a token counts its tries.
                entry[1].add(fingerprint(token_hash(token)) if kind == "address" else len(entry[1]))


###############################################################################
# Executors ###################################################################
###############################################################################
# An executor runs one node's jobs and learns how they ended.  Local and SSH
# nodes share one, AgentExecutor: it talks to the node's agent (the Node
# program above) over a link, either a pipe to a process on this machine
# (LocalLink) or a channel of a persistent SSH connection through the jump host
# (SshLink); both links also reach the files in the node's workdir.  A Slurm
# node's executor uses an SshLink too, but no agent: Slurm runs the jobs.
# Executors read and write spool files only through the JobFolder they are
# given.

@functools.cache
def node_program():
    """(file name, source) of the node program: the Node program section of this
    very file, made a script.  The name carries a hash of the source, so each
    release has its own file on a node and never rewrites one in use."""
    lines = Path(__file__).read_text().splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.startswith("# Node program #")) + 2
    end = next(i for i in range(begin, len(lines))
               if lines[i].startswith("# ") and lines[i].rstrip().endswith("###")) - 1
    source = ('"""gpuqueue\'s node program: made from gpuqueue.py, holds no user data."""\n'
              "import base64, collections, contextlib, errno, json, math, os, pwd, re, "
              "selectors, shutil, signal, stat, subprocess, sys, threading, time\n" + "".join(lines[begin:end]).rstrip() + "\n\n\n"
              'if __name__ == "__main__":\n    sys.exit(node_main(sys.argv[1:]))\n')
    return f"gq_node-{hashlib.sha256(source.encode()).hexdigest()[:16]}.py", source


def gpus_from_reading(reading, visible, foreign_mib, held):
    """A node's GPUs (``visible``: its ``gpus``, indexes or UUIDs, in order) from its
    gpu_reading: per GPU nvidia-smi's figures, the processes on it, and ``foreign``,
    why it takes no new job, when something outside the queue uses it: a process
    that is none of the node's jobs, or more than ``foreign_mib`` MiB beyond what its
    jobs use (processes may be out of sight, as in a container).  The memory rule
    spares GPUs that ``held`` (those running jobs hold): the figures of a job that
    just ended may still show."""
    if not reading:
        return []
    apps = collections.defaultdict(list)
    for a in reading.get("apps") or ():
        if isinstance(a, dict):
            apps[a.get("gpu")].append(a)
    found = []
    for line in (reading.get("csv") or "").splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) != 6 or not {f[0], f[1]} & set(visible):
            continue
        if not f[0].isdigit():
            continue
        device = f[0] if f[0] in visible else f[1]
        # A figure a board does not give ("[N/A]": utilization under MIG) is None;
        # the GPU is still listed, and still watched for use outside the queue.
        used, total, busy = (int(x) if x.isdigit() else None for x in f[3:6])
        g = {"index": int(f[0]), "device": device, "name": f[2], "memory_used_mib": used,
             "memory_total_mib": total, "utilization_pct": busy}
        g["processes"] = [{k: a.get(k) for k in ("pid", "memory_mib", "user", "job")}
                          for a in apps[f[1]]]
        outside = [p for p in g["processes"] if p["job"] is None]
        beyond = (used or 0) - sum(p["memory_mib"] or 0 for p in g["processes"]
                                   if p["job"] is not None)
        g["foreign"] = None
        if outside:
            g["foreign"] = "used outside the queue by " + ", ".join(
                f"pid {p['pid']}" + (f" of {p['user']}" if p["user"] else "")
                + (f" ({p['memory_mib']} MiB)" if p["memory_mib"] is not None else "")
                for p in outside)
        elif beyond > foreign_mib and device not in held:
            g["foreign"] = f"{beyond} MiB in use outside the queue"
        found.append(g)
    return sorted(found, key=lambda g: visible.index(g["device"]))


def describe_exit(exit_code):
    """(status, error) of a job that ended by itself with ``exit_code`` (exit_code_of)."""
    if exit_code == 0:
        return "completed", None
    if exit_code < 0:
        return "failed", f"killed by signal {-exit_code}"
    return "failed", f"exit code {exit_code}"


def run_outcome(exit_code, reason, streams, detail=None):
    """The Outcome of a run as its wrapper left it: ``reason`` is None (it ended by
    itself), "timeout", "cancelled", "lost" (no result), "unfollowed" (stopped) or
    "not started" (its project or interpreter failed it); ``detail`` says why."""
    if reason == "cancelled":
        return Outcome("cancelled", exit_code, "cancelled while running", streams)
    if reason == "timeout":
        return Outcome("failed", exit_code, "timeout", streams)
    if reason == "lost":
        return Outcome("failed", exit_code, "the job's wrapper ended without a result "
                       + (f"; it said: {detail}" if detail else "(killed or crashed)"), streams)
    if reason in ("unfollowed", "not started"):
        return Outcome("failed", exit_code, detail, streams)
    status, error = describe_exit(exit_code)
    return Outcome(status, exit_code, error, streams)


class Run:
    """A launched job; ``exited`` is set, and ``on_exit`` called, when its wrapper ends."""

    def __init__(self, job, work, on_exit):
        self.job = job
        self.work = work  # its folder in the node's workdir (the job's id)
        self.wrapper_pid = None
        self.link_lost = False  # ended because the link to its node broke, not by exiting
        self.report = {}  # the agent's exit report: result and output, when small
        self.outcome = None  # its Outcome, known without asking the node (recovery)
        self.cancel_sent = False
        self.followed = False  # the job prepared to follow it has started: it has ended
        self.exited = threading.Event()
        self._on_exit = on_exit

    def ended(self):
        self.exited.set()
        self._on_exit()


def job_run(node, config, job, code):
    """What a job's wrapper runs (the start's ``launch``): the interpreter and setup
    of its environment, its entry script and, for a project, how to unpack it."""
    env = config.environments.get(job.environment) if job.environment else None
    kind = archive_kind(code[:512]) if job.entrypoint else None
    return {"python": env.python if env else node.job_python or system_python(),
            "setup": env.setup if env else None,
            "entry": job.entrypoint or NodeFiles.CODE,
            "archive": kind and {"kind": kind, "max_bytes": config.max_project_bytes,
                                 "max_files": config.max_project_files}}


def node_files(job, code):
    """The files a job's folder on its node starts with."""
    return {NodeFiles.PROJECT_ARCHIVE if job.entrypoint else NodeFiles.CODE: code}


def job_env(node, job):
    """Variables every job gets, whatever its node: the job's own (``env``) first,
    so that gpuqueue's win."""
    return {**node.env, **(job.env or {}), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(job.gpu_ids or node.gpus[:job.gpus]),
            "GPUQUEUE_JOB_ID": job.id, "PYTHONUNBUFFERED": "1",
            **({"GPUQUEUE_ARRAY_ID": job.array_id, "GPUQUEUE_ARRAY_INDEX": str(job.array_index),
                "GPUQUEUE_ARRAY_SIZE": str(job.array_size)} if job.array_id else {}),
            **({"GPUQUEUE_PARAMS": json.dumps(job.params)} if job.params is not None else {})}


class _Agent:
    """A node's agent over one channel: commands out, reports in.

    A reader thread turns reports into replies (waited for by the caller) and
    into ``Run.ended()`` calls.  When the channel ends, every run it followed
    is marked ``link_lost`` and ended, so its scheduler finds it again.
    """

    def __init__(self, channel, name, last_words, on_news=lambda: None):
        self.channel = channel
        self.name = name  # "node 3", for the log
        self.last_words = last_words  # what the agent wrote to stderr, once it ended
        #: Called when a prepared start started, or was dropped: its scheduler looks.
        self.on_news = on_news
        self.runs = {}  # job id -> Run
        self.closed = False
        self._closing = False
        self._replies = {}
        self._waiting = set()  # the keys of requests (``request``) still waited for
        self._refs = itertools.count(1)
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._listen, daemon=True, name="agent").start()

    def send(self, op, **fields):
        """Send one command (COMMANDS)."""
        data = message(COMMANDS, op, **fields)
        with self._send_lock:  # the scheduler and the GPU telemetry both send
            self.channel.sendall(data)

    def forget(self, job_id):
        """Drop what the agent said of a job's former start (a new one is sent)."""
        with self._cond:
            for op in ("started", "prepared", "dropped"):
                self._replies.pop((op, job_id), None)

    def reply(self, key, timeout):
        """The report called ``key`` (e.g. ("started", job id)), or None."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._replies or self.closed, timeout)
            return self._replies.pop(key, None)

    def ask(self, op, timeout, **fields):
        """Send ``op`` and wait for its answer (ping's is pong, check's checked)."""
        self.send(op, **fields)
        return self.reply(({"ping": "pong", "check": "checked"}.get(op, op), None), timeout)

    def request(self, op, answer, timeout, **fields):
        """Send ``op`` with an id of its own, which any thread may do at once, and wait
        for its ``answer`` (read's is data); None when none came in time.  An answer
        that comes later is dropped."""
        key = (answer, str(next(self._refs)))
        with self._cond:
            self._waiting.add(key)
        try:
            self.send(op, id=key[1], **fields)
            return self.reply(key, timeout)
        finally:
            with self._cond:
                self._waiting.discard(key)
                self._replies.pop(key, None)

    def close(self):
        self._closing = True
        with contextlib.suppress(Exception):
            self.channel.close()

    def _listen(self):
        pending = bytearray()
        try:
            while True:
                data = self.channel.recv(65536)
                if not data:
                    break
                pending += data
                if b"\n" not in data:
                    continue  # a long report still coming: not searched again per piece
                end = pending.find(b"\n")
                while end >= 0:
                    line = bytes(pending[:end])
                    del pending[:end + 1]
                    self._report(json.loads(line))
                    end = pending.find(b"\n")
        except (OSError, ValueError, EOFError) as exc:
            log.warning("%s: the link to its agent broke: %s", self.name, exc)
        else:
            # An agent that ends by itself may say why (a link that closes says nothing).
            if not self._closing and (words := self.last_words()):
                log.warning("%s: its agent ended: %s", self.name, words)
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
        key = (msg.get("op"), msg.get("id"))
        with self._cond:
            if msg.get("op") == "data" and key not in self._waiting:
                return  # its asker gave up waiting
            self._replies[key] = msg
            self._cond.notify_all()
        if msg.get("op") in ("started", "dropped"):
            self.on_news()


class _PipeChannel:
    """A local agent's stdin and stdout, with the two calls _Agent makes of an SSH channel."""

    def __init__(self, proc, log_from):
        self.proc = proc
        self.log_from = log_from  # where its stderr begins in agent.log

    def sendall(self, data):
        write_all(self.proc.stdin.fileno(), data)

    def recv(self, size):
        return os.read(self.proc.stdout.fileno(), size)

    def close(self):
        """The agent goes (its wrappers live on in sessions of their own)."""
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    """One entry of a folder tree on a node: its path below the tree's top ('/'
    between names; a name that is not UTF-8 as the filesystem's surrogateescape
    decodes it), what it is ("file", "dir", "link", "other", or "unnamed": a name
    that is not UTF-8, which no URL or JSON listing can carry), a file's size."""
    path: str
    kind: str
    size: int = 0


def _kind(name, mode):
    if not _is_utf8(name):
        return "unnamed"
    return ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "link" if stat.S_ISLNK(mode) else "other")


def raw_name(name):
    """A name's bytes as the filesystem holds them (undoing surrogateescape)."""
    return name.encode("utf-8", "surrogateescape")


def _is_utf8(name):
    """Whether a name decoded with surrogateescape was UTF-8 to begin with."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Link(abc.ABC):
    """What every node's link offers an executor: the node's agent, and the files in
    its workdir, named relative to it ("<id>/stdout").  LocalLink and SshLink are the
    two; each provides the primitives marked abstract, and the folder-tree
    operations below are built on them alike.  Nothing here follows a link: a
    symbolic link or a special file in a tree is listed as such, never read."""

    #: The pwd entry of a local node's ``run_as`` user and its (uid, gid), or None.
    owner = None
    run_as = None
    #: Whether a job's new folder is quicker made by the agent, in one round trip,
    #: than by new_folder (over SFTP: five).
    agent_makes_folders = False

    @abc.abstractmethod
    def connect(self):
        """Open the link unless it is up; NodeError with the reason if it fails."""

    @abc.abstractmethod
    def up(self):
        """Is the link open?"""

    @abc.abstractmethod
    def close(self):
        """Let the link go (the node's wrappers live on)."""

    @abc.abstractmethod
    def guard(self, step, *args):
        """Run a step on the link, any failure of the link itself a NodeError."""

    @abc.abstractmethod
    def side(self):
        """A context giving this link for a thread other than its owner's (a file
        listing or a copy beside the scheduler); NodeError while it is down."""

    @abc.abstractmethod
    def describe(self, rel):
        """Where ``rel`` is, for people and the spool's ``launching`` record."""

    @abc.abstractmethod
    def install(self, name, text):
        """Put the node program in the workdir, unless this release's copy is there."""

    @abc.abstractmethod
    def start_agent(self, program):
        """Start the node's agent; its channel (sendall, recv, close)."""

    @abc.abstractmethod
    def why_not_started(self, channel):
        """What an agent that ended wrote to stderr."""

    @abc.abstractmethod
    def new_folder(self, rel, files):
        """A fresh folder ``rel`` holding ``files`` (name -> bytes)."""

    @abc.abstractmethod
    def claim_void(self, rel):
        """Claim a job's ``launched`` at ``rel`` for a start that never happened: a
        link to ``void``, made at once or not at all, on which a wrapper's O_EXCL
        claim fails.  True when the job never launched there: this call claimed it,
        a recovery cut short before its requeue did, or its folder is gone."""

    @abc.abstractmethod
    def exists(self, rel):
        """Is there anything at ``rel``?"""

    @abc.abstractmethod
    def remove(self, rel):
        """Remove the tree at ``rel``, if there is one."""

    @abc.abstractmethod
    def _entries(self, rel):
        """(name, st_mode, st_size) of each entry of a folder, links not followed."""

    @abc.abstractmethod
    def _open_file(self, rel):
        """A binary reader of the regular file at ``rel``, refusing links."""

    @abc.abstractmethod
    def _make_dir(self, rel):
        """A new folder (its parent exists)."""

    @abc.abstractmethod
    def _write_new(self, rel, source):
        """A new file at ``rel`` with what the reader ``source`` gives."""

    def move_tree(self, rel, dest):
        """Move the tree at ``rel`` to the new local folder ``dest`` if it can be done
        by a rename (no byte copied): True if it was; False to copy it instead."""
        return False

    # -- folder trees, from the primitives --------------------------------------

    def open_file(self, rel):
        """A binary reader of the regular file at ``rel`` (links refused, as
        _open_file says)."""
        return self.guard(self._open_file, rel)

    def list_tree(self, rel, most):
        """Every entry below ``rel``, parents before children: (entries, whether
        there were more than ``most``)."""
        def walk():
            found, todo = [], [""]
            while todo:
                sub = todo.pop(0)
                for name, mode, size in sorted(self._entries(f"{rel}/{sub}".rstrip("/"))):
                    if len(found) == most:
                        return found, True
                    entry = TreeEntry(f"{sub}{name}", _kind(name, mode),
                                      size if stat.S_ISREG(mode) else 0)
                    found.append(entry)
                    if entry.kind == "dir":
                        todo.append(f"{entry.path}/")
            return found, False
        return self.guard(walk)

    def fetch_tree(self, rel, dest, most_entries, most_bytes, entries=None, most_files=None):
        """Copy the regular files below ``rel`` into the new local folder ``dest``,
        looking at ``most_entries`` entries (or at ``entries``, a list_tree already
        taken) and copying ``most_bytes`` bytes and ``most_files`` files at most:
        (the TreeEntries copied, those left out: links, special files, files that
        went meanwhile, and what did not fit).  A file that grows while it is copied
        is cut at the size it was listed with."""
        if entries is None:
            entries, _ = self.list_tree(rel, most_entries)
        os.mkdir(dest, 0o700)
        copied, left, room = [], [], most_bytes

        def copy_one(entry):
            try:
                with self._open_file(f"{rel}/{entry.path}") as src, \
                        open(os.path.join(dest, entry.path), "xb") as out:
                    todo = entry.size
                    while todo and (chunk := src.read(min(todo, 1 << 20))):
                        out.write(chunk)
                        todo -= len(chunk)
            except OSError as exc:  # (a full disk here is no fault of the link's)
                raise disk_full(exc, "no room on the spool's disk for them") from None
        for entry in entries:
            if entry.kind == "dir":
                os.mkdir(os.path.join(dest, entry.path), 0o700)
            elif entry.kind != "file" or entry.size > room or len(copied) == most_files:
                left.append(entry)
            else:
                try:
                    self.guard(copy_one, entry)
                except FileNotFoundError:
                    left.append(entry)
                    continue
                copied.append(entry)
                room -= entry.size
        return copied, left

    def put_tree(self, src, rel):
        """Copy the local folder tree ``src`` (regular files and folders alone) to a
        new folder ``rel``."""
        def put():
            self._make_dir(rel)
            for top, dirs, files in os.walk(src):
                here = os.path.relpath(top, src)
                base = rel if here == "." else f"{rel}/{here}"
                for d in sorted(dirs):
                    if not os.path.islink(os.path.join(top, d)):
                        self._make_dir(f"{base}/{d}")
                for f in sorted(files):
                    path = os.path.join(top, f)
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        with open_nofollow(path) as source:
                            self._write_new(f"{base}/{f}", source)
        self.guard(put)


class LocalLink(Link):
    """This machine as a node: files in its workdir by path, its agent over a pipe.

    With ``run_as`` (a pwd entry) each job's folder belongs to that user, who runs
    the job; the workdir itself and everything the agent and the wrapper write
    stay the server's, and what the server reads there is opened without
    following links a job could have planted."""

    def __init__(self, node, root, run_as=None):
        self.node = node
        self.root = Path(root)
        self.owner = run_as
        self.run_as = None if run_as is None else [run_as.pw_uid, run_as.pw_gid]

    def connect(self):
        self.root.mkdir(parents=True, exist_ok=True)
        if self.owner is not None:
            os.chmod(self.root, 0o711)  # the way through to each job's folder, no more

    def up(self):
        return True

    def close(self):
        pass

    def describe(self, rel):
        return str(self.root / rel)

    def install(self, name, text):
        """Write the node program unless this release's copy is there, whole."""
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(self.root / name) == len(text.encode()):
                return
        write_file(self.root / name, text)

    def start_agent(self, program):
        with open(self.root / NodeFiles.AGENT_LOG, "ab") as errlog:
            proc = subprocess.Popen([self.node.python, program], cwd=self.root,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errlog, start_new_session=True)
            return _PipeChannel(proc, errlog.tell())

    def why_not_started(self, channel):
        """What this agent wrote to stderr (agent.log keeps every agent's)."""
        with open(self.root / NodeFiles.AGENT_LOG, "rb") as f:
            f.seek(channel.log_from)
            return _last_words(f.read())

    def guard(self, step, *args):
        return step(*args)

    def side(self):
        return contextlib.nullcontext(self)  # files by path: any thread may

    # -- files, named relative to the workdir --------------------------------

    def new_folder(self, rel, files):
        path = self.root / rel
        shutil.rmtree(path, ignore_errors=True)  # left by an attempt that never launched
        path.mkdir(mode=0o700)
        for name, data in files.items():
            (path / name).write_bytes(data)
        for p in [path, *(path / name for name in files)]:
            self._own(p)

    def claim_void(self, rel):
        """(A ``run_as`` job owns its folder, and could put a link there in place of
        its wrapper's claim: only a link of the server's own counts.)"""
        path = self.root / rel
        try:
            os.symlink(NodeFiles.VOID, path)
        except FileExistsError:
            st = os.lstat(path)
            return stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and \
                os.readlink(path) == NodeFiles.VOID
        except FileNotFoundError:
            return True
        return True

    def exists(self, rel):
        return os.path.lexists(self.root / rel)

    def remove(self, rel):
        shutil.rmtree(self.root / rel, ignore_errors=True)

    def move_tree(self, rel, dest):
        """A rename within the spool's disk, when the job ran as the server's own user
        (a ``run_as`` job's files are copied, never taken: their owner could still
        hold them open)."""
        if self.owner is not None:
            return False
        if os.path.lexists(dest):
            if not os.path.lexists(self.root / rel):
                return True  # taken by a try cut short by a crash: it is all there
            shutil.rmtree(dest)
        try:
            os.rename(self.root / rel, dest)
        except FileNotFoundError:
            if not os.path.isdir(self.root / rel.split("/")[0]):
                return False  # its job's folder is gone: the copy says so
            os.mkdir(dest, 0o700)  # it wrote nothing
        except OSError as exc:
            if exc.errno == errno.EXDEV:  # a workdir on another disk
                return False
            raise
        return True

    def _entries(self, rel):
        fd = self._walk(rel.split("/"))
        try:
            with os.scandir(fd) as found:
                return [(e.name, (st := e.stat(follow_symlinks=False)).st_mode, st.st_size)
                        for e in found]
        finally:
            os.close(fd)

    def _walk(self, names):
        """An fd of the folder ``names`` below the workdir, each step opened without
        following a link, so that a job that swaps a folder for a link (its folder is
        its own under ``run_as``) cannot lead the server elsewhere; a link is refused
        as a missing folder is."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                     dir_fd=fd), fd
                os.close(parent)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FileNotFoundError(errno.ENOENT, "not a folder", "/".join(names)) \
                    from None
            raise
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, rel):
        """Each step from the workdir down is opened without following a link (as
        _walk's)."""
        names = rel.split("/")
        fd = self._walk(names[:-1])
        try:
            fd, parent = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                                 dir_fd=fd), fd
            os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "not a regular file", rel)
        return os.fdopen(fd, "rb")

    def _make_dir(self, rel):
        os.mkdir(self.root / rel, 0o700)
        self._own(self.root / rel)

    def check_run_as(self, python, program):
        """NodeError, with the reason and the fix, when the ``run_as`` user cannot run
        the jobs' ``python`` or reach the workdir (the node program there unpacks
        projects as that user): said once, when the node starts, rather than by every
        job failing."""
        who = self.owner.pw_name
        try:
            r = subprocess.run([python, "-c", "import sys; open(sys.argv[1], 'rb').close()",
                                str(self.root / program)], cwd="/", stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60, user=self.owner.pw_uid,
                               group=self.owner.pw_gid, extra_groups=[])
            why = r.stderr.decode(errors="replace").strip().splitlines()[-1:] \
                if r.returncode else None
        except subprocess.TimeoutExpired:
            why = [f"{python} did not start within 60 s"]
        except OSError as exc:
            why = [f"cannot run {python}: {exc.strerror or exc}"]
        if why is not None:
            raise NodeError(
                f"the run_as user {who} cannot run {python} or reach the workdir {self.root} "
                f"({' '.join(why) or 'it failed'}): set `python` on the node to an interpreter "
                f"{who} may run (such as /usr/bin/python3), and `workdir` to a folder on a "
                f"path {who} may pass through")

    def _write_new(self, rel, source):
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        self._own(self.root / rel)

    def _own(self, path):
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)


#: Seconds allowed for TCP connect, SSH banner, authentication and channel opens.
SSH_TIMEOUT = 10
#: Seconds between SSH keepalives, so a dead link is noticed.
SSH_KEEPALIVE = 5

_known_hosts_lock = threading.Lock()


def _ssh_connection(target, config, gateway=None):
    """A Fabric Connection with host keys checked and every wait bounded."""
    import fabric
    import paramiko

    class RecordNewKey(paramiko.MissingHostKeyPolicy):
        """Trust on first use (``accept_new_host_keys``): append the key to known_hosts."""

        def missing_host_key(self, client, hostname, key):
            line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
            with _known_hosts_lock, open(config.known_hosts, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            client.get_host_keys().add(hostname, key.get_name(), key)
            log.warning("recorded new host key for %s in %s", hostname, config.known_hosts)

    class Connection(fabric.Connection):
        def open(self):
            super().open()
            self.transport.set_keepalive(SSH_KEEPALIVE)
            sock = self.transport.sock
            if isinstance(sock, socket.socket):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # sshd turns Nagle off on its side only for a connection that holds a
            # pty session; without it, a short report after a quiet spell waits for
            # a delayed ACK (tens of ms).  One idle pty session per connection does
            # it.  Keep a reference: Paramiko holds channels weakly, and a channel
            # collected by the garbage collector closes itself from whatever thread
            # runs, which deadlocks a thread already inside a send on this transport.
            self.idle_pty = self.transport.open_session(timeout=SSH_TIMEOUT)
            self.idle_pty.get_pty()
            self.idle_pty.exec_command("exec cat")

        def open_gateway(self):
            """Fabric's, with a bounded wait for the jump host's forwarding channel."""
            self.gateway.open()
            return self.gateway.transport.open_channel(
                "direct-tcpip", (self.host, int(self.port)), ("", 0), timeout=SSH_TIMEOUT)

    connect_kwargs = {"banner_timeout": SSH_TIMEOUT, "auth_timeout": SSH_TIMEOUT,
                      "channel_timeout": SSH_TIMEOUT}
    if target.key_file:
        connect_kwargs.update(key_filename=[target.key_file], look_for_keys=False,
                              allow_agent=False)
    if target.password_env:
        connect_kwargs["password"] = os.environ.get(target.password_env)
    conn = Connection(target.host, user=target.user, port=target.port, gateway=gateway,
                      connect_timeout=SSH_TIMEOUT, connect_kwargs=connect_kwargs,
                      config=fabric.Config(ssh_config=paramiko.SSHConfig()))
    conn.client = paramiko.SSHClient()
    if config.known_hosts.exists():
        conn.client.load_host_keys(str(config.known_hosts))
    conn.client.set_missing_host_key_policy(
        RecordNewKey() if config.accept_new_host_keys else paramiko.RejectPolicy())
    return conn


#: Taken while a finished agent's stderr is drained from its channel.
_stderr_lock = threading.Lock()

#: Seconds a command on a host (sbatch, squeue, scancel) may take.
SLURM_TIMEOUT = 60


class SftpReader:
    """A file on an SSH node, read ahead a window at a time (paramiko's prefetch of
    the next WINDOW bytes from where reading is).  A prefetch of the whole file holds
    whatever arrives until it is read: all of a checkpoint for a client that reads
    slowly, and everything before the place a Range asked for."""

    WINDOW = 8 << 20

    def __init__(self, f):
        self.f = f
        self.ahead = 0  # where the window asked for ends
        try:
            self.size = f.stat().st_size
        except BaseException:
            f.close()
            raise

    def read(self, n):
        pos = self.f.tell()
        if pos >= self.size:  # (grown since: read as it comes)
            return self.f.read(n)
        if pos >= self.ahead:
            self.ahead = min(self.size, pos + self.WINDOW)
            self.f.prefetch(self.ahead)
        return self.f.read(min(n, self.ahead - pos))

    def seek(self, pos):
        self.f.seek(pos)
        self.ahead = 0

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SshLink(Link):
    """A node, or a Slurm login host, over SSH (through the jump host when one is
    configured): one persistent connection, opened once and reused, with an SFTP
    channel on it for the files in the node's workdir.  Owned by its node's
    scheduler thread; HTTP threads read output over SFTP channels of their own."""

    agent_makes_folders = True

    def __init__(self, node, config):
        self.node = node
        self.config = config
        self.workdir = _sftp_path(node.workdir)
        self.conn = None
        self.sftp = None
        self.home = None  # the login's home folder, for absolute paths

    def connect(self):
        """Open the connection unless it is up; NodeError with the reason if it fails."""
        if self.up():
            return
        self.close()
        gateway = _ssh_connection(self.config.jump, self.config) if self.config.jump else None
        conn = _ssh_connection(self.node.ssh, self.config, gateway=gateway)
        step = "login"
        try:
            conn.open()
            sftp = conn.sftp()
            sftp.get_channel().settimeout(self.config.node_timeout)  # a hung node: NodeError
            step = "workdir"
            _mkdirs(sftp, self.workdir)
            self.home = sftp.normalize(".")
        except Exception as exc:
            conn.close()
            if gateway is not None:
                gateway.close()
            if step == "workdir" and isinstance(exc, OSError):
                raise NodeError(workdir_problem(self.node, exc)) from None
            raise NodeError(self.reason(exc)) from None
        self.conn, self.sftp = conn, sftp

    def up(self):
        return self.conn is not None and self.conn.transport.is_active()

    def close(self):
        if self.conn is not None:
            gateway = self.conn.gateway
            self.conn.close()
            if gateway is not None:
                gateway.close()
        self.conn = self.sftp = None

    def reason(self, exc):
        """A short, secret-free reason for /api/nodes."""
        import paramiko
        config = self.config
        hop = f"jump host {config.jump.host}:{config.jump.port}" if config.jump else "the node"
        text = str(exc) or type(exc).__name__
        if isinstance(exc, paramiko.BadHostKeyException):
            return f"host key changed for {exc.hostname}: refused (known_hosts {config.known_hosts})"
        if "not found in known_hosts" in text:
            return f"unknown host key: {text} (add it to {config.known_hosts})"
        return f"{self.node.ssh.host}:{self.node.ssh.port} via {hop}: {type(exc).__name__}: {text}"

    #: True in a side() copy, which never connects or closes the connection itself.
    _side = False

    def guard(self, step, *args):
        """Run a step on the connection, turning any SSH failure into NodeError."""
        try:
            if not self._side:
                self.connect()
            return step(*args)
        except (GpuqueueError, FileNotFoundError):
            raise
        except Exception as exc:
            if not self._side:
                self.close()
            raise NodeError(self.reason(exc)) from None

    @contextlib.contextmanager
    def side(self):
        """This link with an SFTP channel of its own on the same connection: no new
        login, and the scheduler's channel stays the scheduler's."""
        conn = self.conn
        if conn is None or not conn.is_connected:
            raise NodeError(f"node {self.node.id} is not connected")
        import paramiko
        channel = timer = None
        try:  # every step bounded: open_sftp would wait unbounded on a stalled node for
            channel = conn.transport.open_session(timeout=SSH_TIMEOUT)  # the subsystem
            channel.settimeout(self.config.node_timeout)  # and the SFTP handshake
            timer = threading.Timer(SSH_TIMEOUT, channel.close)  # (a closed channel
            timer.start()                                         # ends both waits)
            channel.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(channel)
        except Exception as exc:
            if channel is not None:
                channel.close()
            raise NodeError(self.reason(exc)) from None
        finally:
            if timer is not None:
                timer.cancel()
        other = copy.copy(self)
        other.sftp, other._side = sftp, True
        try:
            yield other
        finally:
            with contextlib.suppress(Exception):
                sftp.close()

    def path(self, rel):
        """An absolute path in the workdir (Slurm wants absolute paths)."""
        path = f"{self.workdir}/{rel}"
        return path if path.startswith("/") else f"{self.home}/{path}"

    def describe(self, rel):
        return f"{self.node.host}:{self.path(rel)}"

    def install(self, name, text):
        """Write the node program unless this release's copy is there already:
        temporary name, then an atomic rename, so no agent starts a half file."""
        path = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            if self.sftp.stat(path).st_size == len(text.encode()):
                return  # a power cut can leave a file empty: then it is written again
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            with self.sftp.open(tmp, "w") as f:
                f.write(text)
            self.sftp.posix_rename(tmp, path)
        except OSError as exc:
            raise NodeError(workdir_problem(self.node, exc)) from None

    def start_agent(self, program):
        setup = f"{{ {self.node.setup}\n}} && " if self.node.setup else ""
        channel = self.conn.transport.open_session(timeout=SSH_TIMEOUT)
        channel.exec_command(f"cd {shlex.quote(self.path(''))} && {setup}"
                             f"exec {shlex.quote(self.node.python)} {shlex.quote(program)}")
        return channel

    def why_not_started(self, channel):
        """What the agent, or the login shell before it, wrote to stderr (called once
        the channel has ended, so nothing here waits; kept on the channel, as both the
        agent's reader and the connect that waited for it ask)."""
        with _stderr_lock:
            data = getattr(channel, "gq_stderr", b"")
            while channel.recv_stderr_ready():
                data += channel.recv_stderr(65536)
            channel.gq_stderr = data
        return _last_words(data)

    def run(self, *argv):
        """A command on the host, every word quoted: (exit status, stdout, stderr)."""
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in self.node.env.items())
        line = env + " ".join(shlex.quote(str(a)) for a in argv)
        r = self.guard(lambda: self.conn.run(line, hide=True, warn=True, in_stream=False,
                                             timeout=SLURM_TIMEOUT))
        if r.exited == 127:
            raise NodeError(f"{argv[0]} not found on {self.node.host}: is it installed there, "
                            "and on the login shell's PATH?")
        return r.exited, r.stdout, r.stderr

    # -- files, named relative to the workdir --------------------------------

    def new_folder(self, rel, files):
        def make():
            path = self.path(rel)
            _rmtree(self.sftp, path)  # left by an attempt that never launched
            self.sftp.mkdir(path)
            for name, data in files.items():
                with self.sftp.open(f"{path}/{name}", "w") as f:
                    f.write(data)
        self.guard(make)

    def claim_void(self, rel):
        """(SFTP says no more than "Failure" whatever stops a link: what stands at the
        name after the try tells.  A name with nothing there is a claim that did not
        take: a NodeError, tried again later, never a job taken for launched.)"""
        def claim():
            path = self.path(rel)
            with contextlib.suppress(OSError):
                self.sftp.symlink(NodeFiles.VOID, path)
            try:
                st = self.sftp.lstat(path)
            except FileNotFoundError:
                try:
                    self.sftp.stat(path.rsplit("/", 1)[0])
                except FileNotFoundError:
                    return True  # no folder: nothing can launch the job there
                raise NodeError(f"cannot claim the launch of job {rel.split('/')[0]} on "
                                f"node {self.node.id}") from None
            try:
                return stat.S_ISLNK(st.st_mode) and self.sftp.readlink(path) == NodeFiles.VOID
            except (OSError, UnicodeDecodeError):  # (a link the job made, to any bytes)
                return False
        return self.guard(claim)

    def read_capped(self, rel, limit):
        """An output file's bytes (read_capped's), for a Slurm node, which has no agent
        to read them: what the file is is looked at first (lstat), and only a regular
        file is opened, so that SFTP never follows a link or waits on a FIFO there."""
        def read():
            path = self.path(rel)
            try:
                st = self.sftp.lstat(path)
            except FileNotFoundError:
                return b""
            if not stat.S_ISREG(st.st_mode):
                return not_regular_note(rel.rsplit("/", 1)[-1], file_kind(st.st_mode))
            with self.sftp.open(path, "rb") as f:
                if st.st_size <= limit:
                    return f.read(st.st_size)
                half = limit // 2
                head = f.read(half)
                f.seek(st.st_size - half)
                return head + cut_note(st.st_size - 2 * half, st.st_size, limit) + f.read(half)
        return self.guard(read)

    def read_piece(self, rel, offset, limit):
        """Up to ``limit`` bytes of a file from ``offset`` (b"" while it is missing);
        Conflict for what is no regular file, which is not opened."""
        def read():
            try:
                st = self.sftp.lstat(self.path(rel))
            except FileNotFoundError:
                return b""
            if not stat.S_ISREG(st.st_mode):
                raise Conflict(f"{rel.rsplit('/', 1)[-1]} is not a regular file but "
                               f"{file_kind(st.st_mode)}; nothing can be read from it")
            with self.sftp.open(self.path(rel), "rb") as f:
                f.seek(offset)
                return f.read(limit)
        return self.guard(read)

    def exists(self, rel):
        try:
            self.guard(self.sftp.stat, self.path(rel))
            return True
        except FileNotFoundError:
            return False

    def remove(self, rel):
        self.guard(lambda: _rmtree(self.sftp, self.path(rel)))

    def _entries(self, rel):
        return [(name, a.st_mode, a.st_size)
                for name, a in _sftp_listing(self.sftp, self.path(rel))]  # lstat's figures

    def _open_file(self, rel):
        """The file as SFTP opens it, which follows links: on an SSH node a job runs
        as the login user, so what it could link to, the login reads anyway.  Only
        what was listed as a regular file is opened."""
        return SftpReader(self.sftp.open(self.path(rel), "rb"))

    def _make_dir(self, rel):
        self.sftp.mkdir(self.path(rel), 0o700)

    def _write_new(self, rel, source):
        with self.sftp.open(self.path(rel), "wx") as out:
            out.set_pipelined(True)
            shutil.copyfileobj(source, out, 1 << 15)


#: Seconds a node's ``setup`` line and python start-up may take before the
#: agent reports in.  (A job's start is confirmed within its lease: node_timeout.)
WRAPPER_START_TIMEOUT = 120
#: Output up to this many bytes (both streams) comes with a job's exit report from
#: the node's agent; more is read from the files.  Saves a dozen round trips per job.
INLINE_OUTPUT = 64 * 1024
#: Most bytes of a job's files its node's agent is sent to make its folder with
#: (AgentExecutor._new_folder); more go over the link.
AGENT_FOLDER_MAX = 256 * 1024
#: The most seconds a GPU reading may take.
GPU_TIMEOUT = 25
#: The most seconds a read of a running job's output may wait for its node: an HTTP
#: thread waits meanwhile.
LIVE_READ_TIMEOUT = 5
#: The most seconds a node's check of its environments may take (each has 60).
ENVIRONMENT_CHECK_TIMEOUT = 180


class AgentExecutor:
    """Runs a node's jobs through its agent, over its link (LocalLink or SshLink).

    Owned by its node's scheduler thread.  The agent is started once per
    connection; it launches each job and reports its exit at once, so a job
    costs no shell or interpreter start-up beyond its own.  The script travels
    as a file; a small output comes back inside the exit report, a large one is
    read from the files.  No user data is ever put on a command line.
    """

    def __init__(self, node, config, link):
        self.node = node
        self.config = config
        self.link = link
        self._agent = None
        #: Called when the agent says a prepared start started or was dropped.
        self.on_news = lambda: None
        #: The node's environments: name -> None (it works) or why not; replaced
        #: whole at each connect, read by any thread.
        self.environments = dict.fromkeys(node.environments)

    # -- the link and the agent ----------------------------------------------

    def connect(self):
        """Make sure the link and the agent are up; NodeError with the reason if not."""
        if self._agent is not None and not self._agent.closed and self.link.up():
            return
        self.close()
        name, source = node_program()
        try:
            self.link.connect()
            self.link.guard(self.link.install, name, source)
        except OSError as exc:
            raise NodeError(workdir_problem(self.node, exc)) from None
        if self.link.run_as is not None:
            self.link.check_run_as(self.node.job_python or system_python(), name)
        try:
            channel = self.link.guard(self.link.start_agent, name)
        except FileNotFoundError as exc:
            raise NodeError(python_missing(self.node, exc.strerror)) from None
        except OSError as exc:
            raise NodeError(f"cannot start the node's agent: {exc}") from None
        agent = _Agent(channel, f"node {self.node.id}",
                       lambda: self.link.why_not_started(channel), self.on_news)
        ready = agent.reply(("ready", None), WRAPPER_START_TIMEOUT)
        if ready is None or ready.get("protocol") != PROTOCOL:
            agent.close()
            self.link.close()
            if ready is not None:
                raise NodeError(f"the node's agent speaks protocol {ready.get('protocol')}, "
                                f"this server {PROTOCOL}")
            if not agent.closed:
                raise NodeError(f"the node's agent did not report in within "
                                f"{WRAPPER_START_TIMEOUT} s: its login shell's start-up "
                                f"files or the setup line may hang")
            words = self.link.why_not_started(channel)
            if re.search(r"not found|No such file|can't open|cannot execute|Permission denied",
                         words or ""):
                raise NodeError(python_missing(self.node, words))
            raise NodeError(f"the node's agent did not start: {words or 'no answer'}")
        self._agent = agent
        if self.node.environments:
            self._check_environments()

    def _owner_env(self):
        """A run_as user's HOME, USER and LOGNAME, for its jobs and their environments'
        check (none where the jobs run as the login or the server's user)."""
        owner = getattr(self.link, "owner", None)
        return {} if owner is None else dict(HOME=owner.pw_dir, USER=owner.pw_name,
                                             LOGNAME=owner.pw_name)

    def _check_environments(self):
        """Ask the node whether each of its environments' pythons starts; the ones
        that do not show in /api/nodes with the reason and take no job."""
        envs = {n: {"python": e.python, "setup": e.setup}
                for n, e in self.config.environments.items() if n in self.node.environments}
        reply = self._agent.ask("check", ENVIRONMENT_CHECK_TIMEOUT, environments=envs,
                                run_as=getattr(self.link, "run_as", None),
                                env={**self.node.env, **self._owner_env()})
        found = (reply or {}).get("environments")
        if not isinstance(found, dict):
            found = dict.fromkeys(envs, "the node did not answer its check")
        self.environments = {n: found.get(n) for n in envs}
        for name, why in self.environments.items():
            if why:
                log.warning("node %s: environment %s does not work: %s", self.node.id, name, why)

    def close(self):
        if self._agent is not None:
            self._agent.close()
        self._agent = None
        self.link.close()

    def healthy(self):
        """Does the agent answer a ping in time?  If not, the link is let go, so that
        the next connect starts afresh instead of trusting a silent one."""
        try:
            self.connect()
            if self._agent.ask("ping", self.config.node_timeout / 2) is not None:
                return True
        except (NodeError, OSError, EOFError):
            pass
        self.close()
        return False

    def _send(self, run, op, **fields):
        """Tell the agent something about a run it follows."""
        self.connect()
        if run is not None:
            self._agent.runs[run.job.id] = run
        try:
            self._agent.send(op, **fields)
        except (OSError, EOFError) as exc:
            self.close()
            raise NodeError(f"lost the link to node {self.node.id}: {exc}") from None

    # -- jobs ----------------------------------------------------------------

    def start(self, job, folder, on_exit):
        """Copy the job to a fresh folder on the node and have the agent launch it;
        its Run, or None when the node refused the launch (it never started there).

        The start carries a lease: the node refuses to launch the job once it has
        passed.  LeaseUnconfirmed when the node did not answer in time: the job may
        not start after the lease, so it may go elsewhere once the lease is over.
        DiskFull when there is no room for the job's folder or its launch record:
        nothing reached the node then, and the job may be queued again."""
        run, lease = self._send_start(job, folder, on_exit, "start")
        reply = self._agent.reply(("started", job.id), max(0.0, lease - time.time()))
        if reply is None:
            self.close()
            raise LeaseUnconfirmed(f"node {self.node.id} did not confirm the start of job "
                                   f"{job.id} in time", lease)
        if not reply.get("launched"):
            self._agent.runs.pop(job.id, None)
            return None
        run.wrapper_pid = int(reply["wrapper"])
        return run

    def prepare(self, job, folder, after, on_exit):
        """Like start, but the agent starts the job itself once job ``after`` (running
        there) has ended, within the start's lease (renewed with renew): its Run, not
        yet launched (news says when it is, or that it was dropped).  LeaseUnconfirmed
        and DiskFull as start's."""
        run, lease = self._send_start(job, folder, on_exit, "prepare", after=after.id)
        reply = self._agent.reply(("prepared", job.id), max(0.0, lease - time.time()))
        if reply is None:
            self.close()
            raise LeaseUnconfirmed(f"node {self.node.id} did not confirm the start of job "
                                   f"{job.id} in time", lease)
        run.wrapper_pid = int(reply["wrapper"])
        return run

    def news(self, run):
        """What the agent said of a prepared run since: its "started" or "dropped"
        report, or None."""
        agent = self._agent
        if agent is None:
            return None
        news = agent.reply(("started", run.job.id), 0) or agent.reply(("dropped", run.job.id), 0)
        if news is not None and news["op"] == "dropped":
            agent.runs.pop(run.job.id, None)
        return news

    def renew(self, deadline):
        """Lengthen every prepared start's lease to ``deadline``."""
        self._send(None, "renew", deadline=deadline)

    def drop(self, run):
        """A prepared start that must not start (cancelled, or its node drained)."""
        self._send(None, "drop", id=run.job.id)

    def _new_folder(self, rel, files):
        """A job's fresh folder on the node, holding ``files``: made by the agent where
        the link says that is quicker and the files are small, else by the link.
        Either way it is there before the launch record is written: recovery takes a
        missing folder as proof that the job never launched."""
        if not self.link.agent_makes_folders or sum(map(len, files.values())) > AGENT_FOLDER_MAX:
            return self.link.new_folder(rel, files)
        lease = time.time() + self.config.node_timeout
        try:
            made = self._agent.request(
                "make", "made", self.config.node_timeout, dir=rel, deadline=lease,
                files={name: base64.b64encode(data).decode() for name, data in files.items()})
        except (OSError, EOFError) as exc:
            made, why = None, f"lost the link to node {self.node.id}: {exc}"
        else:
            why = f"node {self.node.id} did not answer in time"
        if made is None:
            # The agent may still make it, within the lease: the folder may only be
            # made again, for another try, once the agent would refuse this one.
            self.close()
            time.sleep(max(0.0, lease + LEASE_MARGIN - time.time()))
            raise NodeError(why)
        if made.get("errno") not in (None, errno.ENOENT):
            self.close()  # as a failed step over SFTP does
            raise NodeError(f"node {self.node.id}: cannot make {rel}: {made.get('error')}")
        if made.get("errno") is not None:
            raise FileNotFoundError(errno.ENOENT, made.get("error"))

    def _send_start(self, job, folder, on_exit, op, **more):
        """Copy the job to a fresh folder on the node, record where it may run, and
        send ``op`` (start or prepare) with its lease: (its Run, the lease)."""
        self.connect()
        code = folder.code()
        launch = job_run(self.node, self.config, job, code)  # (may ask which python3 first)
        try:
            try:
                self._new_folder(job.id, node_files(job, code))
            except FileNotFoundError:  # the workdir is gone (a job can remove it)
                log.warning("node %s: its workdir was gone; it is made again, with a new "
                            "agent", self.node.id)
                self.close()
                self.connect()
                self._new_folder(job.id, node_files(job, code))
            lease = time.time() + self.config.node_timeout
            folder.mark_launching(self.link.describe(job.id), job)
        except OSError as exc:
            raise disk_full(exc, f"no room for job {job.id}'s start") from None
        run = Run(job, job.id, on_exit)
        self._agent.forget(job.id)  # what it said of an earlier try is not this one's
        env = {**job_env(self.node, job), **self._owner_env()}
        self._send(run, op, id=job.id, dir=job.id, env=env,
                   run_as=getattr(self.link, "run_as", None),
                   limit=self.config.time_limit(job.expected_time), grace=self.config.kill_grace,
                   output_limit=self.config.output_limit_bytes, deadline=lease,
                   inline=min(INLINE_OUTPUT, self.config.output_limit_bytes),
                   launch=launch, **more)
        return run, lease

    def reattach(self, job, folder, on_exit):
        """Find a job launched before a restart or a lost link: its Run, or None when
        it never launched (its launch is then claimed here, so it never will)."""
        old = folder.old_run(self.config.output_limit_bytes)
        if old is not None:
            return self._old_local_run(job, old, on_exit)
        self.connect()  # its files are read through the agent
        launched = f"{job.id}/{NodeFiles.LAUNCHED}"
        if folder.launched_where() is None or self.link.claim_void(launched):
            return None
        run = Run(job, job.id, on_exit)
        pids = self._wrapper_pids(job.id)
        protocol = (pids or {}).get("protocol", 1)
        if pids is None:
            run.ended()  # collect() finds its result, or calls it lost
        elif protocol not in PROTOCOLS_FOLLOWED:
            self._send(None, "cancel", wrapper=pids["wrapper"])
            run.outcome = run_outcome(None, "unfollowed", {}, detail=(
                f"started by a gpuqueue release of node protocol {protocol}, which this "
                f"release (protocol {PROTOCOL}) cannot follow; it was stopped"))
            run.ended()
        else:
            run.wrapper_pid = pids["wrapper"]
            self._send(run, "watch", id=job.id, dir=job.id, wrapper=run.wrapper_pid)
        return run

    def _wrapper_pids(self, rel, patience=2.0):
        """A launched wrapper's ``pids`` record, or None.  The wrapper writes it just
        after claiming the launch, so after a restart it may be a moment late; a file
        cannot be waited on, so this looks again briefly.  Only recovery comes here."""
        end = time.monotonic() + patience
        while True:
            try:
                pids = json.loads(self._read_whole(f"{rel}/{NodeFiles.PIDS}", 65536))
                pids["wrapper"] = int(pids["wrapper"])
                return pids
            except (ValueError, KeyError, TypeError):
                if time.monotonic() > end:
                    return None
                time.sleep(0.05)

    def _old_local_run(self, job, old, on_exit):
        """A local job launched by a release before node protocol 2, whose wrapper
        worked inside the job folder (JobFolder.old_run): its result if it left one;
        else it is stopped (this release cannot follow it) and fails saying so."""
        run = Run(job, None, on_exit)
        r = old["result"]
        streams = {s: old[s] for s in NodeFiles.STREAMS}
        try:
            run.outcome = run_outcome(r["exit_code"], r["reason"], streams)
        except (KeyError, TypeError):
            if old["wrapper"] is not None:
                with contextlib.suppress(OSError):
                    os.kill(old["wrapper"], signal.SIGTERM)  # it kills its job's group
            run.outcome = run_outcome(None, "unfollowed", streams, detail=(
                "started by an older gpuqueue release (node protocol 1), whose local "
                "jobs this release cannot follow; it was stopped"))
        run.ended()
        return run

    def cancel(self, run):
        if run.wrapper_pid is not None:
            self._send(None, "cancel", wrapper=run.wrapper_pid)

    def collect(self, run):
        """The run's Outcome; NodeError when its link broke before it ended."""
        if run.outcome is not None:
            return run.outcome
        if run.link_lost:
            raise NodeError(f"lost the link to node {self.node.id} while job {run.job.id} ran")
        r = run.report
        if "result" in r:  # small output came with the exit report
            try:
                streams = {s: base64.b64decode(r[s]) for s in NodeFiles.STREAMS}
                return run_outcome(r["result"]["exit_code"], r["result"]["reason"], streams,
                                   r["result"].get("detail"))
            except (KeyError, TypeError, ValueError):
                pass  # read the files instead
        limit = self.config.output_limit_bytes
        # The wrapper capped the files as they were written; the room is for its note.
        streams = {s: self._read_whole(f"{run.work}/{s}", limit + CUT_NOTE_ROOM, stream=s)
                   for s in NodeFiles.STREAMS}
        try:
            r = json.loads(self._read_whole(f"{run.work}/{NodeFiles.RESULT}", 65536))
            return run_outcome(r["exit_code"], r["reason"], streams, r.get("detail"))
        except (ValueError, KeyError, TypeError):
            words = _last_words(self._read_whole(f"{run.work}/{NodeFiles.WRAPPER_LOG}", 65536))
            return run_outcome(None, "lost", streams, words or None)

    def read(self, rel, offset, limit, timeout=None):
        """(up to ``limit`` bytes of a job's file on the node from ``offset``, what the
        file is: "file", "missing" or, for what the job put there instead, what that
        is, its size), read by the node's agent (read_piece): the server opens no
        file a job could have replaced.  Any thread; NodeError when the node is not
        connected or does not answer within ``timeout`` (default node_timeout)."""
        agent = self._agent
        if agent is None or agent.closed:
            raise NodeError(f"node {self.node.id} is not connected")
        try:
            reply = agent.request("read", "data", timeout or self.config.node_timeout,
                                  path=rel, offset=offset, limit=min(limit, READ_PIECE))
        except (OSError, EOFError) as exc:
            raise NodeError(f"lost the link to node {self.node.id}: {exc}") from None
        if reply is None:
            raise NodeError(f"node {self.node.id} did not answer a read of {rel} in time")
        try:
            return base64.b64decode(reply.get("data") or ""), str(reply["kind"]), \
                int(reply["size"])
        except (KeyError, TypeError, ValueError):
            raise NodeError(f"node {self.node.id} answered a read of {rel} wrongly") from None

    def _read_whole(self, rel, limit, stream=None):
        """A job's file on the node, its head and tail kept past ``limit`` bytes (as
        read_capped keeps them), in pieces; b"" when it is missing, and for a
        ``stream`` the job replaced with what is no file, a note saying so."""
        data, kind, size = self.read(rel, 0, limit)
        if kind == "missing" or (kind != "file" and stream is None):
            return b""
        if kind != "file":
            return not_regular_note(stream, kind)
        half = limit // 2 if size > limit else size
        pieces = [data[:half]]
        self._read_span(rel, len(pieces[0]), half, pieces)
        if size <= limit:
            return b"".join(pieces)
        pieces.append(cut_note(size - 2 * half, size, limit))
        self._read_span(rel, size - half, size, pieces)
        return b"".join(pieces)

    def _read_span(self, rel, at, end, pieces):
        """Bytes ``at`` to ``end`` of a job's file, appended to ``pieces`` as they come;
        it stops early where the file shrank or stopped being a file."""
        while at < end:
            piece, kind, _ = self.read(rel, at, end - at)
            if kind != "file" or not piece:
                return
            pieces.append(piece)
            at += len(piece)

    def remove_folder(self, rel):
        """Remove a finished job's folder on the node, once its outcome and files are
        safe in the spool (before that, a restart would read a missing folder as
        'never launched').  From the collector's thread: the agent's sends are
        locked, and nothing here connects."""
        if self.config.keep_remote_dirs:
            return
        agent = self._agent
        if agent is None or agent.closed:
            raise NodeError(f"node {self.node.id} is not connected")
        try:
            agent.send("remove", dir=rel)
        except (OSError, EOFError) as exc:
            raise NodeError(f"lost the link to node {self.node.id}: {exc}") from None

    def gpu_reading(self):
        """nvidia-smi's reading on the node (gpu_reading), asked of its agent.  Called
        from the telemetry thread: it uses the agent as it is and never connects."""
        agent = self._agent
        if agent is None or agent.closed:
            raise NodeError(f"node {self.node.id} is not connected")
        try:
            reply = agent.ask("gpus", GPU_TIMEOUT)
        except (OSError, EOFError) as exc:
            raise NodeError(str(exc)) from None
        if reply is None:
            raise NodeError(f"node {self.node.id} did not report its GPUs")
        return reply.get("reading")

    def read_output(self, job, stream, offset, limit):
        """Up to ``limit`` bytes of a running job's stream from ``offset`` (any thread,
        bounded by LIVE_READ_TIMEOUT); Conflict when the job replaced the stream with
        what is no regular file."""
        data, kind, _ = self.read(f"{job.id}/{stream}", offset, limit, LIVE_READ_TIMEOUT)
        if kind not in ("file", "missing"):
            raise Conflict(f"the job's {stream} is not a regular file but {kind} (the job "
                           "replaced it); nothing can be read from it")
        return data


#: Slurm job states that are not over yet; PENDING and the like show as pending.
SLURM_WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESV_DEL_HOLD", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING")
SLURM_ACTIVE = SLURM_WAITING + ("RUNNING", "COMPLETING", "STAGE_OUT")


def slurm_gres(gres, gpus):
    """The --gres of a job needing ``gpus`` GPUs: the node's ``gres`` with its count
    made the job's ("gpu:a100:1" -> "gpu:a100:4"), else gpu:N for a job of several
    GPUs; a one-GPU job on a node without ``gres`` asks for none, as before."""
    if gres:
        head, _, count = gres.rpartition(":")
        return f"{head}:{gpus}" if head and count.isdigit() else f"{gres}:{gpus}"
    return f"gpu:{gpus}" if gpus > 1 else None


class SlurmExecutor:
    """A Slurm cluster's login host, over an SshLink (no agent: Slurm runs the
    jobs).  Each job gets a folder in the workdir, which the compute nodes must
    share (a home folder usually is), holding code.py and job.sh;
    ``sbatch --job-name gq-<id>`` (slurm_name) queues it, so that it can be found
    by gpuqueue's id after a crash between sbatch and recording Slurm's id.  Every
    value on a command line is quoted.
    """

    def __init__(self, node, config, link):
        self.node = node
        self.config = config
        self.link = link
        #: Taken to work: its compute nodes are not this login host, so only the
        #: job can find out.
        self.environments = dict.fromkeys(node.environments)
        self._installed = False

    def connect(self):
        """Connect, and put the node program (a project's unpacker) in the shared
        workdir once per link."""
        if not self.link.up():
            self._installed = False
        self.link.connect()
        if not self._installed:
            self.link.guard(self.link.install, *node_program())
            self._installed = True

    def gpu_reading(self):
        return None  # the login host's GPUs are not the jobs' GPUs

    def submit(self, job, folder):
        """Queue the job with sbatch; Slurm's job id."""
        self.link.connect()
        remote = self.link.path(job.id)
        env = {k: v for k, v in job_env(self.node, job).items() if k != "CUDA_VISIBLE_DEVICES"}
        code = folder.code()
        run = job_run(self.node, self.config, job, code)
        q = shlex.quote
        script = "#!/bin/sh\n" + "".join(f"export {k}={q(v)}\n" for k, v in env.items())
        if run["archive"]:  # unpacked by the node program, which connect() put beside it
            p = run["archive"]
            script += (f"{q(self.node.python)} ../{q(node_program()[0])} unpack {p['kind']} "
                       f"{NodeFiles.PROJECT_ARCHIVE} {NodeFiles.PROJECT} {p['max_bytes']} "
                       f"{p['max_files']} || exit 125\ncd {NodeFiles.PROJECT} || exit 125\n")
        script += (f"mkdir -p {NodeFiles.OUTPUTS}\nexport GPUQUEUE_OUTPUT_DIR=\"$PWD/"
                   f"{NodeFiles.OUTPUTS}\"\n"
                   + (f"set -e\n{run['setup']}\nset +e\n" if run["setup"] else "")
                   + f"exec {q(run['python'])} {q(run['entry'])}\n")
        self.link.new_folder(job.id, {**node_files(job, code),
                                      NodeFiles.SLURM_SCRIPT: script.encode()})
        try:
            folder.mark_launching(self.link.describe(job.id), job)  # from here on Slurm may have it
        except OSError as exc:
            raise disk_full(exc, f"no room for job {job.id}'s start") from None
        limit = math.ceil(self.config.time_limit(job.expected_time))
        days, rest = divmod(limit, 86400)
        argv = ["sbatch", "--parsable", f"--job-name={slurm_name(job)}", f"--chdir={remote}",
                f"--output={remote}/{NodeFiles.STREAMS[0]}",
                f"--error={remote}/{NodeFiles.STREAMS[1]}",
                f"--time={days}-{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"]
        argv += [f"--{k}={self.node.slurm[k]}" for k in ("partition", "account")
                 if self.node.slurm[k]]
        gres = slurm_gres(self.node.slurm["gres"], job.gpus)
        if gres:
            argv.append(f"--gres={gres}")
        code, out, err = self.link.run(*argv, f"{remote}/{NodeFiles.SLURM_SCRIPT}")
        slurm_id = out.strip().split(";")[0]
        if code != 0 or not slurm_id.isdigit():
            raise SlurmRefused(err.strip() or out.strip() or f"sbatch exited with {code}")
        return slurm_id

    def states(self, jobs):
        """What Slurm says of gpuqueue's jobs: {gpuqueue id: (Slurm id, state, reason,
        exit code)}.  One whose Slurm id is known is found by it; one without (sbatch
        may or may not have taken it) by its attempt's name (slurm_name), the newest
        where the name shows twice.  A job Slurm no longer remembers is missing."""
        found = {}
        for i in range(0, len(jobs), 200):  # keep the command line short
            batch = jobs[i:i + 200]
            names = {slurm_name(j) for j in batch} | {f"gq-{j.id}" for j in batch}
            code, out, err = self.link.run("squeue", "-h", "-t", "all",
                                           f"--name={','.join(sorted(names))}",
                                           "-O", "JobID:|,Name:|,State:|,Reason:|,exit_code:|")
            if code != 0:
                raise NodeError(f"squeue failed on {self.node.host}: {err.strip()[:300]}")
            lines = [f for f in ([x.strip() for x in line.split("|")]
                                 for line in out.splitlines())
                     if len(f) >= 5 and f[1] in names and f[0].isdigit()]
            for job in batch:
                known = (job.slurm or {}).get("id")
                mine = [f for f in lines
                        if (f[0] == known if known else f[1] == slurm_name(job))]
                if mine:
                    f = max(mine, key=lambda f: int(f[0]))
                    wait = int(f[4]) if f[4].lstrip("-").isdigit() else 0
                    found[job.id] = (f[0], f[2].split()[0] if f[2] else "", f[3],
                                     exit_code_of(wait))
        return found

    def accounting(self, slurm_id):
        """(state, reason, exit code) of a job the controller has forgotten, from
        sacct; None where Slurm keeps no accounting (sacct then fails)."""
        code, out, _ = self.link.run("sacct", "-n", "-P", "-X", "-j", slurm_id,
                                     "--format=State,ExitCode")
        lines = out.strip().splitlines() if code == 0 else []
        if not lines or "|" not in lines[0]:
            return None
        state, exit_code = lines[0].split("|")[:2]
        status, _, sig = exit_code.partition(":")  # "status:signal"
        if sig.isdigit() and int(sig):
            exit_code = -int(sig)
        else:
            exit_code = int(status) if status.isdigit() else 0
        return (state.split() or [""])[0], None, exit_code

    def cancel(self, slurm_ids):
        code, _, err = self.link.run("scancel", *slurm_ids)
        if code != 0:
            log.warning("node %s: scancel %s: %s", self.node.id, " ".join(slurm_ids), err.strip())

    def streams(self, job):
        """The text of a job's output files, capped like every job's."""
        limit = self.config.output_limit_bytes
        return {s: self.link.read_capped(f"{job.id}/{s}", limit) for s in NodeFiles.STREAMS}

    def read_output(self, job, stream, offset, limit):
        """Up to ``limit`` bytes of a running job's stream from ``offset`` in the shared
        workdir (any thread, over an SFTP channel of its own)."""
        with self.link.side() as side:
            return side.read_piece(f"{job.id}/{stream}", offset, limit)

    def ran(self, job):
        """Did Slurm ever start the job?  It creates the output files when it does."""
        return self.link.exists(f"{job.id}/{NodeFiles.STREAMS[0]}")

    def remove_folder(self, rel):
        """Remove a finished job's folder from the shared workdir (any thread)."""
        if not self.config.keep_remote_dirs:
            with self.link.side() as side:
                side.remove(rel)


def slurm_name(job):
    """The name a job's attempt has in Slurm: gq-<id>, and gq-<id>.<n> for its n-th
    attempt, so that a retry is never taken for the attempt before it, which Slurm
    keeps listing for a while (MinJobAge)."""
    return f"gq-{job.id}" if job.attempt <= 1 else f"gq-{job.id}.{job.attempt}"


def _sftp_path(path):
    """SFTP starts in the home folder and knows no ``~``."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def _mkdirs(sftp, path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub or sub == ".":
            continue
        try:
            sftp.stat(sub)
        except FileNotFoundError:
            sftp.mkdir(sub)


def _sftp_listing(sftp, path):
    """(name, SFTPAttributes) of each entry of a remote folder, links not followed.
    paramiko's listdir_attr fails the whole folder on a name that is not UTF-8,
    which a job may write: here such a name decodes as a local one does
    (surrogateescape), and raw_name gives its bytes back for a path."""
    from paramiko import sftp as proto
    from paramiko.sftp_attr import SFTPAttributes
    kind, msg = sftp._request(proto.CMD_OPENDIR, sftp._adjust_cwd(raw_name(path)))
    if kind != proto.CMD_HANDLE:
        raise proto.SFTPError("Expected handle")
    handle, found = msg.get_binary(), []
    try:
        while True:
            try:
                kind, msg = sftp._request(proto.CMD_READDIR, handle)
            except EOFError:
                return found
            if kind != proto.CMD_NAME:
                raise proto.SFTPError("Expected name response")
            for _ in range(msg.get_int()):
                name = msg.get_string().decode("utf-8", "surrogateescape")
                msg.get_string()  # ls -l's line, with the name in it
                attr = SFTPAttributes._from_msg(msg)
                if name not in (".", ".."):
                    found.append((name, attr))
    finally:
        sftp._request(proto.CMD_CLOSE, handle)


def _rmtree(sftp, path):
    """Remove a remote folder tree (links in it are removed, not followed)."""
    try:
        entries = _sftp_listing(sftp, path)
    except FileNotFoundError:
        return
    for name, a in entries:
        if stat.S_ISDIR(a.st_mode):
            _rmtree(sftp, f"{path}/{name}")
        else:
            sftp.remove(raw_name(f"{path}/{name}"))
    sftp.rmdir(raw_name(path))


def workdir_problem(node, exc):
    """What an admin can act on when a node's workdir cannot be made or written."""
    where = node.workdir or "its workdir in the spool"
    what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return (f"cannot make or write the workdir {where} on node {node.id} ({what}): set "
            "`workdir` in the node's config to a folder its user may write, on a disk that "
            "is not read-only")


def python_missing(node, words):
    """What an admin can act on when a node's interpreter would not start."""
    return (f"{node.python} not found on the node, or it cannot be run ({words}): set "
            "`python` in the node's config to an interpreter the node has (python3 3.8 or "
            "newer)")


def _last_words(stderr, limit=500):
    """The end of what an agent wrote to stderr, from a line's start: a traceback's
    last lines say why it ended."""
    text = stderr.decode(errors="replace").strip()
    if len(text) > limit:
        text = text[-limit:].partition("\n")[2].strip() or text[-limit:]
    return text


###############################################################################
# Job requests ################################################################
###############################################################################
# What a submit must hold to become a job: config.yaml's keys, as JOB_KEYS
# (from Job's fields) declares them.

#: Bytes a job's config.yaml may have: its few keys need far less.  Checked before
#: the YAML is parsed, so no upload can make the parser work hard.
MAX_CONFIG_BYTES = 8 * 1024

_JSON_TYPES = {"string": str, "integer": int, "number": _NUMBER, "object": dict, "array": list}

MAX_ENV_VARS, MAX_ENV_VALUE = 64, 4096
#: Variables gpuqueue sets for every job, which ``env`` may not change.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTHONUNBUFFERED")


@functools.cache
def _job_config_loader():
    """YAML's safe loader (the C one where built), refusing a key given twice: plain
    YAML keeps the last one, so a config could say one thing to a reader and another
    to the server."""
    class JobConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def construct_mapping(self, node, deep=False):
            mapping = super().construct_mapping(node, deep)
            if len(mapping) != len(node.value):
                keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
                twice = next((k for k in keys if keys.count(k) > 1), "?")
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {twice[:40]!r} is given twice", node.start_mark)
            return mapping
    return JobConfigLoader


def key_bounds(spec, config):
    """(minimum, maximum) of a JOB_KEYS entry, a maximum named by a Config key read
    from ``config``."""
    high = spec["maximum"]
    return spec["minimum"], getattr(config, high) if isinstance(high, str) else high


def parse_job_config(data, config):
    """The checked mapping from an uploaded config.yaml, as JOB_KEYS declares its
    keys; BadRequest saying what is wrong."""
    if len(data) > MAX_CONFIG_BYTES:
        raise BadRequest(f"config_file is larger than {MAX_CONFIG_BYTES} bytes; it holds a few "
                         "short keys")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("config_file must be UTF-8 text") from None
    try:
        cfg = yaml.load(text, Loader=_job_config_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if "given twice" in str(exc.problem):
            raise BadRequest(f"config_file: {exc.problem}{where}") from None
        raise BadRequest(f"config_file is not valid YAML{where}") from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError):
        raise BadRequest("config_file is not valid YAML") from None
    if not isinstance(cfg, dict):
        raise BadRequest("config_file must be a YAML mapping of keys to values")
    for key in cfg:
        if key not in JOB_KEYS:
            shown = key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else "…"
            raise BadRequest(f"config_file: unknown key {shown!r}; allowed: {', '.join(JOB_KEYS)}")
    for key, spec in JOB_KEYS.items():
        if key not in cfg:
            if spec["config"] == "required":
                raise BadRequest(f"config_file: missing key {key!r}")
            continue
        cfg[key] = _checked_key(key, spec, cfg[key], config)
    return cfg


def _checked_env(key, value):
    """A job's own variables: names checked, values made strings, gpuqueue's own
    variables refused (a job must not move itself to another GPU or job id)."""
    if len(value) > MAX_ENV_VARS:
        raise BadRequest(f"config_file: {key!r} sets {len(value)} variables, more than "
                         f"{MAX_ENV_VARS}")
    out = {}
    for name, v in value.items():
        shown = name if isinstance(name, str) and len(name) <= 40 and name.isprintable() else "…"
        if not (isinstance(name, str) and ENV_NAME_RE.match(name)):
            raise BadRequest(f"config_file: {key!r}: {shown!r} is not a variable name "
                             "(letters, digits and '_', not starting with a digit)")
        if name in RESERVED_ENV or name.startswith("GPUQUEUE_"):
            raise BadRequest(f"config_file: {key!r}: {name} is set by gpuqueue and cannot "
                             "be changed")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise BadRequest(f"config_file: {key!r}: {name} must be a string or a number")
        v = str(v)
        if len(v) > MAX_ENV_VALUE or "\0" in v:
            raise BadRequest(f"config_file: {key!r}: {name} must be at most {MAX_ENV_VALUE} "
                             "characters, without NUL")
        out[name] = v
    return out


def _checked_key(key, spec, value, config):
    if spec["parse"] is not None:
        return spec["parse"](key, value, config)
    kind = spec["schema"]["type"]
    if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[kind]):
        what = {"number": "a number", "integer": "a whole number",
                "object": "a mapping of names to values",
                "array": "a list"}.get(kind, "a string (quote it)")
        raise BadRequest(f"config_file: {key!r} must be {what}")
    if kind == "object":
        return _checked_env(key, value)
    if kind == "array" and spec["schema"]["items"]["type"] == "string":  # job ids
        if len(value) > MAX_DEPENDENCIES or not all(
                isinstance(v, str) and JOB_ID_RE.match(v) for v in value):
            raise BadRequest(f"config_file: {key!r} must list at most {MAX_DEPENDENCIES} job "
                             "ids")
        return sorted(set(value))
    if kind == "array":  # exit codes: a signal's is minus its number
        if len(value) > 32 or not all(type(v) is int and -64 <= v <= 255 for v in value):
            raise BadRequest(f"config_file: {key!r} must list at most 32 exit codes, each "
                             "from -64 to 255")
        return sorted(set(value))
    if kind == "string":
        most = spec["schema"].get("maxLength", MAX_ID_LENGTH)
        if key != "token" and not (0 < len(value) <= most and value.isprintable()):
            raise BadRequest(f"config_file: {key!r} must be 1-{most} printable characters")
        return value
    low, high = key_bounds(spec, config)
    if kind == "number":
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not (math.isfinite(value) and value > low and (high is None or value <= high)):
            raise BadRequest(f"config_file: {key!r} must be above {low:g}"
                             + ("" if high is None else f" and at most {high:g}"))
    elif not ((low is None or value >= low) and (high is None or value <= high)):
        raise BadRequest(f"config_file: {key!r} must be from {low} to {high}" if high is not None
                         else f"config_file: {key!r} must be {low} or more")
    return value


###############################################################################
# Node workers ################################################################
###############################################################################
# One thread per node, which alone uses its node's executor: Worker is what
# every kind shares (its thread, its online state, recording a job's end);
# GpuWorker runs jobs on GPUs through an agent (local and SSH nodes) and
# SlurmWorker hands them to sbatch.  Which job may start where is decided in
# ``choose``, called by Spool.claim under the spool's lock with every node's
# NodeState.


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


@dataclasses.dataclass(frozen=True)
class Holding:
    """GPUs a node keeps for a job that waits for more of them than are free."""
    job_id: str
    gpus: tuple
    by: float  # the time by which they will all be free


#: Most seconds between reconnect attempts to an offline node.
SSH_MAX_BACKOFF = 10
#: Seconds a node waits before it tries again to start a job that found no room on
#: the spool's disk.
DISK_RETRY = 5
#: Pending jobs a node's scheduler looks through for one that may start now.
CLAIM_DEPTH = 200


class Collector:
    """One node's finished jobs' files ($GPUQUEUE_OUTPUT_DIR), brought back to the
    spool in a thread of its own, so that the node's next job never waits for a
    copy.  Over the node's link as a side() (an SFTP channel of its own on the
    connection already held; no new login).  A node that is away, or a spool with
    no room for the files (the disk may heal), is tried again with backoff, for
    ``unreachable_grace``; then the files are marked lost, with the reason, and
    left where they are.  Files moved in whole (a local node's) are in the spool
    already and hold nothing on the node: their listing waits for room as long as
    it takes.  Each job's folder on its node goes once its files are safe in the
    spool."""

    class Gone(Exception):
        """The finished job's folder is no longer on its node (removed by hand, or a
        workdir a reboot cleared): what it made there is lost, never "none made"."""

    def __init__(self, node, spool, executor, config):
        self.node = node
        self.spool = spool
        self.executor = executor
        self.config = config
        #: Heap of (when to try, job id, where on the node, when to give up, the
        #: backoff after the next failure).
        self._todo = []
        self._cond = threading.Condition()

    def add(self, job_id, at):
        with self._cond:
            heapq.heappush(self._todo, (0.0, job_id, at, time.time()
                                        + self.config.unreachable_grace, 1.0))
            self._cond.notify()

    def run(self):
        for job_id, at in self.spool.uncollected(self.node.id):
            self.add(job_id, at)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._todo and self._todo[0][0] <= time.time(),
                                    timeout=self._todo[0][0] - time.time() if self._todo else None)
                if not self._todo or self._todo[0][0] > time.time():
                    continue
                _, job_id, at, give_up, backoff = heapq.heappop(self._todo)
            try:
                self._collect(job_id, at, give_up, backoff)
            except Exception:  # (even the lost listing could not be written: a full disk)
                log.exception("node %s: the files of job %s could not be recorded; tried "
                              "again in %g s", self.node.id, job_id, backoff)
                self._again(job_id, at, give_up, backoff)

    def _again(self, job_id, at, give_up, backoff):
        """Try a job's files again after ``backoff`` seconds, twice as long the next time."""
        with self._cond:
            heapq.heappush(self._todo, (time.time() + backoff, job_id, at, give_up,
                                        min(backoff * 2, 60.0)))

    def _collect(self, job_id, at, give_up, backoff):
        keep, moved = False, []
        try:
            with self.executor.link.side() as link:
                self._store(job_id, link, at, moved)
        except NodeError as exc:
            if time.time() < give_up:
                self._again(job_id, at, give_up, backoff)
                return
            keep = True
            self._lost(job_id, f"node {self.node.id} stayed unreachable: {exc}; they are left "
                       f"on it at {self.executor.link.describe(at)}")
        except FileNotFoundError as exc:
            if not self.spool.done_folder(job_id).has_result():
                return  # the job is gone (retention): nothing to bring back for
            keep = True  # (something of them went while they were read)
            self._lost(job_id, f"they went while they were brought back: {exc}")
        except self.Gone as exc:
            keep = True  # (nothing there to remove)
            self._lost(job_id, str(exc))
        except Exception as exc:
            exc = disk_full(exc, "no room on the spool's disk for them")
            # Files moved in whole hold nothing on the node: they wait for their listing.
            if isinstance(exc, DiskFull) and (time.time() < give_up or moved):
                log.warning("job %s: no room for its files yet (%s); tried again in %g s",
                            job_id, exc.message, backoff)
                self._again(job_id, at, give_up, backoff)
                return
            keep = True
            if isinstance(exc, DiskFull):
                self._lost(job_id, f"{exc.message}; they are left on node {self.node.id} at "
                           f"{self.executor.link.describe(at)}")
            else:
                log.exception("node %s: the files of job %s could not be brought back",
                              self.node.id, job_id)
                self._lost(job_id, f"internal error: {exc}")
        if not keep:
            try:
                self.executor.remove_folder(at.split("/")[0])
            except NodeError as exc:
                log.warning("job %s: its folder on node %s stays: %s", job_id, self.node.id, exc)

    def _lost(self, job_id, why):
        with contextlib.suppress(FileNotFoundError):
            self.spool.store_outputs(job_id, lambda folder: dict(OUTPUTS_LOST, error=why))
        log.warning("job %s: its files were not brought back: %s", job_id, why)

    def _store(self, job_id, link, at, moved):
        """Copy the job's files into the spool; DiskFull when it has no room for them.
        ``moved`` is told when they were moved in whole (they are in the spool)."""
        c = self.config

        def fetch(dest):
            if link.move_tree(at, dest):
                moved.append(dest)
                return self._taken(dest)
            shutil.rmtree(dest, ignore_errors=True)  # a cut-short copy: copied afresh
            try:
                entries, more = link.list_tree(at, 2 * c.max_output_files + 100)
            except FileNotFoundError:
                if link.exists(at):  # a folder in it went, or became a link, meanwhile:
                    raise  # never "complete" with its files missing
                top = at.split("/")[0]
                if not link.exists(top):
                    raise self.Gone(f"the job's folder is gone from node {self.node.id} "
                                    f"({link.describe(top)})") from None
                entries, more = [], False  # it wrote nothing (or never ran)
            room, count, need = c.max_output_files_bytes, 0, 0
            for e in entries:
                if e.kind == "file" and e.size <= room and count < c.max_output_files:
                    room, count, need = room - e.size, count + 1, need + e.size
            try:
                if need:  # (no file, no room needed: nothing to wait for)
                    self.spool.admit(need, c.min_free_bytes)
            except DiskFull as exc:
                raise DiskFull(f"{exc.message} ({need} bytes)") from None
            try:
                copied, left = link.fetch_tree(at, dest, None, c.max_output_files_bytes,
                                               entries=entries, most_files=c.max_output_files)
                return outputs_listing(dest, copied, left, more, c)
            except BaseException:
                # A copy cut short (a full disk) holds no room while it waits, and is never
                # taken later for files moved in whole (move_tree would find it there).
                shutil.rmtree(dest, ignore_errors=True)
                raise
        self.spool.store_outputs(job_id, fetch)

    def _taken(self, dest):
        """The listing of files moved into ``dest`` whole: past the limits, and what
        is not a regular file, is removed from it as a copy would have left it out."""
        c = self.config
        entries, more = LocalLink(self.node, dest.parent).list_tree(
            dest.name, 2 * c.max_output_files + 100)
        kept, left, room = [], [], c.max_output_files_bytes
        for e in entries:
            if e.kind == "file" and e.size <= room and len(kept) < c.max_output_files:
                kept.append(e)
                room -= e.size
            elif e.kind != "dir":
                left.append(e)
        wanted = {e.path for e in kept}
        for top, dirs, names in os.walk(dest):
            for d in [d for d in dirs if not _is_utf8(d)]:
                dirs.remove(d)  # unnamed: left out, with all it holds
                path = os.path.join(top, d)
                if os.path.islink(path):
                    os.unlink(path)
                else:  # (what cannot go, a folder the job made read-only, stays unlisted)
                    shutil.rmtree(path, ignore_errors=True)
            for n in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                path = os.path.join(top, n)
                if os.path.relpath(path, dest).replace(os.sep, "/") not in wanted:
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # a link is removed, never followed
        return outputs_listing(dest, kept, left, more, c)


#: The listing of files that were not brought back (``error`` says why).
OUTPUTS_LOST = {"state": "lost", "files": [], "skipped": [], "truncated": False, "cut": None,
                "error": None}


#: What is listed as skipped rather than brought back, and why; ``path`` shows a
#: name that is not UTF-8 with its bytes escaped (caf\xe9.txt).
SKIPPED = {"link": "a symbolic link: not followed", "other": "not a regular file",
           "unnamed": "a name that is not UTF-8 text, which no listing or URL can carry"}


def skipped_of(entries):
    """A listing's ``skipped``: the TreeEntries left out for what they are."""
    return [{"path": raw_name(e.path).decode("utf-8", "backslashreplace"),
             "reason": SKIPPED[e.kind]} for e in entries if e.kind in SKIPPED]


def outputs_listing(dest, copied, left, more, config):
    """outputs.json for the files brought back into ``dest``: each with its size and
    sha256 as stored (a file that shrank while it was copied is listed as it came);
    links and special files skipped; what did not fit counted as cut.  Every file
    and folder is synced first: the listing, once written, says they are whole."""
    files = []
    for e in copied:
        digest, size = hashlib.sha256(), 0
        with open(os.path.join(dest, e.path), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        files.append({"path": e.path, "size": size, "sha256": digest.hexdigest()})
    for top, _, _ in os.walk(dest):
        fsync_dir(top)
    skipped = skipped_of(left)
    cut = [e for e in left if e.kind == "file"]
    truncated = bool(cut) or more
    note = None
    if truncated:
        note = (f"cut at the limits: max_output_files {config.max_output_files}, "
                f"max_output_files_bytes {config.max_output_files_bytes}"
                + ("; the folder held more entries than were looked at" if more else ""))
    return {"state": "truncated" if truncated else "complete", "files": files,
            "skipped": skipped, "truncated": truncated,
            "cut": {"files": len(cut), "bytes": sum(e.size for e in cut), "more": more}
            if truncated else None, "error": note}


class Worker:
    """One node's thread: what every kind of node shares.

    It sleeps on ``wake``, which submit, cancel and a job's exit set.  It alone
    uses its executor (and so its connection).  While its node is unreachable it
    is offline (``online``, and ``error`` says why): it hands its pending jobs to
    online nodes and retries with backoff.  Each kind says in ``_step`` what one
    round does, and in ``room``, ``cost`` and ``choose`` which jobs it may start.
    """

    def __init__(self, node, spool, executor, config, peers):
        self.node = node
        self.spool = spool
        self.executor = executor
        self.config = config
        self.peers = peers  # every node's worker, by id (this one included)
        self.wake = threading.Event()
        self.online = False
        self.error = "connecting"
        self.settled = threading.Event()  # set once the first connect has succeeded or failed
        self.started = 0  # jobs launched since the server started
        self.dispatch = Histogram()  # seconds from claim to the job's start on its node
        self.collector = Collector(node, spool, executor, config)
        self._disk_full = False  # jobs wait for room on the spool's disk (said once)

    def run(self):
        """The node's thread, forever.  Whatever escapes a step is logged and the
        loop goes on; the Scheduler's supervisor restarts a thread that ends anyway."""
        self._resume_all()
        while True:
            try:
                self._step()
            except Exception:
                log.exception("node %s: a scheduler step failed; going on", self.node.id)
                self.wake.wait(1)  # do not spin on a fault that repeats
                self.wake.clear()

    def _resume_all(self):
        """Follow again what runs on the node, once, before the first step."""

    def _step(self):
        raise NotImplementedError

    # -- which jobs start here --------------------------------------------------

    def room(self, state):
        """How much of ``cost`` a job could start on here now, as another node's
        scheduler counts it, from this node's NodeState."""
        raise NotImplementedError

    def cost(self, job):
        """What a job takes of ``room``."""
        raise NotImplementedError

    def could_start(self, job, room):
        """Would this node start ``job`` now, given the room left (``room``, a dict
        of every node's)?  If so, the room is taken, as its own scheduler would."""
        n = self.node.id
        if job.gpus <= len(self.node.gpus) and self.has(job) and self.cost(job) <= room[n]:
            room[n] -= self.cost(job)
            return True
        return False

    def _rooms(self, states):
        """Every other node's room, each worked out when first asked for (most
        choices look at few other nodes' jobs, or none)."""
        return _States(lambda n: self.peers[n].room(states[n])
                       if self.peers[n].online and n != self.node.id else 0)

    # -- a job's end -------------------------------------------------------------

    def _guarded(self, job, step, *args):
        """Run one job step; whatever goes wrong fails that job, never the node's thread."""
        try:
            step(*args)
        except Exception as exc:
            self._failed_inside(job, exc)

    def _failed_inside(self, job, exc):
        """Fail a job that met a fault inside gpuqueue (logged with its traceback)."""
        log.exception("node %s: job %s failed inside gpuqueue", self.node.id, job.id)
        try:
            self._record(job, Outcome("failed", error=f"internal error: {exc}"))
        except Exception:
            log.exception("node %s: job %s cannot be recorded; it leaves the index",
                          self.node.id, job.id)
            self.spool.forget(job)

    def _record(self, job, outcome):
        """Record how a job ended, or queue it again for another attempt (retries);
        True when it has finished.  On a full disk the job stays running until there
        is room again: nothing is lost, and nothing needs a hand."""
        again = outcome.status == "failed" and job.attempt <= job.retries and (
            not job.retry_on_exit or outcome.exit_code is None
            or outcome.exit_code in job.retry_on_exit) and not job.cancel_requested
        backoff = 1.0
        while self.spool.is_active(job.id):
            try:
                if again:
                    self.spool.retry(job, outcome)
                    self.wake.set()
                    return False
                self.spool.finish(job, outcome)
            except DiskFull as exc:
                if backoff == 1.0:
                    log.error("node %s: job %s cannot be recorded yet: %s", self.node.id,
                              job.id, exc)
                self.wake.wait(backoff)  # no event says that space came back
                self.wake.clear()
                backoff = min(backoff * 2, 10.0)
        return True

    def _no_room(self, exc):
        """A job could not start for want of room on the spool's disk: it is back in
        its queue, and this node waits a while before it tries again (nothing tells
        when room comes back); said once while it lasts."""
        if not self._disk_full:
            log.error("node %s: jobs wait for room on the spool's disk: %s", self.node.id, exc)
        self._disk_full = True
        self.wake.wait(DISK_RETRY)
        self.wake.clear()

    # -- the node's state ---------------------------------------------------------

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
        if not self.online:
            log.info("node %s online", self.node.id)
        self.online, self.error = True, None
        self.settled.set()

    def _set_offline(self, reason):
        if self.online or self.error != reason:
            log.warning("node %s offline: %s", self.node.id, reason)
        self.online, self.error = False, reason
        self.settled.set()
        self._shed()

    def _shed(self):
        """Hand this node's pending jobs to online nodes that are not drained."""
        online = {n: w.has for n, w in self.peers.items() if w.online and w is not self}
        for n in self.spool.move_pending(self.node.id, online):
            self.peers[n].wake.set()

    # -- what it shows --------------------------------------------------------------

    def why_waiting(self, job, state):
        """Why a job planned for this node has not started yet, for its status."""
        n = self.node.id
        if not self.online:
            return f"node {n} is offline: {self.error}"
        if state.drained:
            return f"node {n} is drained; another node may take it"
        if not self.has(job):
            why = self.executor.environments.get(job.environment) or "it lacks it"
            return (f"its environment {job.environment!r} does not work on node {n} ({why}); "
                    "a node where it works may take it")
        return "jobs ahead of it start first"

    def info(self, state):
        """The node as /api/nodes shows it, from one NodeState."""
        return {"id": self.node.id, "host": self.node.host,
                "state": "online" if self.online else "offline",
                "drained": state.drained, "error": self.error,
                "running_job": state.running[0].id if state.running else None,
                "running_jobs": [j.id for j in state.running],
                "environments": dict(self.executor.environments)}

    def prepared_behind(self, job):
        """Has this node prepared a job that ``job`` may come ahead of in turn (see
        GpuWorker)?  None can be here."""
        return False

    def has(self, job):
        """Has this node the environment ``job`` asks for, in working order (as far
        as its last check knows)?"""
        return job.environment is None or (
            self.executor.environments.get(job.environment, "absent") is None)


#: Seconds between GPU readings of a node...
GPU_REFRESH = 30
#: ...and while the node has free GPUs and jobs wait: a GPU used outside the queue
#: is noticed, and one freed again taken, within this.
GPU_BUSY_REFRESH = 5
#: ...and after a reading that gave none.
GPU_RETRY = 10

#: Seconds before a running job's expected end from which the job to follow it is
#: prepared on its node (GpuWorker): sooner would keep that job from a node that
#: frees up first.
PREPARE_AHEAD = 10
#: Seconds a node's scheduler waits after its agent started a prepared job, before it
#: records the job that ended and prepares the next: on a machine of few cores that
#: work would slow the new job's interpreter starting up (the GPU's idle gap).
QUIET_AFTER_START = 0.05
#: Seconds a prepared job that another node asked back is not prepared here again:
#: time for that node to take it.
GIVEN_BACK = 5

#: Seconds the server waits past a start's lease before it gives the job to
#: another node: how far the server's and the nodes' clocks may disagree.
LEASE_MARGIN = 5


class GpuWorker(Worker):
    """A local or SSH node: starts the jobs that may start there now (one per GPU,
    or several GPUs for one job) through its agent, follows them to their ends
    (``runs``), and records how each ended.  A freed GPU takes its next job at
    once: the job's exit wakes the thread.

    Better still, a running job nearing its expected end has its successor
    *prepared* (``prepared``): the next job in turn that would take its GPUs is
    claimed, its folder made on the node and its wrapper made ready there, and the
    node's agent starts it itself the moment the running job ends, so that a GPU
    waits no server round trip between two jobs.  The start's lease is renewed
    while it waits, so a node that loses its server starts nothing after it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.runs = {}  # job id -> the Run of each job this node follows
        self.prepared = {}  # job id -> the Run prepared to start once that job ends
        self._renewed = 0.0  # when the prepared starts' leases were last renewed
        #: A running job is due a successor, but nothing waiting could follow it: a
        #: submit wakes this node (Scheduler._enqueue), which looks again then.
        self.starving = False
        #: Prepared jobs another node asked back (it has GPUs free for them): job id ->
        #: that node, woken once the job is back in its queue; and (job id -> until
        #: when) those given back, not prepared here again meanwhile.
        self.asked_back = {}
        self._given_back = {}
        #: Until when this thread leaves the CPU to a job its agent just started (the
        #: job's interpreter starting up is what the next line waits for).
        self._quiet_until = 0.0
        self.executor.on_news = self.wake.set

    def _resume_all(self):
        for job in self.spool.running_on(self.node.id):
            self._guarded(job, self._resume, job)

    def _step(self):
        if not self.online:
            self._bring_online()
        self.wake.clear()
        if (rest := self._quiet_until - time.monotonic()) > 0:
            self.wake.wait(rest)  # a job just started here: its interpreter has the CPU
            return
        try:
            self._reap()
            self._news()
            self._reconsider()
            self._pass_cancels()
            self._renew()
        except NodeError as exc:
            self._lost(exc)
            return
        job = None if self._ask_back(overdue=True) else \
            self.spool.claim(self.node.id, self.choose)
        if job is not None:
            self._guarded(job, self._execute, job)
            if self.free_gpus(self.spool.node_state(self.node.id)):
                return  # look again at once: another job may fit beside it
        elif self.spool.is_drained(self.node.id):
            self._shed()
        else:
            self._ask_back()
        self._prepare_successors()
        if not self.wake.wait(self._rest()) and not self.executor.healthy():
            self._lost(NodeError(f"node {self.node.id} did not answer within "
                                 f"{self.config.node_timeout:g} s"))

    # -- prepared successors ---------------------------------------------------

    def _rest(self):
        """Seconds this thread may sleep if nothing wakes it: until a heartbeat is
        due, a prepared start's lease must be renewed, or a running job nears its
        expected end (then its successor is prepared)."""
        now = time.time()
        rest = self.config.node_timeout / 2
        if self.prepared:
            rest = min(rest, max(0.05, self._renewed + self.config.node_timeout / 4 - now))
        for run in self.runs.values():
            due = (run.job.started_at or 0) + run.job.expected_time - PREPARE_AHEAD
            if due > now and run.job.id not in self.prepared:
                rest = min(rest, due - now)
        return rest

    def _renew(self):
        """Lengthen the leases of the prepared starts, well before they end."""
        if self.prepared and time.time() - self._renewed >= self.config.node_timeout / 4:
            self.executor.renew(time.time() + self.config.node_timeout)
            self._renewed = time.time()

    def _prepare_successors(self):
        """For each running job within PREPARE_AHEAD seconds of its expected end (or
        past it), prepare the job that is to take its GPUs next, if any; not while
        the node is drained."""
        self.starving = False
        if self.spool.is_drained(self.node.id):
            return
        now = time.time()
        for run in list(self.runs.values()):
            after = run.job
            if after.id in self.prepared or run.followed or run.exited.is_set() \
                    or after.cancel_requested \
                    or now < (after.started_at or now) + after.expected_time - PREPARE_AHEAD:
                continue
            job = self.spool.claim(self.node.id, functools.partial(self.choose_successor,
                                                                   after), prepared=True)
            if job is None:
                self.starving = True  # nothing waits that could follow it
                return
            self._guarded(job, self._prepare, job, after)

    @staticmethod
    def _held_from(state, gpus):
        """The Holding that keeps ``gpus`` for a job waiting for more GPUs than they
        are, or None (a job they are enough for waits for its turn like any other)."""
        holding = state.holding
        if holding and set(gpus) & set(holding.gpus) and len(holding.gpus) > len(gpus):
            return holding
        return None

    def choose_successor(self, after, candidates, states):
        """The job to prepare to follow ``after`` on its GPUs (Spool.claim's rule, as
        choose): the first in turn that fits them and that no node could start now.
        GPUs held for a job that needs more than ``after`` frees (Holding) are kept
        for it: nothing is prepared on them, and it starts once enough are free."""
        state = states[self.node.id]
        room = self._rooms(states)
        gpus = self.assigned(after)
        held = self._held_from(state, gpus)
        now = time.time()
        self._given_back = {j: t for j, t in self._given_back.items() if t > now}
        for seen, (job, n) in enumerate(candidates):
            if seen == CLAIM_DEPTH:
                break
            if held and job.id != held.job_id or job.id in self._given_back:
                continue
            if n != self.node.id and self.peers[n].could_start(job, room):
                continue
            if job.gpus <= len(gpus) and self.has(job):
                return (job, n, gpus[:job.gpus]), state.holding
        return None, state.holding

    def _prepare(self, job, after):
        if job.cancel_requested:
            self._record(job, Outcome("cancelled", error="cancelled before it started"))
            return
        self.prepared[after.id] = Run(job, job.id, self.wake.set)  # until it is sent
        try:
            run = self.executor.prepare(job, self.spool.folder(job), after, self.wake.set)
        except DiskFull as exc:
            del self.prepared[after.id]
            self.spool.requeue(job)
            self._no_room(exc)
            return
        except NodeError as exc:  # (LeaseUnconfirmed too): followed again with the rest
            self._lost(exc)
            return
        self.prepared[after.id] = run
        if not self._renewed:
            self._renewed = time.time()

    def _ask_back(self, overdue=False):
        """GPUs free here: a job that another node has prepared to follow one of its
        running jobs, and that could start here now, is asked back (dropped there and
        queued again), so that it starts here rather than wait behind a job that may
        run long.  Asked when nothing else is in turn here; and with ``overdue``,
        before anything here is started, when the job it waits for has run past its
        expected time: it was in turn before whatever waits here.  True when one was."""
        free = None  # this node's free GPUs: looked at once a job could be asked back
        now = time.time()
        for peer in self.peers.values():
            if peer is self or not isinstance(peer, GpuWorker) or not peer.online:
                continue
            for after, run in list(peer.prepared.items()):
                before = peer.runs.get(after)
                if overdue and (before is None or now < (before.job.started_at or now)
                                + before.job.expected_time) or run.job.id in peer.asked_back:
                    continue
                if free is None:
                    free = self.free_gpus(self.spool.node_state(self.node.id))
                if not free:
                    return False
                if run.job.gpus <= len(free) and self.has(run.job):
                    peer.asked_back[run.job.id] = self.node.id
                    peer.wake.set()
                    return True
        return False

    def prepared_behind(self, job):
        """Has this node prepared a job that ``job``, new in its queue, may come ahead
        of in turn: another user's, or one of a lower priority?  (A user's own jobs
        of one priority keep their order.)  Then it is to look again (_reconsider)."""
        return any(run.job.user_id != job.user_id or run.job.priority < job.priority
                   for run in list(self.prepared.values()))

    def _reconsider(self):
        """A prepared job that a pending one has come ahead of in turn since it was
        chosen (another user's, or of a higher priority) is given back, and the one
        in turn is prepared instead: preparing ahead never reorders the turns."""
        if not self.prepared:
            return
        state = self.spool.node_state(self.node.id)
        for after, run in list(self.prepared.items()):
            job = run.job
            gpus = self.assigned(self.runs[after].job) if after in self.runs else job.gpu_ids
            if run.wrapper_pid is None or run.cancel_sent or job.id in self.asked_back or (
                    (held := self._held_from(state, gpus)) and held.job_id == job.id):
                continue

            def fits(other, n, states, gpus=gpus):
                return other.gpus <= len(gpus) and self.has(other) and not (
                    n != self.node.id and self.peers[n].could_start(other, self._rooms(states)))
            if self.spool.ahead_in_turn(job.id, fits):
                log.info("job %s: prepared on node %s, given back: another job is in turn "
                         "before it", job.id, self.node.id)
                self.asked_back[job.id] = self.node.id

    def _news(self):
        """Prepared starts that started (they are runs now) or were dropped (back to
        their queue, or cancelled if that is why)."""
        for after, run in list(self.prepared.items()):
            news = self.executor.news(run)
            if news is None:
                continue
            del self.prepared[after]
            job = run.job
            if news["op"] == "started" and news.get("launched"):
                if after in self.runs:
                    self.runs[after].followed = True  # its GPUs are this one's now
                self._quiet_until = time.monotonic() + QUIET_AFTER_START
                self.spool.launched(job, after)
                run.wrapper_pid = int(news["wrapper"])
                run.cancel_sent = False  # a drop sent meanwhile came after its go
                self.runs[job.id] = run
                self.started += 1
                log.info("job %s user=%s node=%s running on GPU %s (prepared)", job.id,
                         job.user_id, self.node.id, ",".join(job.gpu_ids))
            else:
                with contextlib.suppress(NodeError):  # it never started: nothing in its
                    self.executor.remove_folder(job.id)  # folder there is anyone's
                if job.cancel_requested:
                    self._record(job, Outcome("cancelled", error="cancelled before it started"))
                else:
                    log.info("job %s: its prepared start on node %s was dropped: queued "
                             "again", job.id, self.node.id)
                    self.spool.requeue(job)
            asker = self.asked_back.pop(job.id, None)
            if asker is not None and asker != self.node.id:  # (not when out of turn here)
                self._given_back[job.id] = time.time() + GIVEN_BACK
                self.peers[asker].wake.set()
        if not self.prepared:
            self._renewed = 0.0

    def _guarded(self, job, step, *args):
        try:
            step(*args)
        except Exception as exc:
            self.runs.pop(job.id, None)
            self._failed_inside(job, exc)

    # -- which job starts: GPUs, turns, and holding GPUs for a big job ---------

    def assigned(self, job):
        """The GPUs a running job holds (one started before jobs had GPUs of their
        own holds the node's first)."""
        return job.gpu_ids or self.node.gpus[:job.gpus]

    def free_gpus(self, state):
        """This node's GPUs that no running job holds and nothing outside the queue
        uses, in the node's order."""
        taken = {g for job in state.running for g in self.assigned(job)}
        return [g for g in self.node.gpus if g not in taken and g not in state.foreign]

    def room(self, state):
        """Free GPUs but those held; none while drained."""
        if state.drained:
            return 0
        held = state.holding.gpus if state.holding else ()
        return sum(g not in held for g in self.free_gpus(state))

    def cost(self, job):
        return job.gpus

    def choose(self, candidates, states):
        """The scheduler's rule, called by Spool.claim under its lock with the
        pending jobs in the order they are to run: (the first that may start here
        now, as (job, its queue's node, its GPUs), or None; the Holding to keep).

        A job of another node's queue is taken only if that node could not start
        it now (idle GPUs take work from busy nodes).  The first of this node's own
        jobs that does not fit is *held for*: the GPUs that will free up first are
        kept for it, and it starts once they have (Holding); meanwhile a later job
        may use a held GPU only if its time limit ends before then (conservative
        backfill), so a big job is never starved by a stream of small ones."""
        state = states[self.node.id]
        free = self.free_gpus(state)
        room = self._rooms(states)
        now = time.time()
        holding = None
        for seen, (job, n) in enumerate(candidates):
            if seen == CLAIM_DEPTH:
                break
            if not free and n != self.node.id:
                continue  # no GPU free: only the Holding is to be found, from this queue
            if n != self.node.id and self.peers[n].could_start(job, room):
                continue
            if job.gpus > len(self.node.gpus) or not self.has(job):
                continue
            if holding is None:
                if job.gpus <= len(free):
                    return (job, n, free[:job.gpus]), None
                if n == self.node.id:
                    holding = self._hold(job, free, state, now)
                    if holding is not None and not free:
                        break  # held for, and nothing free to fill meanwhile
                continue
            ends = now + self.config.time_limit(job.expected_time) + self.config.kill_grace
            usable = [g for g in free if g not in holding.gpus]
            if ends <= holding.by:
                usable += [g for g in free if g in holding.gpus]
            if job.gpus <= len(usable):
                return (job, n, usable[:job.gpus]), holding
        return None, holding

    def _hold(self, job, free, state, now):
        """The GPUs to keep for ``job``: the free ones, then those whose running jobs'
        time limits end first, and the time by which they will all be free (time
        limits are enforced, so it holds).  None when GPUs used outside the queue
        leave too few."""
        def end(running):
            return ((running.started_at or now) + self.config.time_limit(running.expected_time)
                    + self.config.kill_grace)
        held, by = list(free), now
        for running in sorted(state.running, key=end):
            if len(held) >= job.gpus:
                break
            held += [g for g in self.assigned(running) if g not in state.foreign]
            by = max(by, end(running))
        if len(held) < job.gpus:
            return None
        return Holding(job.id, tuple(held[:job.gpus]), by)

    # -- jobs ----------------------------------------------------------------

    def _execute(self, job):
        if job.cancel_requested:
            self._record(job, Outcome("cancelled", error="cancelled before it started"))
            return
        log.info("job %s user=%s node=%s running on GPU %s", job.id, job.user_id, self.node.id,
                 ",".join(job.gpu_ids))
        try:
            run = self.executor.start(job, self.spool.folder(job), self.wake.set)
        except DiskFull as exc:
            self.spool.requeue(job)  # nothing reached the node: it waits for room
            self._no_room(exc)
            return
        except LeaseUnconfirmed as exc:
            self._set_offline(str(exc))
            run = self._after_lease(job, exc.lease)
        except NodeError as exc:
            self._set_offline(str(exc))
            run = self._reattach(job)
        else:
            if run is None:
                log.info("job %s: node %s refused its launch: queued again", job.id, self.node.id)
                self.spool.requeue(job)
                return
            self.started += 1
            self.dispatch.observe(time.time() - job.started_at)
            self._disk_full = False
        if run is not None:
            self.runs[job.id] = run

    def _after_lease(self, job, lease):
        """A start the node never confirmed: once its lease is over the node will not
        launch the job, so it is followed if it did start, else queued again."""
        while (left := lease + LEASE_MARGIN - time.time()) > 0:
            self.wake.wait(left)
            self.wake.clear()
        try:
            run = self.executor.reattach(job, self.spool.folder(job), self.wake.set)
        except NodeError:
            run = None  # still away, and past the lease: it cannot start there now
        if run is None:
            log.info("job %s: its start on node %s was never confirmed: queued again",
                     job.id, self.node.id)
            self.spool.requeue(job)
            if not self.online:
                self._shed()
        return run

    def _resume(self, job, after=None):
        """A job found running at start-up or after an outage (``after``: the job it
        was prepared to follow): follow it, or queue it again if it never ran."""
        run = self._reattach(job, after)
        if run is not None:
            log.info("job %s re-attached on node %s", job.id, self.node.id)
            self.runs[job.id] = run

    def _lost(self, exc):
        """The link to the node broke: follow every run again once it answers (each
        re-attached, queued again, or failed after ``unreachable_grace``).  The agent
        is let go even if it lives (a read it did not answer in time): one that stayed
        would keep the starts prepared there, which the server forgets here."""
        self._set_offline(str(exc))
        self.executor.close()
        running = {run.job.id: run.job for run in self.runs.values()}
        todo = [(job, None) for job in running.values()] + [
            (run.job, running.get(after)) for after, run in self.prepared.items()]
        self.runs.clear()
        self.prepared.clear()
        self._renewed = 0.0
        for job, after in todo:
            self._guarded(job, self._resume, job, after)

    def _reattach(self, job, after=None):
        """Find a job on its node again after a restart or an outage.

        Returns its Run, or None once the job is back in a queue (it never
        launched) or failed (its node stayed away past ``unreachable_grace``
        and past the job's own time limit).  A prepared job may have started
        while its node was away (its agent starts it when ``after`` ends, within
        its lease), so it is never run elsewhere before its node says it did not;
        its limit counts from the latest end of ``after``.
        """
        limit_end = (job.started_at or time.time()) + self.config.time_limit(job.expected_time)
        if job.prepared and after is not None:
            limit_end = max(limit_end, (after.started_at or time.time()) + self.config.time_limit(
                after.expected_time) + self.config.kill_grace + self.config.time_limit(
                job.expected_time))
        give_up = max(limit_end, time.time()) + self.config.unreachable_grace
        what = "since the job was made ready to start there (it may have started)" \
            if job.prepared else "while the job ran"
        backoff = 1.0
        while True:
            try:
                run = self.executor.reattach(job, self.spool.folder(job), self.wake.set)
                break
            except NodeError as exc:
                self._set_offline(str(exc))
                if time.time() > give_up:
                    self._record(job, Outcome("failed", error=f"node {self.node.id} "
                                              f"unreachable {what}: {exc}"))
                    return None
            self.wake.wait(backoff)
            self.wake.clear()
            backoff = min(backoff * 2, SSH_MAX_BACKOFF)
        if run is None:
            log.info("job %s never launched: queued again", job.id)
            self.spool.requeue(job)
            if not self.online:
                self._shed()
        else:
            self._set_online()  # it answered
        return run

    def _pass_cancels(self):
        """Cancels to the node: a running job's wrapper kills it; a prepared start is
        dropped (as is every one while the node is drained)."""
        for run in self.runs.values():
            if run.job.cancel_requested and not run.cancel_sent and not run.exited.is_set():
                self.executor.cancel(run)
                run.cancel_sent = True
        drained = self.prepared and self.spool.is_drained(self.node.id)
        for run in self.prepared.values():
            if (run.job.cancel_requested or drained or run.job.id in self.asked_back) \
                    and not run.cancel_sent and run.wrapper_pid is not None:
                self.executor.drop(run)
                run.cancel_sent = True

    def _reap(self):
        """Record every run that has ended; NodeError when a link broke under one."""
        for job_id, run in list(self.runs.items()):
            if run.exited.is_set():
                outcome = self.executor.collect(run)
                del self.runs[job_id]
                self._guarded(run.job, self._settle, run, outcome)

    def _settle(self, run, outcome):
        """Record how a run ended; its files are brought back beside the scheduler."""
        if run.work is None:  # an old release's local run: it left no files to bring
            self._record(run.job, outcome)
            return
        at = NodeFiles.outputs(run.work, bool(run.job.entrypoint))
        if run.report.get("files") is False:  # it left none: nothing to bring back
            if self._record(run.job, dataclasses.replace(outcome, outputs="complete")):
                with contextlib.suppress(NodeError):
                    self.executor.remove_folder(run.work)
                return
        elif self._record(run.job, dataclasses.replace(outcome, outputs_at=at)):
            self.collector.add(run.job.id, at)
            return
        try:  # queued again: its next attempt may start elsewhere
            self.executor.link.guard(self.executor.link.remove, run.work)
        except NodeError as exc:
            log.warning("job %s: its folder on node %s stays: %s", run.job.id, self.node.id,
                        exc)

    # -- GPUs ------------------------------------------------------------------

    def take_gpu_reading(self):
        """Read the node's GPUs (from its telemetry thread), and from the reading
        which GPUs are used outside the queue; a change wakes the scheduler.  No
        reading (nvidia-smi failed, hung or wrote garbage; the node did not answer)
        is recorded with the reason, and marks no GPU used outside the queue."""
        state = self.spool.node_state(self.node.id)
        held = {g for job in state.running for g in self.assigned(job)}
        error = None
        try:
            raw = self.executor.gpu_reading()
        except NodeError as exc:
            raw, error = None, f"no reading: {exc}"
        if isinstance(raw, dict) and raw.get("error"):
            raw, error = None, f"no reading: {raw['error']}"
        if raw and self.node.kind == "ssh" and self.node.gpus_from != "config":
            self._found_gpus(raw)
        reading = gpus_from_reading(raw, self.node.gpus, self.config.foreign_memory_mib, held)
        if raw and not reading:
            error = (f"no reading: nvidia-smi's answer lists none of the node's GPUs "
                     f"({','.join(self.node.gpus)})")
        foreign = {g["device"]: g["foreign"] for g in reading if g["foreign"]}
        before = self.spool.set_gpus(self.node.id, reading, foreign, error)
        if error and error != state.reading_error:
            log.warning("node %s: %s", self.node.id, error)
        if foreign != before:
            for device in foreign.keys() - before.keys():
                log.warning("node %s: GPU %s is %s; it takes no new job until that ends",
                            self.node.id, device, foreign[device])
            for device in before.keys() - foreign.keys():
                log.info("node %s: GPU %s is no longer used outside the queue", self.node.id,
                         device)
            self.wake.set()

    def _found_gpus(self, raw):
        """An SSH node whose config names no GPUs has the ones its nvidia-smi lists
        (CUDA_VISIBLE_DEVICES counts them in the same order, PCI_BUS_ID)."""
        found = []
        for line in (raw.get("csv") or "").splitlines():
            index = line.split(",")[0].strip()
            if index.isdigit() and index not in found:
                found.append(index)
        if found and tuple(found) != self.node.gpus:
            log.info("node %s: its nvidia-smi lists GPU %s", self.node.id, ",".join(found))
            self.node = dataclasses.replace(self.node, gpus=tuple(found), gpus_from="nvidia-smi")
            self.executor.node = self.node
            self.spool.set_gpu_count(self.node.id, len(found))
            self.wake.set()

    def why_waiting(self, job, state):
        if not self.online or state.drained or not self.has(job):
            return super().why_waiting(job, state)
        n, holding = self.node.id, state.holding
        because = "".join(f"; GPU {d} is {why}" for d, why in state.foreign.items())
        if holding and holding.job_id == job.id:
            return (f"node {n} keeps GPU {','.join(holding.gpus)} for it; it starts by "
                    f"{isotime(holding.by)} at the latest{because}")
        free = len(self.free_gpus(state))
        if free < job.gpus:
            return f"it needs {job.gpus} GPU(s); {free} of node {n}'s {len(self.node.gpus)} " \
                   f"are free{because}"
        return f"jobs ahead of it start first{because}"

    def gpu_slots(self, state):
        """Each GPU of the node: busy (and the job on it), held for a big job, used
        outside the queue, or free."""
        on = {g: job.id for job in state.running if not (job.prepared or job.followed)
              for g in self.assigned(job)}  # the job that runs there: not the one to
        #                                     follow it, nor one that was followed
        holding = state.holding
        return [{"gpu": g, "job": on.get(g),
                 "state": ("busy" if g in on else "foreign" if g in state.foreign
                           else "held" if holding and g in holding.gpus else "free")}
                for g in self.node.gpus]

    def info(self, state):
        info = super().info(state)
        info["running_jobs"] = [j.id for j in state.running
                                if not (j.prepared or j.followed)]
        info["running_job"] = info["running_jobs"][0] if info["running_jobs"] else None
        info["prepared_jobs"] = [j.id for j in state.running if j.prepared]
        info["gpu_slots"] = self.gpu_slots(state)
        info["gpus_from"] = self.node.gpus_from
        if state.holding:
            info["holding"] = {"job_id": state.holding.job_id, "gpus": list(state.holding.gpus),
                               "until": isotime(state.holding.by)}
        if state.reading:
            info["gpus"] = list(state.reading)
        info["gpu_error"] = state.reading_error
        return info

    def watch_gpus(self):
        """This node's GPU readings, in a thread of its own, so that one node's slow
        reading never delays another's: every GPU_BUSY_REFRESH seconds while jobs
        wait and the node has GPUs that no job holds (free, or used outside the
        queue), else every GPU_REFRESH; soon after a failed one, and as soon as the
        node is back.  A node without nvidia-smi simply shows none."""
        last, wait = -math.inf, 0.0
        while True:
            if not self.online:
                wait = 0.0  # read again as soon as it is back
            elif self.spool.counts()[0] and any(
                    slot["state"] != "busy" for slot in self.gpu_slots(
                        self.spool.node_state(self.node.id))):
                wait = min(wait, GPU_BUSY_REFRESH)
            if self.online and time.monotonic() - last >= wait:
                last = time.monotonic()
                try:
                    self.take_gpu_reading()
                    wait = GPU_REFRESH if not self.spool.node_state(
                        self.node.id).reading_error else GPU_RETRY
                except Exception:
                    log.exception("node %s: reading its GPUs failed", self.node.id)
                    wait = GPU_REFRESH
            time.sleep(1)  # a clock for readings that are due, not a wait for an event


#: Seconds between looks at a Slurm node's jobs (submit and cancel wake it at once).
SLURM_POLL = 2


class SlurmWorker(Worker):
    """A Slurm cluster as one node: it hands up to ``max_jobs`` jobs at a time to
    sbatch and lets Slurm decide when and where each runs.  Every SLURM_POLL
    seconds (and at once when woken) it asks squeue about them, passes cancels
    on to scancel, and records the ones that ended.

    A job's Slurm id is recorded in ``slurm.json`` in its folder once sbatch
    answers.  A claimed job without one (a crash or a lost link right around
    sbatch) is looked up by its attempt's name (slurm_name) before anything is sent again,
    so it never becomes two Slurm jobs.  Every step's _recover settles the jobs
    found running.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.counts = {}  # Slurm's pending and running counts of our jobs, at the last look

    def _step(self):
        if not self.online:
            self._bring_online()
        self.wake.clear()
        try:
            self._recover()
            self._fill()
            self._poll()
        except NodeError as exc:
            self._set_offline(str(exc))
            return
        self.wake.wait(SLURM_POLL)

    def _job_step(self, step, job):
        """Like _guarded, but a NodeError goes up: the node is away, the job waits."""
        try:
            step(job)
        except NodeError:
            raise
        except Exception as exc:
            self._failed_inside(job, exc)

    def _fill(self):
        while len(self.spool.running_on(self.node.id)) < self.node.slurm["max_jobs"]:
            job = self.spool.claim(self.node.id, self.choose)
            if job is None:
                return
            self._job_step(self._submit, job)

    def choose(self, candidates, states):
        """Slurm places jobs on GPUs itself: the first job in turn that this node's
        GPUs are enough for and that its own node could not start now."""
        room = self._rooms(states)
        for seen, (job, n) in enumerate(candidates):
            if seen == CLAIM_DEPTH:
                break
            if n != self.node.id and self.peers[n].could_start(job, room):
                continue
            if job.gpus <= len(self.node.gpus) and self.has(job):
                return (job, n, ()), None
        return None, None

    def room(self, state):
        """Jobs it may still hand to Slurm; none while drained."""
        return 0 if state.drained else self.node.slurm["max_jobs"] - len(state.running)

    def cost(self, job):
        return 1  # one of max_jobs

    def _submit(self, job):
        if job.cancel_requested:
            self._record(job, Outcome("cancelled", error="cancelled before it started"))
            return
        try:
            slurm_id = self.executor.submit(job, self.spool.folder(job))
        except SlurmRefused as exc:
            self._record(job, Outcome("failed", error=f"sbatch refused the job: {exc}"))
            return
        except DiskFull as exc:
            self.spool.requeue(job)  # nothing reached sbatch: it waits for room
            self._no_room(exc)
            return
        self._note_slurm_id(job, slurm_id)
        self.started += 1
        self.dispatch.observe(time.time() - job.started_at)
        log.info("job %s user=%s node=%s is Slurm job %s", job.id, job.user_id, self.node.id, slurm_id)

    def _note_slurm_id(self, job, slurm_id):
        self.spool.folder(job).record_slurm(slurm_id)
        self.spool.note_slurm(job, id=slurm_id, state="PENDING", reason=None, exit_code=0,
                              scancel_sent=False)

    def _recover(self):
        """Settle claimed jobs with no Slurm id in memory: read slurm.json, else
        ask Slurm by name, else queue the job again (it never reached Slurm)."""
        asked = []
        for job in self.spool.running_on(self.node.id):
            if job.slurm is None:
                slurm_id = self.spool.folder(job).slurm_id()
                if slurm_id is None:
                    asked.append(job)
                else:
                    self._note_slurm_id(job, slurm_id)
        found = self.executor.states(asked) if asked else {}
        for job in asked:
            if job.id in found:
                self._note_slurm_id(job, found[job.id][0])
                log.info("job %s found again in Slurm as job %s", job.id, found[job.id][0])
            elif self.spool.folder(job).launched_where() is not None and self.executor.ran(job):
                self._end(job, Outcome("failed", error="Slurm ran the job but no longer "
                                                       "knows how it ended"))
            else:
                self.spool.requeue(job)
                log.info("job %s never reached Slurm: queued again", job.id)

    def _poll(self):
        jobs = [j for j in self.spool.running_on(self.node.id) if j.slurm is not None]
        cancel = [j for j in jobs if j.cancel_requested and not j.slurm["scancel_sent"]]
        if cancel:
            self.executor.cancel([j.slurm["id"] for j in cancel])
            for j in cancel:
                self.spool.note_slurm(j, scancel_sent=True)
        found = self.executor.states(jobs) if jobs else {}
        self.counts = collections.Counter("pending" if st in SLURM_WAITING else "running"
                                          for _, st, _, _ in found.values() if st in SLURM_ACTIVE)
        for job in jobs:
            if job.id in found:
                _, state, reason, exit_code = found[job.id]
            else:  # the controller forgot it (MinJobAge): accounting may remember
                known = self.executor.accounting(job.slurm["id"])
                if known is None:
                    self._job_step(self._forgotten, job)
                    continue
                state, reason, exit_code = known
            self.spool.note_slurm(job, state=state, exit_code=exit_code,
                                  reason=None if reason in ("", "None") else reason)
            if state not in SLURM_ACTIVE:
                self._job_step(self._finish, job)

    def _forgotten(self, job):
        self._end(job, Outcome("failed", error=f"Slurm no longer knows job {job.slurm['id']}, "
                                               "and keeps no accounting"))

    def _finish(self, job):
        """How Slurm says the job ended, in gpuqueue's terms; Slurm's reason in ``error``."""
        state, reason, code = job.slurm["state"], job.slurm["reason"], job.slurm["exit_code"]
        because = f" (Slurm: {reason})" if reason and reason != "NonZeroExitCode" else ""
        if state == "COMPLETED":
            self._end(job, Outcome("completed", 0))
        elif state == "CANCELLED" and job.cancel_requested:
            self._end(job, Outcome("cancelled", error="cancelled while in Slurm"))
        elif state == "TIMEOUT":
            self._end(job, Outcome("failed", code, "timeout"))
        elif state == "FAILED":
            self._end(job, Outcome("failed", code, (describe_exit(code)[1] or "exit code 0")
                                   + because))
        else:  # CANCELLED by someone else, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED...
            self._end(job, Outcome("failed", code, f"Slurm: {state}{because}"))

    def _end(self, job, outcome):
        """Record a job Slurm is done with, its output read from the shared folder;
        its files are brought back from there beside the scheduler."""
        at = NodeFiles.outputs(job.id, bool(job.entrypoint))
        if self._record(job, dataclasses.replace(outcome, streams=self.executor.streams(job),
                                                 outputs_at=at)):
            self.collector.add(job.id, at)

    def why_waiting(self, job, state):
        if self.online and not state.drained and self.room(state) <= 0:
            return (f"node {self.node.id} has {len(state.running)} jobs in Slurm, the most it "
                    "hands over at once")
        return super().why_waiting(job, state)

    def info(self, state):
        info = super().info(state)
        info["slurm"] = {"pending": self.counts.get("pending", 0),
                         "running": self.counts.get("running", 0)}
        return info


###############################################################################
# Background threads ##########################################################
###############################################################################


def _thread(name, target):
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


#: Seconds between the supervisor's looks at gpuqueue's threads.
SUPERVISE_INTERVAL = 5


def _supervise(running, targets):
    """Restart any of gpuqueue's threads that ended (none should: each catches what
    goes wrong in a step), and say so in the log."""
    while True:
        time.sleep(SUPERVISE_INTERVAL)  # a thread's end sets no event to wait on
        for name, thread in list(running.items()):
            if not thread.is_alive():
                log.error("thread %s ended; starting it again", name)
                running[name] = _thread(name, targets[name])


#: Seconds between looks for finished jobs past ``keep_finished_days``, at most.
RETENTION_SWEEP = 3600


def keep_finished(spool, days):
    """The thread that removes finished jobs and quarantined folders older than
    ``keep_finished_days``: done/ would otherwise grow forever.  It looks hourly,
    or more often when what is kept is short."""
    keep = days * 86400
    while True:
        try:
            jobs, quarantined = spool.expire(time.time() - keep)
            spool.expire_keys()
        except OSError as exc:
            log.error("removing old finished jobs failed (tried again later): %s", exc)
        else:
            if jobs or quarantined:
                log.info("removed %d finished job(s) and %d quarantined item(s) older than "
                         "%g day(s)", jobs, quarantined, days)
        time.sleep(min(RETENTION_SWEEP, max(1.0, keep / 4)))  # a clock, not an event


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is, never followed: a notice goes where it was
    allowed to, and a client's token to the server it names, and nowhere else."""

    def redirect_request(self, *args):
        return None


def send_notices(spool, webhooks):
    """The thread that hands the outbox's notices to senders: one thread per
    receiving host at a time, which sends that host's due notices one by one, so
    that a slow or silent receiver delays its own notices and no one else's.  A
    receiver that is down is tried again with backoff (Spool.notice_tried)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    senders = {}  # receiving host -> the thread sending its notices now
    while True:
        # The hosts with a sender at work, before the outbox is read: what it reads
        # for the others is what no sender can have delivered meanwhile.
        busy = {host for host, sender in senders.items() if sender.is_alive()}
        due, wait = spool.notices_due()
        hosts = collections.defaultdict(list)
        for job_id, notice in due:
            hosts[urllib.parse.urlsplit(notice["url"]).netloc.lower()].append((job_id, notice))
        for host, notices in hosts.items():
            if host not in busy:
                senders[host] = _thread(f"notices {host}", functools.partial(
                    _send_notices, spool, webhooks, opener, notices))
        # A sender that ends wakes this thread: what its host has due next goes then.
        spool.wait_for_notices(60 if wait is None else min(wait, 60))


def _send_notices(spool, webhooks, opener, notices):
    """Send some notices to one host: each POSTed with its HMAC-SHA256 signature, no
    proxy, no redirect followed, NOTICE_TIMEOUT seconds for the whole try (a
    receiver that trickles its answer is cut off too)."""
    for job_id, notice in notices:
        body = json.dumps(notice["body"], sort_keys=True).encode()
        signature = hmac.new(webhooks.secret, body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(notice["url"], data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"gpuqueue/{__version__}",
            "X-Gpuqueue-Signature": f"sha256={signature}"})
        end = time.monotonic() + NOTICE_TIMEOUT
        try:
            with opener.open(request, timeout=NOTICE_TIMEOUT) as r:
                got = 0
                while got < 65536 and (piece := r.read1(4096)):
                    got += len(piece)
                    if time.monotonic() > end:
                        raise TimeoutError(f"the answer took more than {NOTICE_TIMEOUT:g} s")
            spool.notice_delivered(job_id, notice)
        except urllib.error.HTTPError as exc:
            spool.notice_tried(job_id, notice, f"HTTP {exc.code}")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            spool.notice_tried(job_id, notice, str(getattr(exc, "reason", exc))[:200])
    spool.notices_changed()


###############################################################################
# Scheduler ###################################################################
###############################################################################

#: Seconds a new server waits for its local nodes' agents before it announces itself.
LOCAL_START_TIMEOUT = 10

#: What a job's status record carries beside its own fields (Scheduler.shown).
SHOWN_BESIDE = {
    "time_limit": {"type": "number", "description": "seconds it may run before it is killed"},
    "queue_position": {"type": "integer", "nullable": True, "minimum": 0,
                       "description": "while pending: jobs ahead of it on its node; 0 is next"},
    "estimated_start": {"type": "string", "format": "date-time", "nullable": True},
    "waiting": {"type": "string", "description": "while pending: why it has not started yet"},
}


def _run_as(node):
    """The pwd entry of a local node's ``run_as`` user, or None; ConfigError when it
    cannot be used."""
    if node.run_as is None:
        return None
    if os.getuid() != 0:
        raise ConfigError(f"node {node.id}: 'run_as' needs the server to run as root, to "
                          "start jobs as another user")
    try:
        user = pwd.getpwnam(node.run_as)
    except KeyError:
        raise ConfigError(f"node {node.id}: 'run_as': no user {node.run_as!r}") from None
    if user.pw_uid == 0:
        raise ConfigError(f"node {node.id}: 'run_as' must name a user other than root")
    return user


@contextlib.contextmanager
def _node_file(link, rel, slot):
    """A running job's file on its node, opened beside the node's scheduler, while
    it holds one of the node reads (``slot``)."""
    try:
        with slot(), link.side() as side, side.open_file(rel) as f:
            yield f
    except NodeError as exc:
        raise Unavailable(f"cannot read the job's file now: {exc}") from None


#: Reads of nodes (a running job's output or files) that HTTP threads may wait on at
#: once, of waitress's HTTP_THREADS.
NODE_READERS = 4

#: What a submit queued: the job (an array's first), its place, whether the answer is
#: a former one's (Idempotency-Key), and for an array {array_id, job_ids}.
Submitted = collections.namedtuple("Submitted", "job position start replayed array")


class Scheduler:
    """The front door: everything the HTTP API, drop folders and admin control
    may ask of the queue (submit, look, cancel, read output, drain, figures).  It
    alone reaches the spool and the node workers; none of its callers do, and
    none of them needs to know who else calls.  What it hands out are copies
    (Spool.get) and plain values.

    With ``serving`` false (an admin command while no server runs) there are no
    node workers: requests act on the spool alone.
    """

    def __init__(self, config, spool, tokens=None, serving=True):
        self.config = config
        self._spool = spool
        self._tokens = tokens
        self._throttle = AuthThrottle(config.auth_failures_per_minute)
        #: Submits with the same Idempotency-Key go one at a time (striped by key).
        self._key_locks = [threading.Lock() for _ in range(64)]
        self._node_reads = threading.BoundedSemaphore(NODE_READERS)
        self._workers = {}
        #: Which starving node a submit wakes next (_enqueue): they take turns.
        self._starving_turn = itertools.count()
        self.serving = serving
        spool.call_when_ready(self._ready)
        if serving:
            kinds = {"local": GpuWorker, "ssh": GpuWorker, "slurm": SlurmWorker}
            for n in config.nodes:
                self._workers[n.id] = kinds[n.kind](n, spool, self._executor(n), config,
                                                    self._workers)
            if any(n.run_as for n in config.nodes):
                spool.close_to_others()
                for path in (config.source, config.tokens):  # no job may read or change them
                    if path is not None and path.exists() and path.stat().st_mode & 0o077:
                        os.chmod(path, path.stat().st_mode & 0o700)
                        log.warning("%s made readable by its owner alone ('run_as' is set)", path)

    def _nodes(self):
        """Every node as its worker knows it now (its GPUs found on it), else as the
        config says."""
        return [self._workers[n.id].node if n.id in self._workers else n
                for n in self.config.nodes]

    def _executor(self, node):
        if node.kind == "local":
            root = (Path(node.workdir).expanduser() if node.workdir
                    else self._spool.work_dir(node.id))
            return AgentExecutor(node, self.config, LocalLink(node, root, _run_as(node)))
        if node.kind == "ssh":
            return AgentExecutor(node, self.config, SshLink(node, self.config))
        return SlurmExecutor(node, self.config, SshLink(node, self.config))

    def start(self, *loops):
        """Start every node's scheduler thread, the GPU telemetry and ``loops`` ((name,
        function) pairs that run forever), each kept alive by a supervisor thread.
        Returns once the local nodes' agents are up (a moment), so that a new
        server shows them online."""
        threads = {f"node-{n}": w.run for n, w in self._workers.items()}
        threads.update({f"collect-{n}": w.collector.run for n, w in self._workers.items()})
        threads.update({f"gpus-{n}": w.watch_gpus for n, w in self._workers.items()
                        if isinstance(w, GpuWorker)}, **dict(loops))
        if self.config.keep_finished_days:
            threads["retention"] = functools.partial(keep_finished, self._spool,
                                                     self.config.keep_finished_days)
        if self.config.webhooks:
            threads["notices"] = functools.partial(send_notices, self._spool,
                                                   self.config.webhooks)
        running = {name: _thread(name, target) for name, target in threads.items()}
        _thread("supervisor", functools.partial(_supervise, running, threads))
        deadline = time.monotonic() + LOCAL_START_TIMEOUT
        for w in self._workers.values():
            if w.node.is_local:
                w.settled.wait(max(0.0, deadline - time.monotonic()))

    def _ready(self, node_id):
        """A job of this node stopped waiting for others (called under the spool's lock:
        it only sets an event)."""
        if node_id in self._workers:
            self._workers[node_id].wake.set()

    def _wake(self, node_ids):
        for n in node_ids:
            if n in self._workers:
                self._workers[n].wake.set()

    def incoming_dir(self):
        return self._spool.incoming_dir()

    def claims_dir(self):
        return self._spool.claims_dir()

    def scratch_dir(self, name):
        return self._spool.scratch_dir(name)

    def control_dir(self):
        return self._spool.control_dir()

    def quarantine(self, path, reason):
        """Set aside what a front end cannot understand (a control request), in
        corrupt/ with the reason beside it: never carried out, never deleted."""
        self._spool.quarantine(path, reason)

    # -- who -----------------------------------------------------------------

    def authenticate(self, token, source):
        """The token's record; Unauthorized for a bad token, TooMany for a source
        that keeps trying."""
        self._throttle.check(source, token)
        try:
            return self._tokens.authenticate(token)
        except Unauthorized as exc:
            if exc.guess:
                self._throttle.failed(source, token)
            raise

    # -- jobs ----------------------------------------------------------------

    def submit(self, code, config_data, user=None, source="incoming", job_id=None,
               idempotency_key=None):
        """Check a job (script bytes, config.yaml bytes) and queue it durably: the one
        way in for uploads and dropped folders alike.  ``user`` is the caller's token
        record when it was already checked; else the config's ``token`` is.
        ``idempotency_key``: the request's Idempotency-Key.  (job, position, start,
        replayed: whether this answer is a former one's, and nothing was queued)."""
        kind = archive_kind(code[:512])
        if kind is None:
            if not code.strip():
                raise BadRequest("code is empty")
            try:
                code.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("code must be UTF-8 text, or a project: a tar or zip "
                                 "archive") from None
        cfg = parse_job_config(config_data, self.config)
        if kind is None and "entrypoint" in cfg:
            raise BadRequest("config_file: 'entrypoint' names the script inside a project, "
                             "but code is a single script, not an archive")
        if user is None:
            user = self.authenticate(cfg.get("token"), source)
        if cfg["user_id"] != user["user"] and not user["admin"]:
            raise Forbidden(f"user_id in config_file is {cfg['user_id']!r}, but the token is "
                            f"{user['user']!r}'s: set user_id to {user['user']!r} (only an "
                            "admin's token submits for others)")
        for key, spec in JOB_KEYS.items():
            if spec["below"] is not None and cfg.get(key, 0) > spec["below"] and not user["admin"]:
                raise Forbidden(f"only an admin may give a job a {key} above {spec['below']}")
        able = self._able(cfg.get("environment"))
        most = max(len(n.gpus) for n in self._nodes() if able is None or n.id in able)
        if cfg.get("gpus", 1) > most:
            raise BadRequest(f"config_file: 'gpus' is {cfg['gpus']}, but no node has more "
                             f"than {most}")
        if kind is not None:  # checked whole before anything is written
            cfg["entrypoint"] = self._check_project(code, kind, cfg.get("entrypoint"))
        ended = self._dependencies(cfg, user)
        if "notify" in cfg:
            hooks = self.config.webhooks
            if hooks is None:
                raise BadRequest("config_file: 'notify': this server sends no notices (its "
                                 "config has no webhooks)")
            if not url_allowed(cfg["notify"], hooks.allow):
                raise BadRequest("config_file: 'notify' must be an http(s) URL under one of "
                                 f"{', '.join(hooks.allow)}")
        if idempotency_key is not None:
            key = idempotency_key
            with self._key_locks[hash((user["user"], key)) % len(self._key_locks)]:
                return self._submit_once(code, config_data, cfg, user, key, (able, ended))
        return self._queue(code, config_data, cfg, job_id, (able, ended))

    def _submit_once(self, code, config_data, cfg, user, key, placing):
        """A submit with an Idempotency-Key: the same key from the same user within
        KEY_TTL answers as the first did and queues nothing; with another request it
        is refused.  The job's id is kept with the key before the job is queued, so a
        crash in between never queues it twice: the retry queues it under that id."""
        if not KEY_RE.match(key):
            raise BadRequest("Idempotency-Key must be 1-255 printable characters")
        digest = hashlib.sha256(code + b"\0" + config_data).hexdigest()
        record = self._spool.key_record(user["user"], key)
        if record is not None and record.get("request") != digest:
            raise KeyReused("this Idempotency-Key was sent with a different job; use a new "
                            "key for a new job")
        if record is not None and "answer" in record:
            a = record["answer"]
            job = self._spool.get(a["job_id"])
            if job is None and a.get("array"):  # its first job removed, maybe not the rest
                job = next(filter(None, map(self._spool.get, a["array"]["job_ids"])), None)
            if job is None:  # (never queued again: it ran once)
                raise Conflict("what this Idempotency-Key submitted has ended and been removed "
                               "(keep_finished_days); send a new key to submit it again")
            return Submitted(job, a["queue_position"], a["estimated_start"], True,
                             a.get("array"))
        job_id = record["job_id"] if record is not None else new_job_id()
        if record is None:  # the id is kept before the job is queued
            self._spool.remember_key(user["user"], key, {"request": digest, "job_id": job_id,
                                                         "at": time.time()})
        done = self._spool.get(job_id) or self._spool.array(job_id)
        if done is None:  # (else a cut-short first try queued it already)
            done = self._queue(code, config_data, cfg, job_id, placing)
        elif isinstance(done, Job):
            done = Submitted(done, *self._spool.queue_position(done), False, None)
        else:
            done = Submitted(self._spool.get(done["job_ids"][0]), None, None, False,
                             {"array_id": job_id, "job_ids": done["job_ids"]})
        self._spool.remember_key(user["user"], key, {
            "request": digest, "job_id": job_id, "at": time.time(),
            "answer": {"job_id": done.job.id, "queue_position": done.position,
                       "estimated_start": done.start, "array": done.array}})
        return done

    def _queue(self, code, config_data, cfg, job_id, placing):
        """Queue a checked job, or the array it makes (``job_id``: its id, when it has
        one already)."""
        if "array" not in cfg and "sweep" not in cfg:
            return Submitted(*self._enqueue(code, config_data, cfg, job_id, placing),
                             False, None)
        if "array" in cfg and "sweep" in cfg:
            raise BadRequest("config_file: give 'array' or 'sweep', not both")
        indexes, limit = cfg.pop("array", (None, None))
        sweep = cfg.pop("sweep", None)
        if sweep is not None:
            indexes = range(len(sweep))
        array_id = job_id or new_job_id()
        now = time.time()
        jobs = [Job(id=new_job_id(), submitted_at=now, node_id=-1, array_id=array_id,
                    array_index=index, array_size=len(indexes), array_limit=limit,
                    params=sweep[i] if sweep is not None else None,
                    **{k: cfg[k] for k in JOB_KEYS if k in cfg and k != "token"})
                for i, index in enumerate(indexes)]
        self._spool.admit(len(code) + len(config_data) * len(jobs), self.config.min_free_bytes)
        base = self._spool.stage_array(array_id, jobs, code, self._stored_config(cfg, config_data))
        able, ended = placing
        online = {n for n, w in self._workers.items() if w.online}
        self._spool.enqueue_array(array_id, jobs, base, online, self.config.max_pending_per_user,
                                  able, ended)
        self._wake(self._workers)
        log.info("array %s user=%s: %d jobs pending", array_id, jobs[0].user_id, len(jobs))
        self._spool.cancel_doomed()
        return Submitted(jobs[0], None, None, False,
                         {"array_id": array_id, "job_ids": [j.id for j in jobs]})

    @staticmethod
    def _stored_config(cfg, config_data):
        """config.yaml as it is kept: as uploaded, but never with the token."""
        if "token" not in cfg:
            return config_data
        kept = {k: cfg[k] for k in JOB_KEYS if k in cfg and k != "token"}
        return ("# token removed by gpuqueue\n" + yaml.safe_dump(kept)).encode()

    def _enqueue(self, code, config_data, cfg, job_id, placing):
        """Stage and queue a checked job: (job, position, start).  ``placing``: the
        nodes that can run it (None: any) and its dependencies' statuses."""
        able, ended = placing
        self._spool.admit(len(code) + len(config_data), self.config.min_free_bytes)
        job = Job(id=job_id or new_job_id(), submitted_at=time.time(), node_id=-1,
                  **{k: cfg[k] for k in JOB_KEYS if k in cfg and k != "token"})
        staged = self._spool.stage(job, code, self._stored_config(cfg, config_data))
        online = {n for n, w in self._workers.items() if w.online}
        position, start = self._spool.enqueue(job, staged, online,
                                              self.config.max_pending_per_user, able, ended)
        # One node that may start a job now is enough (it takes the first in turn): its
        # own, else another with room; else one whose running job has no successor
        # prepared (``starving``), in turns, so that a burst of submits spreads over
        # them; those that hold GPUs for a job and have some free, which may fit it
        # beside; and those that prepared a job it may come ahead of in turn.  A busy
        # node looks for itself when one of its jobs ends.
        states = self._spool.node_states()
        fits = [n for n, w in self._workers.items() if w.online and w.has(job)
                and job.gpus <= len(w.node.gpus) and w.room(states[n]) >= w.cost(job)]
        first = [job.node_id] if job.node_id in fits else fits[:1]
        if not first and (starving := [
                n for n, w in self._workers.items() if getattr(w, "starving", False)
                and w.online and w.has(job) and job.gpus <= len(w.node.gpus)]):
            first = [starving[next(self._starving_turn) % len(starving)]]
        self._wake({*first, *(n for n, w in self._workers.items() if w.prepared_behind(job)
                              or states[n].holding and w.free_gpus(states[n]))})
        log.info("job %s user=%s node=%s pending", job.id, job.user_id, job.node_id)
        self._spool.cancel_doomed()  # it needed a job that had failed already
        return job, position, start

    def _dependencies(self, cfg, user):
        """The statuses of a new job's dependencies that have ended, by id; NotFound
        for one the caller may not see (someone else's, unless an admin's) or that
        does not exist.  A job can only wait for jobs that exist before it, so no
        cycle can arise.  An array's id stands for all its jobs."""
        for key in ("after", "after_any"):
            for dep in list(cfg.get(key) or ()):
                try:
                    self.job(dep, user)
                except NotFound:
                    with contextlib.suppress(NotFound):
                        cfg[key] = sorted(set(cfg[key]) - {dep}
                                          | set(self.array(dep, user, counts=False)["job_ids"]))
        deps = set(cfg.get("after") or ()) | set(cfg.get("after_any") or ())
        if len(deps) > MAX_DEPENDENCIES:
            raise BadRequest(f"config_file: a job may wait for at most {MAX_DEPENDENCIES} "
                             "jobs")
        ended = {}
        for dep in sorted(deps):
            try:
                found = self.job(dep, user)
            except NotFound:
                raise NotFound(f"config_file: no such job {dep!r} to wait for") from None
            if found.status in FINAL_STATES:
                ended[dep] = found.status
        return ended

    def _able(self, environment):
        """The nodes that have ``environment`` working (None: any node will do);
        BadRequest naming the environments there are when none has it."""
        if environment is None:
            return None
        names = ", ".join(self.config.environments) or "none are configured"
        if environment not in self.config.environments:
            raise BadRequest(f"config_file: environment {environment!r} is not one of the "
                             f"server's environments ({names})")
        nodes = {n.id for n in self.config.nodes if environment in n.environments}
        working = {n for n in nodes if n not in self._workers
                   or self._workers[n].executor.environments.get(environment) is None}
        if not working:
            why = ("no node has it" if not nodes else "it does not work on any node that has "
                   "it (GET /api/nodes says why)")
            raise BadRequest(f"config_file: environment {environment!r}: {why}; the "
                             f"environments: {names}")
        return working

    def _check_project(self, code, kind, entrypoint):
        """Read a project's archive through, as its node will unpack it, so that a
        bad one is refused now: its entry script, made plain; BadRequest naming the
        entry and the reason."""
        try:
            entry = _project_path(entrypoint or "main.py", set(), set())
        except ProjectRefused as exc:
            raise BadRequest(f"config_file: entrypoint {exc}") from None
        try:
            files = unpack_project(io.BytesIO(code), kind, None, self.config.max_project_bytes,
                                   self.config.max_project_files)
        except ProjectRefused as exc:
            raise BadRequest(f"code: {exc}") from None
        except Exception as exc:  # tarfile, zipfile and zlib each raise their own
            raise BadRequest(f"code: not a readable {kind} archive ({exc})") from None
        if entry not in files:
            scripts = sorted(f for f in files if f.endswith(".py"))[:5]
            raise BadRequest(f"config_file: entrypoint {entry!r} is not a file in the project"
                             + (f"; its scripts include {', '.join(scripts)}" if scripts
                                else "; it holds no .py file"))
        return entry

    def job(self, job_id, user=None):
        """A copy of the job if ``user`` (a token record; None: an admin) may see
        it; NotFound for an unknown, malformed or someone else's id alike."""
        job = self._spool.get(job_id) if isinstance(job_id, str) and JOB_ID_RE.match(job_id) \
            else None
        if job is None or not (user is None or user["admin"] or job.user_id == user["user"]):
            raise NotFound(f"no such job {job_id!r}" if user is None else "no such job")
        return job

    def queue_position(self, job):
        """(jobs ahead of it, estimated start) while it is pending, else (None, None)."""
        return self._spool.queue_position(job)

    def shown(self, job):
        """A job's public record, with what SHOWN_BESIDE declares: its time limit,
        and its place in the queue while it waits."""
        out = job.public()
        out["time_limit"] = self.config.time_limit(job.expected_time)
        if job.prepared and job.node_id in self._workers and \
                not self._workers[job.node_id].online:
            out["queue_position"], out["estimated_start"] = 0, None
            out["waiting"] = (f"ready on node {job.node_id}, which does not answer: it may "
                              "have started there, so it waits for the node to say")
        elif job.prepared:
            out["queue_position"], out["estimated_start"] = 0, None
            out["waiting"] = (f"ready on node {job.node_id}: it starts on GPU "
                              f"{','.join(job.gpu_ids)} as soon as the job there ends")
        elif job.status == "pending" and job.waiting_on:
            out["queue_position"], out["estimated_start"] = None, None
            out["waiting"] = (f"waiting for {len(job.waiting_on)} job(s) to end: "
                              + ", ".join(sorted(job.waiting_on)[:5])
                              + (" ..." if len(job.waiting_on) > 5 else ""))
        elif job.status == "pending":
            position, start = self._spool.queue_position(job)
            out["queue_position"], out["estimated_start"] = position, isotime(start)
            if job.node_id in self._workers:
                out["waiting"] = self._workers[job.node_id].why_waiting(
                    job, self._spool.node_state(job.node_id))
        return out

    def find(self, user=None, status=None, limit=100, before=None, among=None):
        return self._spool.find(user, status, limit, before, among)

    def array(self, array_id, user=None, counts=True):
        """An array's record (its user, its job ids) with the count of its jobs in each
        state, if ``user`` may see it; NotFound as for a job.  Not ``counts``: the
        record alone, for what needs only the ids (counting reads every job)."""
        record = self._spool.array(array_id) if isinstance(array_id, str) and \
            JOB_ID_RE.match(array_id) else None
        if record is None or not (user is None or user["admin"]
                                  or record["user_id"] == user["user"]):
            raise NotFound("no such array")
        if not counts:
            return record
        counts = dict.fromkeys(STATES, 0)
        for job_id in record["job_ids"]:
            job = self._spool.get(job_id)
            if job is not None:
                counts[job.shown_status] += 1
        return {**record, "counts": counts}

    def cancel_array(self, array_id, user=None):
        """Cancel every job of an array that has not finished: how many."""
        record = self.array(array_id, user, counts=False)
        cancelled = 0
        for job_id in reversed(record["job_ids"]):  # the last first: none starts meanwhile
            if self._spool.request_cancel(job_id, "its array was cancelled"):
                cancelled += 1
        self._wake(self._workers)
        return cancelled

    def output(self, job):
        """The paths of a finished job's streams, by name; Conflict while it has not
        finished."""
        if job.status in ("pending", "running"):
            raise Conflict(f"job is {job.status}; results are ready once it finishes")
        folder = self._spool.done_folder(job.id)
        return {s: folder.stream(s) for s in JobFolder.STREAMS}

    def answer(self, job, attempt=None):
        """GET /api/results's answer for a finished job (or an earlier ``attempt``'s
        of any job, kept when it was retried), as an open file: its record, then
        each stream as JSON text of at most twice output_limit_bytes (json_text).
        Conflict while the job has not finished; NotFound once it is gone."""
        most = 2 * self.config.output_limit_bytes
        for _ in range(3):  # an unfinished job's folder may move meanwhile
            if attempt is None:
                if job.status in ("pending", "running"):
                    raise Conflict(f"job is {job.status}; results are ready once it finishes")
                folder = self._spool.done_folder(job.id)
                head = {"job_id": job.id, "status": job.status, "exit_code": job.exit_code,
                        "error": job.error, **({"attempt": job.attempt} if job.attempt > 1
                                              else {})}
            else:
                folder = self._spool.folder_of(job.id)
                if not 1 <= attempt < job.attempt or folder is None:
                    raise NotFound(f"job {job.id} has no earlier attempt {attempt}")
                try:
                    r = read_json(folder.path / f"result.{attempt}.json")
                except (OSError, ValueError):
                    raise NotFound(f"job {job.id} has no earlier attempt {attempt}") from None
                head = {"job_id": job.id, "status": "failed", "exit_code": r["exit_code"],
                        "error": r["error"], "attempt": r["attempt"]}
            try:
                return folder.answer(head, most, attempt)
            except FileNotFoundError:
                job = self._spool.get(job.id)
                if job is None:
                    raise NotFound("the job was removed (keep_finished_days) meanwhile") from None
        raise Unavailable("the job changed state while its results were read; try again")

    def cancel(self, job):
        """Record a cancel and answer at once: a pending job is cancelled now; a running
        one is stopped by its node's worker meanwhile (``cancel_requested`` shows until
        it has ended), so no caller waits on a kill.  A job already being cancelled
        answers at once too; Conflict once the job has finished."""
        if not self._spool.request_cancel(job.id):
            raise Conflict(f"job {job.id} already {self._spool.get(job.id).status}")
        self._wake([job.node_id])
        return self._spool.get(job.id)

    def read_output(self, job, stream, offset, limit):
        """(up to ``limit`` bytes of a job's stream from ``offset``, the job as it was
        when they were read): from its node while it runs, else from the spool."""
        for _ in range(3):  # the job may finish, and its folder move, while we read
            job = self._spool.get(job.id)
            if job.status == "pending":
                return b"", job
            if job.status == "running":
                worker = self._workers.get(job.node_id)
                if worker is None:
                    raise Unavailable("the server is not running")
                try:
                    with self._node_read():
                        data = worker.executor.read_output(job, stream, offset, limit)
                except NodeError as exc:
                    raise Unavailable(f"cannot read the job's output now: {exc}") from None
                if self._spool.get(job.id).status == "running":
                    return data, job
                continue
            folder = self._spool.done_folder(job.id)
            try:
                with open(folder.stream(stream), "rb") as f:
                    f.seek(offset)
                    return f.read(limit), job
            except FileNotFoundError:
                if not folder.path.is_dir():
                    raise NotFound(f"job {job.id} was removed (keep_finished_days) while its "
                                   "output was read") from None
                return b"", job
        raise Unavailable("the job changed state while its output was read; try again")

    @contextlib.contextmanager
    def _node_read(self):
        """One of the NODE_READERS reads of a node that HTTP threads may wait on at
        once; Unavailable when all are taken (a stalled node cannot hold every
        thread)."""
        if not self._node_reads.acquire(blocking=False):
            raise Unavailable(f"{NODE_READERS} reads of nodes are under way; try again in a "
                              "moment")
        try:
            yield
        finally:
            self._node_reads.release()

    def outputs(self, job):
        """A job's files: (the listing GET /api/outputs shows; path -> (size, opener)
        of each file to send, ``opener()`` a context giving a binary reader).  While
        the job runs, what is on its node so far, read over the node's connection
        (no sha256 then); Conflict while it is pending."""
        if job.shown_status == "pending":  # (a prepared one too: it has not started)
            raise Conflict("job is pending; its files are listed once it runs")
        base = {"job_id": job.id, "skipped": [], "truncated": False, "cut": None, "error": None}
        if job.status == "running":
            worker = self._workers.get(job.node_id)
            if worker is None:
                raise Unavailable("the server is not running")
            at = NodeFiles.outputs(job.id, bool(job.entrypoint))
            link = worker.executor.link
            try:
                with self._node_read(), link.side() as side:
                    entries, more = side.list_tree(at, 2 * self.config.max_output_files + 100)
            except FileNotFoundError:
                entries, more = [], False
            except NodeError as exc:
                raise Unavailable(f"cannot read the job's files now: {exc}") from None
            files = [e for e in entries if e.kind == "file"]
            listing = dict(base, state="running", truncated=more,
                           files=[{"path": e.path, "size": e.size, "sha256": None}
                                  for e in files],
                           skipped=skipped_of(entries))
            return listing, {e.path: (e.size, functools.partial(
                _node_file, link, f"{at}/{e.path}", self._node_read)) for e in files}
        stored, folder = self._spool.outputs(job.id)
        if stored is None:
            return dict(base, state=job.outputs or "none", files=[]), {}
        return dict(base, **stored), {
            f["path"]: (f["size"], functools.partial(open, folder.output_file(f["path"]), "rb"))
            for f in stored["files"]}

    def wait_finished(self, job, timeout):
        return self._spool.wait_finished(job.id, timeout)

    def call_on_change(self, callback):
        """``callback(job id, status)`` as each job starts running ("running") or
        finishes (None); under the spool's lock: it must only take note."""
        self._spool.call_on_change(callback)

    def statuses(self, job_ids):
        """Each unfinished job's status as shown, by id (None once it finished)."""
        return self._spool.statuses(job_ids)

    def kept(self, job):
        """A context that keeps a finished job from retention while it is read."""
        return self._spool.kept(job.id)

    # -- nodes ---------------------------------------------------------------

    def nodes(self):
        """Every node: its worker's view (or, with no server, the spool's) and its
        queue, each from one NodeState."""
        stats, states = self._spool.node_stats(), self._spool.node_states()
        out = []
        for n in self.config.nodes:
            state = states[n.id]
            if n.id in self._workers:
                info = self._workers[n.id].info(state)
            else:
                info = {"id": n.id, "host": n.host, "state": "server not running",
                        "drained": state.drained, "error": None,
                        "running_job": state.running[0].id if state.running else None}
            out.append({**info, **stats[n.id]})
        return out

    def queue_length(self):
        return self._spool.counts()[0]

    def metrics(self):
        """The figures /metrics shows: every node as nodes() has it, with the jobs
        its worker started and those finished since the server started, and its
        dispatch histogram; and the pending and running jobs over all nodes."""
        finished = self._spool.finished_here()
        nodes = self.nodes()
        for n in nodes:
            w = self._workers[n["id"]]
            n.update(started=w.started, finished=finished[n["id"]], dispatch=w.dispatch)
        pending, running = self._spool.counts()
        return {"pending": pending, "running": running, "nodes": nodes}

    def drain(self, node, drained):
        """Drain a node (it starts nothing new; its pending jobs move on) or resume it;
        what happened, in words."""
        node_ids = self._spool.node_ids
        if type(node) is not int or node not in node_ids:
            raise NotFound(f"no node {node!r}; the nodes are {', '.join(map(str, node_ids))}")
        self._spool.set_drained(node, drained)
        if not drained:
            self._wake([node])
            return f"node {node} resumed"
        online = {n: w.has for n, w in self._workers.items() if w.online} \
            if self._workers else dict.fromkeys(node_ids, lambda job: True)
        moved = self._spool.move_pending(node, online)
        self._wake(moved)
        running = self._spool.node_state(node).running
        message = f"node {node} drained: it starts no new job"
        if running:
            message += f"; job {running[0].id} runs to its end"
        if moved:
            message += f"; its pending jobs moved to node(s) {', '.join(map(str, sorted(moved)))}"
        return message


###############################################################################
# HTTP API ####################################################################
###############################################################################

#: Bytes of output one /api/logs answer or follow line carries at most.
LOG_CHUNK = 64 * 1024
#: Bytes per piece when a job's file is sent.
FILE_CHUNK = 1024 * 1024
#: Seconds between looks at a followed job's output while it has nothing new.
LOG_POLL = 0.5
#: Seconds between the keep-alive spaces of a quiet follow, and between its checks
#: that its token is still good.
FOLLOW_KEEPALIVE = 2
#: Follows served at once (each holds one of waitress's 8 threads).
LOG_FOLLOWERS = 4
#: Tars of a job's files (?archive=tar) sent at once (each holds a thread too).
ARCHIVES = 2
#: Jobs on one page of /api/jobs unless ``limit`` says otherwise, and at most.
PAGE_DEFAULT = 100
PAGE_MAX = 1000


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
        raise BadRequest(f"missing multipart part {name!r}")
    if len(parts) > 1:
        raise BadRequest(f"multipart part {name!r} given more than once")
    part = parts[0]
    if isinstance(part, bottle.FileUpload):
        return part.file.read()
    return part.encode("latin-1")  # a plain field, which submit() had parsed as Latin-1


#: Status codes of the core's refusals (the most specific class listed wins).
HTTP_STATUS = {BadRequest: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404,
               Conflict: 409, KeyReused: 422, TooMany: 429, DiskFull: 507, Unavailable: 503}


class HttpError(GpuqueueError):
    """A refusal only HTTP has words for (411, 415...)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


#: Types a job's file is sent with, to be shown in a browser: text and pictures that
#: run no script (never HTML or SVG, which would run in the dashboard's origin).
SHOWN_INLINE = {".txt": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8",
                ".csv": "text/plain; charset=utf-8", ".json": "text/plain; charset=utf-8",
                ".yaml": "text/plain; charset=utf-8", ".png": "image/png",
                ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}


def tar_stream(files):
    """A tar of ``files`` (path -> (size, opener)), made as it is sent.  Each member
    is as long as its listing says: a file that grew is cut there, one that shrank
    (or went) is padded with zeros, so the tar is always whole."""
    import tarfile
    now = time.time()
    for path, (size, opener) in sorted(files.items()):
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime = size, 0o644, now
        yield info.tobuf(tarfile.PAX_FORMAT)
        todo = size
        with contextlib.suppress(FileNotFoundError, Unavailable), opener() as f:
            while todo > 0 and (chunk := f.read(min(todo, FILE_CHUNK))):
                todo -= len(chunk)
                yield chunk
        yield bytes(todo) + bytes(-size % 512)
    yield bytes(1024)


def http_status(exc):
    """The status code that answers a GpuqueueError."""
    if isinstance(exc, HttpError):
        return exc.status
    return next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 500)


# -- Submits that wait ---------------------------------------------------------
#
# POST /api/submit?wait=1 answers when its job ends, as the original server's later
# release does; unlike it, a waiting submit holds no thread.  Its route asks waitress
# for a deferred answer (environ["gpuqueue.defer"], see _server_class): the status
# line and headers go out as the route returns, freeing the thread, and the one
# Waiters thread writes the rest later: keep-alive whitespace, then the results.

#: Submits waiting for their jobs at once, about: one more is answered 202 at once.
#: Each costs a connection and a few KiB, no thread.
MAX_WAITERS = 1000
#: Seconds between the keep-alive whitespace sent to a waiting submit: a space while
#: its job is pending, a newline once it runs (the client's progress line reads them).
WAIT_KEEPALIVE = 2
#: Bytes of an answer part sent as they are; a larger one goes as a file buffer.
_BIG_PART = 64 * 1024


class Deferred:
    """The rest of one HTTP answer, written later by any thread: send() and finish()
    only queue bytes (or seekable files, streamed by waitress's event loop) for the
    connection, and never wait on the client.  Made by the task (_server_class)."""

    def __init__(self, task):
        self.task = task
        self.channel = task.channel
        #: Guards started, sealed and pending; taken before the channel's outbuf_lock.
        self.lock = threading.Lock()
        self.started = False  # the status line and headers are queued
        self.sealed = False   # finish() was called: nothing more is taken
        self.dead = False     # the client is gone, or the answer was abandoned
        self.pending = []     # (parts, end) given before the headers were queued
        self.on_gone = None   # called in the event loop's thread when the client goes

    @property
    def alive(self):
        ch = self.channel
        return not self.dead and not self.sealed and ch.connected and not ch.will_close

    def send(self, data):
        """Queue bytes; False when the client is gone."""
        return self._put([data], False)

    def finish(self, *parts):
        """Queue the last parts (bytes, or binary files open at the place to send
        from, closed once sent) and end the answer; the connection then closes."""
        return self._put(list(parts), True)

    def _put(self, parts, end):
        with self.lock:
            if self.dead or self.sealed:
                _close_parts(parts)
                return False
            self.sealed = end
            if not self.started:
                self.pending.append((parts, end))
                return True
            return self.channel.deferred_append(self._frame(parts, end), end)

    def _frame(self, parts, end):
        """Outbuf items for ``parts``, in chunked framing when the answer is chunked
        (HTTP/1.1; HTTP/1.0 ends it by closing)."""
        import waitress.buffers
        chunked, out = self.task.chunked_response, []
        for p in parts:
            if isinstance(p, bytes) and len(p) <= _BIG_PART:
                item, n = p, len(p)
            else:
                item = waitress.buffers.ReadOnlyFileBasedBuffer(
                    io.BytesIO(p) if isinstance(p, bytes) else p)
                n = item.prepare()  # from the file's place to its end
            if not n:
                _close_parts([item])
                continue
            if chunked and isinstance(item, bytes):
                out.append(b"%X\r\n%s\r\n" % (n, item))
            elif chunked:
                out += [b"%X\r\n" % n, item, b"\r\n"]
            else:
                out.append(item)
        if end and chunked:
            out.append(b"0\r\n\r\n")
        return out

    def start(self):
        """(the task, under self.lock, once the headers are queued) What was given
        before goes out after them."""
        self.started = True
        items, end = [], False
        for parts, e in self.pending:
            items += self._frame(parts, e)
            end = end or e
        self.pending = []
        if items or end:
            self.channel.deferred_append(items, end)

    def gone(self):
        """(the event loop, maybe under the channel's outbuf_lock: never self.lock)"""
        if not self.dead:
            self.dead = True
            if self.on_gone is not None:
                self.on_gone()

    def abandon(self):
        """The route failed after asking for a deferral: nothing of it is sent."""
        self.dead = True
        with self.lock:
            for parts, _ in self.pending:
                _close_parts(parts)
            self.pending = []


def _close_parts(parts):
    for p in parts:
        if not isinstance(p, bytes):
            with contextlib.suppress(Exception):
                p.close()


class Waiters:
    """The waiting submits, by job: each gets a keep-alive every WAIT_KEEPALIVE
    seconds, its job's results once the job ends, or, past max_wait_seconds, its
    job's status and where to poll.  One thread (run) does it all, whatever their
    number; the Scheduler tells it of each end (ended, under the spool's lock, so it
    only takes note).  A waiter whose client hung up is dropped; its job goes on."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._waiting = collections.defaultdict(list)  # job id -> [(Deferred, deadline)]
        self._count = 0
        self._ended = set()    # ids of waited-for jobs that ended, to answer
        self._started = set()  # and of those that started running, to say so
        self._wake = threading.Event()
        scheduler.call_on_change(self.changed)

    def room(self):
        return self._count < MAX_WAITERS

    def add(self, job_id, deferred):
        deferred.on_gone = self._wake.set
        with self._lock:
            self._waiting[job_id].append(
                (deferred, time.monotonic() + self.scheduler.config.max_wait_seconds))
            self._count += 1
        try:
            self.scheduler.job(job_id)
        except NotFound:  # finished and removed already (a replayed submit)
            self.changed(job_id, None)
            return
        if (status := self.scheduler.statuses([job_id])[job_id]) != "pending":
            self.changed(job_id, status)  # it started, or even ended, meanwhile

    def changed(self, job_id, status):
        with self._lock:
            if job_id in self._waiting:
                (self._started if status == "running" else self._ended).add(job_id)
                self._wake.set()

    def run(self):
        beat = time.monotonic() + WAIT_KEEPALIVE
        while True:
            self._wake.wait(max(0.0, beat - time.monotonic()))
            self._wake.clear()
            with self._lock:
                # (Started first: a job may start and end between two passes, and
                # its waiters still hear that it ran before its results.)
                started = {j: [d for d, _ in self._waiting.get(j, ())] for j in self._started}
                self._started = set()
                ended, self._ended = self._ended, set()
                answer = {j: self._take(j) for j in ended}
                now = time.monotonic()
                late = {}
                for job_id, waiting in list(self._waiting.items()):
                    keep = [(d, t) for d, t in waiting if d.alive and t > now]
                    if expired := [d for d, t in waiting if d.alive and t <= now]:
                        late[job_id] = expired
                    if gone := sum(not d.alive for d, _ in waiting):
                        log.info("job %s: %d waiting submit(s) hung up; the job goes on",
                                 job_id, gone)
                    self._count -= len(waiting) - len(keep)
                    if keep:
                        self._waiting[job_id] = keep
                    else:
                        del self._waiting[job_id]
                live = {}
                if now >= beat:
                    live, beat = {j: [d for d, _ in w] for j, w in self._waiting.items()}, \
                        now + WAIT_KEEPALIVE
            for waiting in started.values():
                for d in waiting:
                    d.send(b"\n")
            for job_id, waiting in answer.items():
                self._answer(job_id, waiting)
            for job_id, waiting in late.items():
                self._give_up(job_id, waiting)
            if live:
                for job_id, status in self.scheduler.statuses(list(live)).items():
                    for d in live[job_id]:
                        d.send(b" " if status == "pending" else b"\n")
            self._trigger(answer, late, live, started)

    def _take(self, job_id):
        waiting = [d for d, _ in self._waiting.pop(job_id, ())]
        self._count -= len(waiting)
        return waiting

    @staticmethod
    def _trigger(*groups):
        """Wake each server's event loop once, to write what was queued."""
        servers = {d.channel.server for group in groups for ds in group.values() for d in ds}
        for server in servers:
            server.pull_trigger()

    def _answer(self, job_id, waiting):
        """The job's results (GET /api/results's answer, sent from its file) with its
        node and times in front."""
        try:
            job = self.scheduler.job(job_id)
            head = json.dumps({"node_id": job.node_id, **{
                k: isotime(getattr(job, k)) for k in ("submitted_at", "started_at",
                                                      "finished_at")}})[:-1] + ", "
        except NotFound:
            job = head = None
        for d in waiting:
            if job is None:
                d.finish(json.dumps({"job_id": job_id, "error": "the job is gone (removed "
                                     "after keep_finished_days)"}).encode())
                continue
            try:
                f = self.scheduler.answer(job)
                f.seek(1)  # after its "{"
            except Exception as exc:  # (each waiter is answered, whatever one meets)
                if not isinstance(exc, GpuqueueError):
                    log.exception("job %s: its results could not be sent", job_id)
                message = exc.message if isinstance(exc, GpuqueueError) else \
                    f"its results cannot be read now ({exc}); GET /api/results/{job_id}"
                d.finish(json.dumps({"job_id": job_id, "error": message}).encode())
                continue
            d.finish(head.encode(), f)
        log.info("job %s: results sent to %d waiting submit(s)", job_id, len(waiting))

    def _give_up(self, job_id, waiting):
        """Past max_wait_seconds: the job's status (200 is sent already), and where to
        read its results once it ends."""
        try:
            shown = self.scheduler.shown(self.scheduler.job(job_id))
        except NotFound:
            shown = {"job_id": job_id}
        shown["message"] = (f"still {shown.get('status', 'unknown')} after max_wait_seconds "
                            f"({self.scheduler.config.max_wait_seconds:g} s): poll GET "
                            f"/api/results/{job_id}")
        for d in waiting:
            d.finish(json.dumps(shown).encode())


class Api:
    """The HTTP routes.  Holds no queue state of its own: everything it shows or
    changes goes through the Scheduler, the queue's front door.  What it keeps is
    HTTP's: the caps on follows and archives, and the submits that wait (Waiters)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.config = scheduler.config
        # A follow holds one of waitress's threads while its job runs, and a tar one
        # while it is sent: cap them, so that they never take every thread from
        # submit and status.
        self.followers = threading.BoundedSemaphore(LOG_FOLLOWERS)
        self.archives = threading.BoundedSemaphore(ARCHIVES)
        self.waiters = Waiters(scheduler)
        self.app = bottle.Bottle(catchall=True)
        self.app.default_error_handler = self._error_page
        for method, path, handler in self.ROUTES:
            self.app.route(path, method, self._json(getattr(self, handler)))
        self.app.route("/docs", "GET", self.docs)
        self.app.route("/ui", "GET", self.ui)
        self.app.route("/ui/job/<job_id>", "GET", self.ui)
        self.app.route("/docs/<name>", "GET", self.docs_asset)
        self.openapi = openapi(self.config)
        self.app.route("/openapi.json", "GET", lambda: self.openapi)
        self.dashboard = bottle.SimpleTemplate(DASHBOARD)

    ROUTES = (
        ("GET", "/", "index"),
        ("POST", "/api/submit", "submit"),
        ("GET", "/api/status/<job_id>", "status"),
        ("GET", "/api/results/<job_id>", "results"),
        ("POST", "/api/cancel/<job_id>", "cancel"),
        ("GET", "/api/nodes", "nodes"),
        ("GET", "/api/jobs", "jobs"),
        ("GET", "/api/logs/<job_id>", "logs"),
        ("GET", "/api/arrays/<array_id>", "array"),
        ("GET", "/api/outputs/<job_id>", "outputs"),
        ("GET", "/api/outputs/<job_id>/<path:path>", "output_file"),
        ("GET", "/metrics", "metrics"),
    )

    @staticmethod
    def _json(handler):
        def wrapped(**kw):
            try:
                return handler(**kw)
            except GpuqueueError as exc:
                bottle.response.status = http_status(exc)
                if getattr(exc, "retry_after", None):
                    bottle.response.set_header("Retry-After", str(exc.retry_after))
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

    def _client(self):
        """The caller's address: the peer's, or, when the peer is one of the config's
        ``trusted_proxies``, the last address in X-Forwarded-For that is not one."""
        environ = bottle.request.environ
        addr = environ.get("REMOTE_ADDR") or "-"
        if addr in self.config.trusted_proxies:
            hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
            for hop in reversed(hops):
                if hop and hop not in self.config.trusted_proxies:
                    return hop[:64]
        return addr

    def _user(self):
        """The caller of an HTTP route, from its Bearer token."""
        user = self.scheduler.authenticate(_bearer(), self._client())
        bottle.request.environ["gpuqueue.user"] = user["user"]
        return user

    def _job(self, job_id, user):
        return self.scheduler.job(job_id, user)

    # -- routes --------------------------------------------------------------

    def index(self):
        c = self.config
        return {"name": "gpuqueue", "service": "gpuqueue", "version": __version__,
                "endpoints": [{"method": method,
                               "path": re.sub(r"<(?:path:)?(\w+)>", r"{\1}", path)}
                              for method, path, _ in self.ROUTES],
                "nodes": len(c.nodes),
                "queue_length": self.scheduler.queue_length(), "docs": "/docs",
                "limits": {"max_upload_bytes": c.max_upload_bytes,
                           "max_project_bytes": c.max_project_bytes,
                           "max_project_files": c.max_project_files,
                           "max_output_files_bytes": c.max_output_files_bytes,
                           "max_output_files": c.max_output_files}}

    def submit(self):
        req = bottle.request
        wait = self._wait_asked()
        if not req.content_type.lower().startswith("multipart/form-data"):
            raise HttpError(415, "send multipart/form-data with parts 'code' and 'config_file'")
        if req.content_length < 0:  # waitress refuses bodies over max_upload_bytes itself
            raise HttpError(411, "Content-Length required")
        # A token in the header is checked before the upload is parsed: a caller without
        # a valid one costs no more than reading its headers.
        user = self._user() if _bearer() is not None else None
        # Parse as Latin-1, which maps every byte to a character and back: a filename
        # in any encoding never fails the upload, and plain fields keep their bytes.
        # The header as sent: bottle's content_type is lowercased, boundary and all,
        # and a browser's boundary has capitals.
        req.environ["CONTENT_TYPE"] = req.environ.get("CONTENT_TYPE", "") + "; charset=latin1"
        try:
            names = set(req.POST)
        except Exception:
            raise BadRequest("malformed multipart body") from None
        extra = names - {"code", "config_file"}
        if extra:
            raise BadRequest("unexpected multipart part; send only 'code' and 'config_file'")
        job, position, start, replayed, array = self.scheduler.submit(
            _upload_part("code"), _upload_part("config_file"), user=user, source=self._client(),
            idempotency_key=req.get_header("Idempotency-Key"))
        req.environ["gpuqueue.user"] = job.user_id
        bottle.response.status = 201
        if replayed:
            bottle.response.set_header("Idempotent-Replayed", "true")
        if array is not None:
            if wait:
                return self._not_waited(dict(array, status="pending"), "a submit waits for "
                                        f"one job; follow the array with GET /api/arrays/"
                                        f"{array['array_id']}")
            return {**array, "status": "pending"}
        answer = {"job_id": job.id, "node_id": job.node_id, "status": "pending",
                  "queue_position": position, "estimated_start": isotime(start)}
        return self._wait(job, answer, start) if wait else answer

    def _wait_asked(self):
        """The query of a submit: ``wait`` alone, checked before anything is queued."""
        query = bottle.request.query
        if set(query) - {"wait"} or len(query.getall("wait")) > 1:
            raise BadRequest("the one query parameter of submit is wait (1 or true: answer "
                             "when the job has ended)")
        value = query.get("wait", "0").lower()
        if value not in ("0", "1", "true", "false"):
            raise BadRequest("wait must be 1 or true (answer when the job has ended), or 0 "
                             "or false")
        return value in ("1", "true")

    def _not_waited(self, answer, why):
        """202: the job is queued, but this submit does not wait for it."""
        bottle.response.status = 202
        return dict(answer, message=f"not waited for: {why}; poll GET /api/results/"
                                    f"{answer.get('job_id', '<id>')}"
                    if "job_id" in answer else f"not waited for: {why}")

    def _wait(self, job, answer, start):
        """A submit with ?wait=1: the job's results once it ends (Waiters), and meanwhile
        headers and keep-alive whitespace; or 202 at once, when its worst end (its
        estimated start, plus its time limit) is past max_wait_seconds or too many
        submits are waiting already."""
        limit, most = self.config.max_wait_seconds, self.config.time_limit(job.expected_time)
        defer = bottle.request.environ.get("gpuqueue.defer")
        if defer is None:
            return self._not_waited(answer, "this server cannot hold an answer open")
        if not self.waiters.room():
            return self._not_waited(answer, f"{MAX_WAITERS} submits are waiting already")
        if (start or time.time()) + most - time.time() > limit:
            return self._not_waited(answer, "it may end after max_wait_seconds "
                                    f"({limit:g} s; its time limit is {most:g} s)")
        res = bottle.response
        res.status = 200
        res.content_type = "application/json"
        res.set_header("Cache-Control", "no-store")
        res.set_header("X-Accel-Buffering", "no")  # (a proxy in front: pass it on at once)
        res.set_header("X-Gpuqueue-Job-Id", job.id)
        res.set_header("X-Gpuqueue-Node-Id", str(job.node_id))
        res.set_header("X-Gpuqueue-Expected-Time", f"{job.expected_time:g}")
        res.set_header("X-Gpuqueue-Time-Limit", f"{most:g}")
        if answer["queue_position"] is not None:
            res.set_header("X-Gpuqueue-Queue-Position", str(answer["queue_position"]))
        self.waiters.add(job.id, defer())
        return ""

    def status(self, job_id):
        return self.scheduler.shown(self._job(job_id, self._user()))

    def results(self, job_id):
        """A finished job's record and output, as one JSON object made once on disk
        (Scheduler.answer) and sent from the file: a client that does not read holds
        no thread, and memory per request stays small whatever the output's size."""
        job = self._job(job_id, self._user())
        query = bottle.request.query
        if set(query) - {"attempt"} or not re.fullmatch(r"[0-9]{1,2}", query.get("attempt", "1")):
            raise BadRequest("the one query parameter is attempt, a number")
        answer = self.scheduler.answer(job, int(query["attempt"]) if "attempt" in query
                                       else None)
        bottle.response.content_type = "application/json"
        return answer  # sent from the file by waitress's event loop (wsgi.file_wrapper)

    def cancel(self, job_id):
        """A job, or every job of an array that has not finished yet."""
        user = self._user()
        try:
            job = self._job(job_id, user)
        except NotFound as not_a_job:
            try:
                cancelled = self.scheduler.cancel_array(job_id, user)
            except NotFound:
                raise not_a_job from None
            return {"array_id": job_id, "cancelled": cancelled}
        return self.scheduler.shown(self.scheduler.cancel(job))

    def nodes(self):
        return {"nodes": self.scheduler.nodes()}

    def jobs(self):
        user = self._user()
        query = bottle.request.query
        unknown = set(query) - {"user_id", "status", "limit", "cursor", "array"}
        if unknown:
            raise BadRequest("unknown query parameter; use user_id, status, limit, cursor, "
                             "array")
        if any(len(query.getall(k)) > 1 for k in query):
            raise BadRequest("each query parameter may be given once")
        status = query.get("status")
        if status is not None and status not in STATES:
            raise BadRequest(f"status must be one of {', '.join(STATES)}")
        limit = query.get("limit", str(PAGE_DEFAULT))
        if not (re.fullmatch(r"[0-9]{1,9}", limit) and 1 <= int(limit) <= PAGE_MAX):
            raise BadRequest(f"limit must be a whole number from 1 to {PAGE_MAX}")
        limit = int(limit)
        cursor = query.get("cursor")
        if cursor is not None and not JOB_ID_RE.match(cursor):
            raise BadRequest("malformed cursor")
        owner = query.get("user_id")
        if not user["admin"]:
            if owner not in (None, user["user"]):
                raise Forbidden("you may list only your own jobs")
            owner = user["user"]
        array = query.get("array")
        if array is not None:
            ids = self.scheduler.array(array, user, counts=False)["job_ids"]
            found, next_cursor = self.scheduler.find(owner, status, limit, cursor, among=ids)
        else:
            found, next_cursor = self.scheduler.find(owner, status, limit, cursor)
        return {"jobs": [self.scheduler.shown(j) for j in found], "next_cursor": next_cursor}

    def array(self, array_id):
        """An array: its size, how many of its jobs are in each state, their ids."""
        info = self.scheduler.array(array_id, self._user())
        return {"array_id": array_id, "user_id": info["user_id"], "size": len(info["job_ids"]),
                "limit": info["limit"], "counts": info["counts"], "job_ids": info["job_ids"],
                "submitted_at": isotime(info["submitted_at"])}

    def logs(self, job_id):
        """What a job has written so far to stdout or stderr, from a byte offset; or,
        with follow=1, a stream of NDJSON lines until the job ends."""
        job = self._job(job_id, self._user())
        query = bottle.request.query
        if set(query) - {"stream", "offset", "follow"}:
            raise BadRequest("unknown query parameter; use stream, offset, follow")
        if any(len(query.getall(k)) > 1 for k in query):
            raise BadRequest("each query parameter may be given once")
        stream = query.get("stream", "stdout")
        if stream not in ("stdout", "stderr", "both"):
            raise BadRequest("stream must be stdout, stderr or (with follow=1) both")
        offset = query.get("offset", "0")
        if not re.fullmatch(r"[0-9]{1,15}", offset):
            raise BadRequest("offset must be a whole number of bytes")
        follow = query.get("follow", "0")
        if follow not in ("0", "1"):
            raise BadRequest("follow must be 0 or 1")
        if stream == "both" and (follow != "1" or offset != "0"):
            raise BadRequest("stream=both is for follow=1 from the start (offset 0)")
        if follow == "1":
            return self._follow_log(job, ("stdout", "stderr") if stream == "both"
                                    else (stream,), int(offset))
        data, job = self._read_log(job, stream, int(offset))
        return {"job_id": job.id, "status": job.shown_status, "stream": stream,
                "offset": int(offset), "next_offset": int(offset) + len(data),
                "data": data.decode("utf-8", "replace"),
                "complete": job.status in FINAL_STATES and not data}

    def outputs(self, job_id):
        """The job's files ($GPUQUEUE_OUTPUT_DIR) as a listing, or with archive=tar
        all of them as one tar, streamed."""
        job = self._job(job_id, self._user())
        query = bottle.request.query
        if set(query) - {"archive"} or query.get("archive", "tar") != "tar" or \
                len(query.getall("archive")) > 1:
            raise BadRequest("the one query parameter is archive=tar")
        listing, files = self.scheduler.outputs(job)
        if "archive" not in query:
            return listing
        # A tar is made as it is sent, in a thread: a client that does not read holds
        # it (until channel_timeout), so only ARCHIVES are sent at once.
        if not self.archives.acquire(blocking=False):
            raise Unavailable(f"{ARCHIVES} archives are being sent already; try again later, "
                              "or download the files one by one")
        bottle.response.content_type = "application/x-tar"
        bottle.response.set_header("Content-Disposition",
                                   f'attachment; filename="{job.id}-outputs.tar"')

        def sent():
            try:
                with self.scheduler.kept(job):
                    yield from tar_stream(files)
            finally:
                self.archives.release()
        return sent()

    def output_file(self, job_id, path):
        """One of the job's files, with HTTP Range, so that a large checkpoint's
        interrupted download resumes."""
        job = self._job(job_id, self._user())
        _, files = self.scheduler.outputs(job)
        if path not in files:
            raise NotFound("no such file among the job's outputs (GET /api/outputs/"
                           f"{job.id} lists them)")
        size, opener = files[path]
        start, end = 0, size
        header = bottle.request.environ.get("HTTP_RANGE")
        if header:
            ranges = list(bottle.parse_range_header(header, size))
            if not ranges:
                bottle.response.set_header("Content-Range", f"bytes */{size}")
                raise HttpError(416, f"the file has {size} bytes; the range asks for others")
            start, end = ranges[0]
        stack = contextlib.ExitStack()
        try:
            f = stack.enter_context(opener())
            f.seek(start)
            # A running job's file is read now, first chunk: what goes wrong reading it
            # (its node, or the job rewriting it) is an answer, not a broken body.
            first = None if job.status in FINAL_STATES else f.read(min(end - start, FILE_CHUNK))
            if first == b"" and end > start:
                raise Unavailable("the file is shorter now than when it was listed (the job "
                                  "is writing it): ask again")
        except BaseException as exc:
            stack.close()
            if isinstance(exc, FileNotFoundError):
                raise NotFound("the file is gone (from the job's node, or the job was "
                               "removed)") from None
            if isinstance(exc, Exception) and not isinstance(exc, GpuqueueError):
                raise Unavailable(f"cannot read the job's file now: {exc}") from None
            raise
        if header:
            bottle.response.status = 206
            bottle.response.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        bottle.response.content_type = SHOWN_INLINE.get(
            os.path.splitext(path)[1].lower(), "application/octet-stream")
        if bottle.response.content_type == "application/octet-stream":
            bottle.response.set_header("Content-Disposition", "attachment; filename=\""
                                       + re.sub(r'[^\w.-]', "_", path.rsplit("/", 1)[-1]) + '"')
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        bottle.response.set_header("Accept-Ranges", "bytes")
        bottle.response.set_header("Content-Length", str(end - start))
        if first is None:  # a file in the spool: sent from it by the event loop
            stack.pop_all()  # (wsgi.file_wrapper), holding no thread
            return f

        def body():
            with stack:
                yield first
                todo = end - start - len(first)
                while todo > 0 and (chunk := f.read(min(todo, FILE_CHUNK))):
                    todo -= len(chunk)
                    yield chunk
        return body()

    def _read_log(self, job, stream, offset):
        data, job = self.scheduler.read_output(job, stream, offset, LOG_CHUNK)
        return _whole_utf8(data), job

    def _follow_log(self, job, streams, offset):
        if not self.followers.acquire(blocking=False):
            raise Unavailable(f"{LOG_FOLLOWERS} outputs are followed already; try again later "
                              "or read with offsets")
        bottle.response.content_type = "application/x-ndjson"
        token, client = _bearer(), self._client()

        def lines(job, offsets):
            # A space goes out at once (so do the headers) and after every quiet
            # FOLLOW_KEEPALIVE: a client that hung up then fails the write, which
            # frees this thread and its slot.  Leading spaces are valid JSON.
            # A node that reconnects cannot be read for a moment; the follow ends
            # with the error only once it has lasted node_timeout.
            quiet_since = checked = time.monotonic()
            failing_since = None
            try:
                yield " "
                while True:
                    got = False
                    for stream in streams:
                        try:
                            if time.monotonic() - checked >= FOLLOW_KEEPALIVE:
                                self.scheduler.authenticate(token, client)  # revoked: it ends
                                checked = time.monotonic()
                            data, job = self._read_log(job, stream, offsets[stream])
                            failing_since = None
                        except Unavailable as exc:
                            failing_since = failing_since or time.monotonic()
                            if time.monotonic() - failing_since >= self.config.node_timeout:
                                yield json.dumps({"error": exc.message}) + "\n"
                                return
                            data = b""
                        except GpuqueueError as exc:
                            yield json.dumps({"error": exc.message}) + "\n"
                            return
                        if data:
                            yield json.dumps({"stream": stream, "offset": offsets[stream],
                                              "data": data.decode("utf-8", "replace")}) + "\n"
                            offsets[stream] += len(data)
                            quiet_since, got = time.monotonic(), True
                    if got:
                        continue
                    if job.status in FINAL_STATES:
                        yield json.dumps({"end": True, "status": job.status,
                                          "exit_code": job.exit_code, "error": job.error,
                                          "next_offset": offsets[streams[0]]}) + "\n"
                        return
                    if time.monotonic() - quiet_since >= FOLLOW_KEEPALIVE:
                        yield " "
                        quiet_since = time.monotonic()
                    self.scheduler.wait_finished(job, LOG_POLL)
            finally:
                self.followers.release()
        return lines(job, {s: offset if len(streams) == 1 else 0 for s in streams})

    def metrics(self):
        """Prometheus text format; no token, like /api/nodes, and no user names."""
        figures = self.scheduler.metrics()
        nodes, pending, running = figures["nodes"], figures["pending"], figures["running"]
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend((f"# HELP gpuqueue_{name} {help_}", f"# TYPE gpuqueue_{name} {kind}"))
            lines.extend(f"gpuqueue_{name}{labels} {value}" for labels, value in samples)

        metric("jobs", "gauge", "Unfinished jobs by state.",
               [('{state="pending"}', pending), ('{state="running"}', running)])
        # Both counters start from 0 with the server, as Prometheus expects of a
        # counter; what the spool keeps, whenever it finished, is a gauge.
        metric("jobs_started_total", "counter", "Jobs launched since the server started.",
               [(f'{{node="{n["id"]}"}}', n["started"]) for n in nodes])
        metric("jobs_finished_total", "counter",
               "Jobs finished since the server started, by node and status.",
               [(f'{{node="{n["id"]}",status="{st}"}}', n["finished"][st]) for n in nodes
                for st in FINAL_STATES])
        metric("jobs_kept", "gauge", "Finished jobs kept in the spool, by node and status "
                                     "(see keep_finished_days).",
               [(f'{{node="{n["id"]}",status="{st}"}}', n[st]) for n in nodes
                for st in FINAL_STATES])
        metric("node_queue_jobs", "gauge", "Pending jobs planned for each node.",
               [(f'{{node="{n["id"]}"}}', n["queued_jobs"]) for n in nodes])
        metric("node_queue_seconds", "gauge", "Expected seconds of work queued on each node.",
               [(f'{{node="{n["id"]}"}}', n["queued_seconds"]) for n in nodes])
        metric("node_up", "gauge", "1 when the node is online.",
               [(f'{{node="{n["id"]}"}}', int(n["state"] == "online")) for n in nodes])
        metric("node_drained", "gauge", "1 while an admin has the node drained.",
               [(f'{{node="{n["id"]}"}}', int(n["drained"])) for n in nodes])
        samples = []
        for n in nodes:
            h, i = n["dispatch"], n["id"]
            samples += [(f'_bucket{{node="{i}",le="{b:g}"}}', c) for b, c in zip(h.BOUNDS, h.buckets)]
            samples += [(f'_bucket{{node="{i}",le="+Inf"}}', h.count),
                        (f'_sum{{node="{i}"}}', round(h.sum, 6)), (f'_count{{node="{i}"}}', h.count)]
        metric("dispatch_seconds", "histogram", "From a job's claim to its wrapper running.", samples)
        metric("gpu_state", "gauge", "1 for each GPU's state in the queue: busy, held (kept "
                                     "for a job that needs more GPUs), foreign (used outside "
                                     "the queue) or free.",
               [(f'{{node="{n["id"]}",gpu="{slot["gpu"]}",state="{state}"}}',
                 int(slot["state"] == state))
                for n in nodes for slot in n.get("gpu_slots", ())
                for state in ("busy", "held", "foreign", "free")])
        gpus = [(f'{{node="{n["id"]}",gpu="{g["index"]}"}}', g) for n in nodes
                for g in n.get("gpus", ())]

        def figures(key, unit):  # a figure nvidia-smi did not give has no sample
            return [(labels, unit(g[key])) for labels, g in gpus if g[key] is not None]
        metric("gpu_memory_used_bytes", "gauge", "GPU memory in use, as nvidia-smi reads it.",
               figures("memory_used_mib", lambda mib: mib * 2**20))
        metric("gpu_memory_total_bytes", "gauge", "GPU memory in all.",
               figures("memory_total_mib", lambda mib: mib * 2**20))
        metric("gpu_utilization_ratio", "gauge", "Share of the last sample period the GPU was "
                                                 "busy (0 to 1).",
               figures("utilization_pct", lambda pct: pct / 100))
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return "\n".join(lines) + "\n"

    def docs(self):
        res = bottle.response
        res.content_type = "text/html; charset=utf-8"
        # Swagger UI sets styles inline and shows images from data: URLs.
        res.set_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; "
                       "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                       "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                       "frame-ancestors 'none'")
        res.set_header("X-Content-Type-Options", "nosniff")
        return DOCS_PAGE

    def docs_asset(self, name):
        """Swagger UI's own files, from the installed swagger-ui-bundle package."""
        if name == "init.js":
            bottle.response.content_type = "application/javascript"
            return DOCS_INIT
        if name not in DOCS_ASSETS:
            raise bottle.HTTPError(404)
        import swagger_ui_bundle
        return bottle.static_file(name, root=swagger_ui_bundle.swagger_ui_path,
                                  mimetype=DOCS_ASSETS[name], charset="utf-8")

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
        return self.dashboard.render(nonce=nonce, version=__version__, job_id=job_id,
                                json_job_id=json.dumps(job_id), nodes=self.scheduler.nodes(),
                                gpu_text=gpu_text, environments_text=environments_text,
                                duration=duration)


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


#: Seconds a request's headers may take to arrive, and bytes per second its body
#: must arrive at after that; connections one address may hold open.  What a
#: reverse proxy in front adds to this is in the README.
HEADER_TIMEOUT = 10
MIN_BODY_RATE = 16 * 1024
PER_ADDRESS_CONNECTIONS = 64
#: Connections open at once, all addresses together (each costs a descriptor, not
#: a thread), and waitress's worker threads.
CONNECTION_LIMIT = 2000
HTTP_THREADS = 8


@functools.cache
def _server_class():
    """waitress's server, extended (built on first use, so that only the server
    imports waitress): JSON errors, no request smuggling, deadlines for slow
    clients, and a cap on connections per address."""
    import waitress.channel
    import waitress.parser
    import waitress.server
    import waitress.task

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


    class _Parser(waitress.parser.HTTPRequestParser):
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            if self.chunked and "CONTENT_LENGTH" in self.headers:
                # RFC 9112 6.1: a proxy in front may read the body by the other header;
                # refuse, and close (an ErrorTask always does), so nothing is smuggled.
                raise waitress.parser.ParsingError(
                    "a request may not carry both Content-Length and Transfer-Encoding")


    class _Task(waitress.task.WSGITask):
        """waitress's task, able to defer its answer: a route that calls
        environ["gpuqueue.defer"]() gets a Deferred and returns an empty body; the
        headers go out then, with no length (the answer is chunked, or ended by
        closing), and the thread is free.  The Deferred writes the rest."""

        deferred = None

        def get_environment(self):
            environ = super().get_environment()  # (waitress keeps it after the first call)
            environ["gpuqueue.defer"] = self._defer
            return environ

        def _defer(self):
            if self.deferred is None:
                self.deferred = Deferred(self)
            return self.deferred

        def service(self):
            try:
                super().service()
            finally:
                if self.deferred is not None and not self.deferred.started:
                    self.deferred.abandon()  # the route failed, or the client left

        def finish(self):
            d = self.deferred
            if d is None or self.wrote_header or not self.complete:
                return super().finish()
            channel = self.channel
            with channel.requests_lock:
                channel.request = None  # nothing pipelined behind it is served
            self.content_length = None  # (bottle said 0, for the empty body)
            self.remove_content_length_header()
            self.set_close_on_finish()
            with d.lock:
                self.write(b"")  # the status line and headers
                with channel.outbuf_lock:
                    channel.deferred = d  # from here the event loop serves it as deferred
                d.start()


    class _Channel(waitress.channel.HTTPChannel):
        """waitress's channel, with JSON errors, the clock of its request's start, for
        _Server's deadlines, and deferred answers (_Task): while one is open the
        channel reads only to see the client hang up, and closes once it is sent."""

        task_class = _Task
        error_task_class = _JsonErrorTask
        parser_class = _Parser
        began = None  # when the request being read began to arrive
        got = 0       # bytes of it so far
        deferred = None        # the Deferred being answered: no other request follows
        deferred_done = False  # its last byte is queued (set under outbuf_lock)

        def __init__(self, server, sock, addr, adj, map=None):
            super().__init__(server, sock, addr, adj, map)
            self.client = addr[0] if isinstance(addr, tuple) else str(addr)
            if not server.admit(self):
                self.will_close = True  # closed at once: this address has enough open

        def received(self, data):
            if self.deferred is not None:
                return False  # after a deferred answer the connection closes: dropped
            if self.request is None:
                self.began, self.got = time.monotonic(), 0
            self.got += len(data)
            return super().received(data)

        def deferred_append(self, items, end):
            """(any thread) Queue outbuf items of the deferred answer.  Never waits on
            the client, as write_soon does over outbuf_high_watermark."""
            import waitress.buffers
            with self.outbuf_lock:
                ok = self.connected and not self.will_close
                if ok:
                    for item in items:
                        if isinstance(item, bytes):
                            self.outbufs[-1].append(item)
                            self.current_outbuf_count += len(item)
                        else:  # a file: its own outbuf, then a fresh one after it
                            self.outbufs += [item, waitress.buffers.OverflowableBuffer(
                                self.adj.outbuf_overflow)]
                            self.current_outbuf_count = 0
                        self.total_outbufs_len += len(item)
                    self.deferred_done = self.deferred_done or end
            if not ok:
                _close_parts(items)
            return ok

        def readable(self):
            if self.deferred is None:
                return super().readable()
            return not self.will_close  # to see the client hang up (recv() gives b"")

        def writable(self):
            if self.deferred is None:
                return super().writable()
            return bool(self.total_outbufs_len or self.will_close or self.deferred_done)

        def handle_write(self):
            # Under outbuf_lock (an RLock, which waitress's flush takes again): the
            # Waiters thread may append at any time, and waitress flushes without it
            # once the channel has no request.
            with self.outbuf_lock:
                if self.deferred is None:
                    return super().handle_write()
                if not self.connected:
                    return  # closed by handle_read in this same round
                self._flush_exception(self._flush_some)
                if self.connected and (self.will_close or (
                        self.deferred_done and not self.total_outbufs_len)):
                    self.handle_close()

        def handle_close(self):
            self.server.release(self)
            super().handle_close()
            if self.deferred is not None:
                self.deferred.gone()


    class _Server(waitress.server.TcpWSGIServer):
        """waitress's server, made safe to face slow or stalled clients: a request's
        headers must arrive within HEADER_TIMEOUT, its body at MIN_BODY_RATE at least
        (after HEADER_TIMEOUT), and one address may hold at most PER_ADDRESS_CONNECTIONS
        connections.  Far more connections than threads may be open: a connection costs
        a thread only once its request has fully arrived."""

        channel_class = _Channel

        def __init__(self, *args, **kw):
            self._per_address = collections.Counter()
            self._admitted = set()
            super().__init__(*args, **kw)

        def admit(self, channel):
            if self._per_address[channel.client] >= PER_ADDRESS_CONNECTIONS:
                return False
            self._per_address[channel.client] += 1
            self._admitted.add(id(channel))
            return True

        def release(self, channel):
            if id(channel) in self._admitted:
                self._admitted.discard(id(channel))
                self._per_address[channel.client] -= 1
                if not self._per_address[channel.client]:
                    del self._per_address[channel.client]

        def maintenance(self, now):
            super().maintenance(now)
            clock = time.monotonic()
            for channel in list(self.active_channels.values()):
                req = getattr(channel, "request", None)
                if req is None or channel.began is None or req.completed:
                    continue
                age = clock - channel.began
                if (not req.headers_finished and age > HEADER_TIMEOUT) or (
                        req.headers_finished and age > HEADER_TIMEOUT
                        and channel.got < MIN_BODY_RATE * age):
                    channel.will_close = True
                    channel.server.pull_trigger()

    return _Server


def _http_server(app, host, port, config):
    """waitress on one address, as _Server: poll() instead of select(), so that far
    more connections than 1,024 may be open; proxy headers passed on untouched (Api
    decides whom to believe: ``trusted_proxies``)."""
    import waitress.adjustments
    import waitress.task
    adj = waitress.adjustments.Adjustments(
        host=host, port=port, threads=HTTP_THREADS, max_request_body_size=config.max_upload_bytes,
        channel_timeout=60, cleanup_interval=1, connection_limit=CONNECTION_LIMIT,
        asyncore_use_poll=True, clear_untrusted_proxy_headers=False)
    dispatcher = waitress.task.ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    return _server_class()(app, {}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])


def openapi(config):
    """The OpenAPI 3 document, built from small pieces so each shape is written once,
    and from the declarations the code itself reads (Job's fields, JOB_KEYS,
    SHOWN_BESIDE, PAGE_MAX, the config's limits), so that it cannot drift from them."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(text, schema="Error"):
        return {"description": text, "content": {"application/json": {"schema": ref(schema)}}}

    errors = {"401": answer("missing, invalid, expired or revoked token"),
              "429": answer("too many failed authentications from this address")}
    job_param = [{"name": "job_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": f"^{JOB_ID_PATTERN}$"}}]
    lenient_id = [{**job_param[0], "schema": {"type": "string"}}]
    secured = [{"bearer": []}]
    nullable_str = {"type": "string", "nullable": True}
    time_ = {"type": "string", "format": "date-time", "nullable": True}
    status = {"type": "string", "enum": list(STATES)}
    position = {"type": "integer", "nullable": True, "minimum": 0,
                "description": "jobs ahead of it on its node: 0 is next"}
    lo, hi = key_bounds(JOB_KEYS["priority"], config)
    job_config = {
        "type": "object", "additionalProperties": False,
        "description": f"What config_file holds, as a YAML mapping of at most "
                       f"{MAX_CONFIG_BYTES} bytes; a key given twice is refused.",
        "required": [k for k, spec in JOB_KEYS.items() if spec["config"] == "required"],
        "properties": {}}
    for key, spec in JOB_KEYS.items():
        low, high = key_bounds(spec, config)
        bounds = {name: value for name, value in (("minimum", low), ("maximum", high))
                  if value is not None}
        if spec["schema"]["type"] == "number" and low is not None:
            bounds["exclusiveMinimum"] = True  # as parse_job_config checks a number
        job_config["properties"][key] = {**spec["schema"], **bounds}
    job_status = {"type": "object", "required": [], "properties": {}}
    for f in dataclasses.fields(Job):
        key, schema = f.metadata["key"], f.metadata["schema"] \
            if f.metadata["shown_schema"] is None else f.metadata["shown_schema"]
        if key is None:  # a field shown under several keys, when it has a value
            job_status["properties"].update(schema)
            continue
        key = f.name if key is ... else key
        job_status["properties"][key] = schema
        job_status["required"].append(key)
    job_status["properties"].update(SHOWN_BESIDE)
    return {
        "openapi": "3.0.3",  # what the Swagger UI of swagger-ui-bundle reads
        "info": {"title": "gpuqueue", "version": __version__,
                 "description": "A GPU job queue: submit a Python script and a config.yaml, "
                                "get back stdout, stderr and the exit code."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "JobStatus": job_status,
                "JobConfig": job_config,
                "GpuSlot": {
                    "type": "object", "required": ["gpu", "state", "job"],
                    "description": "One GPU of a node as the queue sees it: busy (with "
                                   "its job), held for a job that waits for more GPUs, "
                                   "used outside the queue, or free.",
                    "properties": {"gpu": {"type": "string"},
                                   "state": {"type": "string",
                                             "enum": ["busy", "held", "foreign", "free"]},
                                   "job": nullable_str}},
                "GpuReading": {
                    "type": "object",
                    "description": "What nvidia-smi said of one GPU, and the processes on it.",
                    "required": ["index", "device", "name", "memory_used_mib",
                                 "memory_total_mib", "utilization_pct", "processes", "foreign"],
                    "properties": {
                        "index": {"type": "integer"}, "device": {"type": "string"},
                        "name": {"type": "string"},
                        "memory_used_mib": {"type": "integer", "nullable": True},
                        "memory_total_mib": {"type": "integer", "nullable": True},
                        "utilization_pct": {"type": "integer", "nullable": True,
                                            "description": "null where the board gives "
                                                           "none (MIG)"},
                        "foreign": {**nullable_str, "description": "why it takes no new job"},
                        "processes": {"type": "array", "items": {
                            "type": "object", "properties": {
                                "pid": {"type": "integer"},
                                "memory_mib": {"type": "integer", "nullable": True},
                                "user": nullable_str,
                                "job": {**nullable_str, "description": "its gpuqueue job, "
                                        "if it is one"}}}}}},
                "Submitted": {"type": "object",
                              "required": ["job_id", "node_id", "status", "queue_position",
                                           "estimated_start"],
                              "properties": {"job_id": {"type": "string"},
                                             "node_id": {"type": "integer"},
                                             "status": {"type": "string", "enum": ["pending"]},
                                             "queue_position": position,
                                             "estimated_start": time_}},
                "Results": {"type": "object",
                            "required": ["job_id", "status", "stdout", "stderr", "exit_code", "error"],
                            "properties": {"job_id": {"type": "string"}, "status": status,
                                           "stdout": {"type": "string"}, "stderr": {"type": "string"},
                                           "exit_code": {"type": "integer", "nullable": True},
                                           "error": nullable_str,
                                           "attempt": {"type": "integer"}}},
                "Waited": {"allOf": [ref("Results"), {
                    "type": "object", "required": ["node_id", "submitted_at", "started_at",
                                                   "finished_at"],
                    "properties": {"node_id": {"type": "integer"}, "submitted_at": time_,
                                   "started_at": time_, "finished_at": time_}}]},
                "NotWaited": {"type": "object", "required": ["status", "message"],
                              "properties": {"job_id": {"type": "string"},
                                             "array_id": {"type": "string"},
                                             "status": status,
                                             "message": {"type": "string"}}},
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
                                        "gpus": {"type": "array", "items": ref("GpuReading")},
                                        "gpu_slots": {"type": "array", "items": ref("GpuSlot")},
                                        "gpu_error": {**nullable_str, "description":
                                                      "why its last GPU reading gave none"},
                                        "gpus_from": {"type": "string", "enum": [
                                            "config", "nvidia-smi", "default"],
                                            "description": "where its GPUs came from"},
                                        "holding": {"type": "object", "properties": {
                                            "job_id": {"type": "string"},
                                            "gpus": {"type": "array",
                                                     "items": {"type": "string"}},
                                            "until": time_}},
                                        "running_jobs": {"type": "array",
                                                         "items": {"type": "string"}},
                                        "prepared_jobs": {
                                            "type": "array", "items": {"type": "string"},
                                            "description": "jobs made ready to start as "
                                            "soon as a running job's GPUs free"},
                                        "environments": {
                                            "type": "object", "additionalProperties":
                                            nullable_str, "description": "its environments: "
                                            "null when it works, else why not"},
                                        "error": nullable_str, "running_job": nullable_str,
                                        "queued_jobs": {"type": "integer"},
                                        "queued_seconds": {"type": "number"},
                                        "completed": {"type": "integer"},
                                        "failed": {"type": "integer"},
                                        "cancelled": {"type": "integer"}}},
            }},
        "paths": {
            "/": {"get": {"summary": "Service info", "responses": {"200": {
                "description": "name, version, routes, node count and queue length",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name", "service", "version", "endpoints",
                                                   "nodes", "queue_length"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "service": {"type": "string"},
                                   "endpoints": {"type": "array", "items": {
                                       "type": "object", "required": ["method", "path"],
                                       "properties": {"method": {"type": "string"},
                                                      "path": {"type": "string"}}}},
                                   "nodes": {"type": "integer"},
                                   "queue_length": {"type": "integer"},
                                   "docs": {"type": "string"},
                                   "limits": {"type": "object", "description": "what an upload "
                                              "and a job's files may be, in bytes and files",
                                              "additionalProperties": {"type": "integer"}}}}}}}}}},
            "/api/submit": {"post": {
                "summary": "Submit a job",
                "description": "The token comes from the Authorization header or, failing "
                               "that, from the config's `token` key.  The config: see the "
                               "JobConfig schema.  With an Idempotency-Key, the same key "
                               "from the same user within 24 hours answers as the first "
                               "submit did (Idempotent-Replayed: true) and queues nothing."
                               "  With wait=1 (or true) the answer comes when the job has "
                               "ended: 200 and its results, the connection kept alive "
                               "meanwhile with whitespace before the JSON (a space while "
                               "the job is pending, a newline while it runs); 202 at once "
                               "when it may end after max_wait_seconds "
                               f"({config.max_wait_seconds:g} s) or too many submits "
                               "wait already.  A job that overruns max_wait_seconds all "
                               "the same ends its 200 with the job's status and a message.",
                "security": secured + [{}],
                "parameters": [{"name": "Idempotency-Key", "in": "header",
                                "schema": {"type": "string", "minLength": 1,
                                           "maxLength": 255}},
                               {"name": "wait", "in": "query", "schema": {
                                   "type": "string", "enum": ["1", "true", "0", "false"]}}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["code", "config_file"],
                    "properties": {
                        "code": {"type": "string", "format": "binary",
                                 "description": "the Python script (UTF-8), or a project: a "
                                 "tar, tar.gz or zip of a folder, its script named by "
                                 "`entrypoint` (default main.py); unpacked at most "
                                 f"{config.max_project_bytes} bytes, "
                                 f"{config.max_project_files} files"},
                        "config_file": {"type": "string", "format": "binary",
                                        "description": "config.yaml: a YAML mapping with "
                                        + ", ".join(f"{k}{'' if required else ' (optional)'}"
                                                    for k, required in
                                                    ((k, v["config"] == "required")
                                                     for k, v in JOB_KEYS.items()))
                                        + f"; priority from {lo} to {hi}"}}}}}},
                "responses": {"201": answer("queued", "Submitted"),
                              "200": {"description": "(wait=1) the job ended: its results; "
                                      "or, past max_wait_seconds, its status and a message",
                                      "content": {"application/json": {"schema": {
                                          "anyOf": [ref("Waited"), {"allOf": [
                                              ref("JobStatus"), {"type": "object",
                                                                 "required": ["message"]}]}]}}}},
                              "202": answer("(wait=1) queued, not waited for: the message "
                                            "says why", "NotWaited"),
                              "400": answer("bad upload or config"), **errors,
                              "403": answer("user_id is not the token's user"),
                              "404": answer("a job in after or after_any does not exist, "
                                            "or is not the caller's"),
                              "422": answer("the Idempotency-Key came with another job"),
                              "429": answer("too many failed authentications, or too many "
                                            "pending jobs for this user"),
                              "507": answer("the spool's disk is nearly full"),
                              "411": answer("no Content-Length"),
                              "413": answer(f"upload larger than {config.max_upload_bytes} bytes"),
                              "415": answer("not multipart/form-data")}}},
            "/api/status/{job_id}": {"get": {
                "summary": "A job's status", "security": secured, "parameters": lenient_id,
                "responses": {"200": answer("the job", "JobStatus"), **errors,
                              "404": answer("no such job (or not yours)")}}},
            "/api/results/{job_id}": {"get": {
                "summary": "A finished job's output", "security": secured,
                "description": "With attempt=N: an earlier attempt's, kept when the job was "
                               "retried.",
                "parameters": lenient_id + [{"name": "attempt", "in": "query",
                                             "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": answer("stdout, stderr and exit code", "Results"), **errors,
                              "400": answer("bad query parameter"),
                              "404": answer("no such job (or not yours), or attempt"),
                              "409": answer("the job has not finished")}}},
            "/api/cancel/{job_id}": {"post": {
                "summary": "Cancel a pending or running job", "security": secured,
                "parameters": lenient_id,
                "description": "Answers at once: a pending job is cancelled now; a running one "
                               "shows cancel_requested until its node has stopped it.",
                "responses": {"200": answer("the job after the cancel", "JobStatus"), **errors,
                              "404": answer("no such job (or not yours)"),
                              "409": answer("the job had already finished"),
                              "507": answer("no room on the spool's disk to record the "
                                            "cancel; nothing changed")}}},
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
                    {"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                        "default": PAGE_DEFAULT}},
                    {"name": "cursor", "in": "query", "description": "next_cursor of the page before",
                     "schema": {"type": "string", "pattern": f"^{JOB_ID_PATTERN}$"}}],
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
                               "the job runs. With follow=1: NDJSON lines ({stream, offset, "
                               "data}...) until a last line {end, status, exit_code, error} or "
                               "{error}.",
                "security": secured,
                "parameters": lenient_id + [
                    {"name": "stream", "in": "query", "description": "both: stdout and "
                     "stderr together, with follow=1 (each line says which)",
                     "schema": {"type": "string", "enum": ["stdout", "stderr", "both"]}},
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
            "/api/arrays/{array_id}": {"get": {
                "summary": "An array (or sweep): its jobs and how many are in each state",
                "description": "POST /api/cancel/{array_id} cancels its jobs that have not "
                               "finished; GET /api/jobs?array={array_id} lists them.",
                "security": secured,
                "parameters": [{"name": "array_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the array", "content": {
                    "application/json": {"schema": {
                        "type": "object",
                        "required": ["array_id", "user_id", "size", "limit", "counts",
                                     "job_ids", "submitted_at"],
                        "properties": {
                            "array_id": {"type": "string"}, "user_id": {"type": "string"},
                            "size": {"type": "integer"},
                            "limit": {"type": "integer", "nullable": True},
                            "counts": {"type": "object",
                                       "additionalProperties": {"type": "integer"}},
                            "job_ids": {"type": "array", "items": {"type": "string"}},
                            "submitted_at": time_}}}}},
                    **errors, "404": answer("no such array (or not yours)")}}},
            "/api/outputs/{job_id}": {"get": {
                "summary": "A job's files",
                "description": "What the job left in $GPUQUEUE_OUTPUT_DIR, once brought back "
                               "(state collecting until then); while it runs, what is on its "
                               "node so far (no sha256). With archive=tar: all of them as one "
                               "tar.",
                "security": secured,
                "parameters": lenient_id + [{"name": "archive", "in": "query",
                                             "schema": {"type": "string", "enum": ["tar"]}}],
                "responses": {"200": {"description": "the listing, or the tar", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["job_id", "state", "files", "skipped",
                                                       "truncated", "cut", "error"],
                        "properties": {
                            "job_id": {"type": "string"},
                            "state": {"type": "string",
                                      "enum": ["running", *OUTPUT_STATES]},
                            "files": {"type": "array", "items": {
                                "type": "object", "properties": {
                                    "path": {"type": "string"}, "size": {"type": "integer"},
                                    "sha256": {"type": "string", "nullable": True}}}},
                            "skipped": {"type": "array", "items": {
                                "type": "object", "properties": {
                                    "path": {"type": "string"}, "reason": {"type": "string"}}}},
                            "truncated": {"type": "boolean"},
                            "cut": {"type": "object", "nullable": True, "description":
                                    "files and bytes left out at the limits"},
                            "error": {"type": "string", "nullable": True}}}},
                    "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                    "400": answer("bad query parameter"), **errors, "404": answer("no such job"),
                    "409": answer("the job is pending"),
                    "503": answer("the node cannot be read now")}}},
            "/api/outputs/{job_id}/{path}": {"get": {
                "summary": "One of a job's files",
                "description": "Its bytes; with a Range header, a part of them (206), so "
                               "that an interrupted download resumes.",
                "security": secured,
                "parameters": lenient_id + [{"name": "path", "in": "path", "required": True,
                                             "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}},
                              "206": {"description": "the range asked for", "content": {
                                  "application/octet-stream": {"schema": {
                                      "type": "string", "format": "binary"}}}},
                              **errors, "404": answer("no such job or file"),
                              "409": answer("the job is pending"),
                              "416": answer("the range is outside the file"),
                              "503": answer("the node cannot be read now")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format 0.0.4", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.0",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/docs": {"get": {"summary": "This document in Swagger UI", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {
                    "schema": {"type": "string"}}}}}}},
        },
    }


#: /docs: Swagger UI, its files served from the swagger-ui-bundle package (nothing
#: from elsewhere: a cluster's head node is often offline), with try-it-out on.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gpuqueue API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""
DOCS_INIT = """window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  tryItOutEnabled: true, persistAuthorization: false, validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"
});
"""
#: The package's files that DOCS_PAGE uses; nothing else of it is served.
DOCS_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "application/javascript",
               "favicon-32x32.png": "image/png"}


###############################################################################
# Dashboard ###################################################################
###############################################################################

#: /ui and /ui/job/<id>: one Bottle template.  The server renders the page and
#: what anyone may see (the nodes); the script fills in what needs the token,
#: which is entered once, kept in the browser's localStorage and sent only as a
#: Bearer header.  No external assets: a cluster's head node is often offline.
#: Data reaches the page through textContent only, never as HTML.
DASHBOARD = r"""<!doctype html>
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
<th>Running job</th><th>Queued</th><th>Queued work</th><th>GPUs: busy, held (for a job that needs more), foreign (used outside the queue) or free</th><th>Environments</th></tr></thead><tbody>
% for n in nodes:
<tr><td>{{n["id"]}}</td><td>{{n["host"]}}</td><td class="{{n["state"]}}">{{n["state"]}}{{" (drained)" if n["drained"] else ""}}</td>
<td class="id">{{", ".join(n.get("running_jobs") or []) or "–"}}</td><td>{{n["queued_jobs"]}}</td><td>{{duration(n["queued_seconds"])}}</td><td>{{gpu_text(n)}}</td><td>{{environments_text(n)}}</td></tr>
% end
</tbody></table></section>
<section><h2>Jobs</h2><p>Yours (an admin's token shows everyone's), newest first; your pending ones in each node's queue show their place.</p>
<table id="jobs"><thead><tr><th>Job</th><th>User</th><th>Status</th><th>Node</th><th>Queue</th>
<th>Submitted</th><th>Exit</th></tr></thead><tbody></tbody></table></section>
% else:
<section><h2>Job <span class="id" id="job-id">{{job_id}}</span></h2>
<dl id="job"></dl><button id="cancel" type="button">Cancel this job</button>
<h3>stdout</h3><pre id="stdout"></pre><h3>stderr</h3><pre id="stderr"></pre>
<h3>Files</h3><p id="files-state"></p><table id="files"><thead><tr><th>File</th><th>Bytes</th><th>sha256</th></tr></thead><tbody></tbody></table></section>
% end
</main>
<script nonce="{{nonce}}">
"use strict";
const $ = id => document.getElementById(id);
const JOB = {{!json_job_id}};
let token = localStorage.getItem("gpuqueue.token") || "";
let refused = "";  // why the last token was dropped
const WAIT_MS = 30000;  // a request that never settles (a half-open link) must not stop the refreshes
function showError(text) { $("error").textContent = text || ""; }
function showLogin() {
  $("who").textContent = token ? "token set" : "no token";
  $("token").hidden = $("save").hidden = !!token;
  $("forget").hidden = !token;
}
async function api(path, options) {
  const sent = token;
  const r = await fetch(path, Object.assign({headers: {"Authorization": "Bearer " + sent},
                                             signal: AbortSignal.timeout(WAIT_MS)}, options || {}));
  const body = await r.json().catch(() => ({error: "HTTP " + r.status}));
  if (r.status === 401 && sent && sent === token) {  // expired or revoked: stop presenting it, ask anew
    token = "";                                      // (not one entered since this request left)
    localStorage.removeItem("gpuqueue.token");
    refused = (body.error || "token refused") + ": enter a new token.";
    showLogin();
    throw new Error(refused);  // the reason it was dropped, shown at once
  }
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
  const read = Object.fromEntries((n.gpus || []).map(g => [g.device, g]));
  return (n.gpu_slots || []).map(s => {
    const g = read[s.gpu];
    return s.gpu + ": " + s.state + (g ? ", " + g.name + " " + (g.memory_used_mib ?? "?") + "/" +
      (g.memory_total_mib ?? "?") + " MiB " + (g.utilization_pct ?? "?") + "%" +
      (g.foreign ? ", " + g.foreign : "") : "");
  }).join("; ") || "–";
}
const envText = n => Object.entries(n.environments || {}).map(([name, why]) => why ? name + " (not working: " + why + ")" : name).join(", ") || "–";
async function refreshNodes() {
  const r = await fetch("/api/nodes", {signal: AbortSignal.timeout(WAIT_MS)});
  const {nodes} = await r.json();
  $("nodes").tBodies[0].replaceChildren(...nodes.map(n => row([
    [n.id], [n.host], [n.state + (n.drained ? " (drained)" : ""), n.state],
    [(n.running_jobs || []).join(", ") || null, "id"],
    [n.queued_jobs], [duration(n.queued_seconds)], [gpuText(n)], [envText(n)]])));
}
// People count from 1; the API's queue_position from 0 (0 is next).
const inLine = p => p === 0 ? "next" : "#" + (p + 1);
const openArrays = new Set();  // arrays whose jobs are shown, across refreshes
async function refreshJobs() {
  const {jobs} = await api("/api/jobs?limit=50");
  const jobRow = j => {
    const queue = j.status === "pending" ? (j.queue_position === null ? j.waiting || null :
      inLine(j.queue_position) + ", starts ≈ " + clock(j.estimated_start)) : null;
    const tr = row([[j.job_id, "id", "/ui/job/" + j.job_id], [j.user_id], [j.status, "status " + j.status],
                    [j.node_id], [queue], [clock(j.submitted_at)], [j.exit_code]]);
    tr.dataset.job = j.job_id;
    return tr;
  };
  // An array is one row, which opens to show its jobs.
  const rows = [], arrays = {};
  for (const j of jobs) {
    if (!j.array_id) { rows.push(jobRow(j)); continue; }
    if (!arrays[j.array_id]) {
      arrays[j.array_id] = [];
      const head = document.createElement("tr");
      head.dataset.array = j.array_id;
      rows.push(head);
    }
    arrays[j.array_id].push(j);
  }
  const out = [];
  for (const tr of rows) {
    out.push(tr);
    const id = tr.dataset.array;
    if (!id) continue;
    const members = arrays[id], counts = {};
    for (const j of members) counts[j.status] = (counts[j.status] || 0) + 1;
    const cell = document.createElement("td");
    cell.colSpan = 7;
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.textContent = (openArrays.has(id) ? "▾ " : "▸ ") + "array " + id;
    toggle.addEventListener("click", () => {
      openArrays.has(id) ? openArrays.delete(id) : openArrays.add(id);
      refresh();
    });
    cell.append(toggle, " " + members[0].array_size + " jobs: " +
      Object.entries(counts).map(([k, v]) => v + " " + k).join(", "));
    tr.append(cell);
    if (openArrays.has(id)) out.push(...members.map(jobRow));
  }
  $("jobs").tBodies[0].replaceChildren(...out);
}
const offsets = {stdout: 0, stderr: 0};
let filesDone = false;  // the listing of a finished job's files no longer changes
// A file link needs the token, which a plain link cannot send: fetched, then saved.
async function download(path) {
  try {
    const r = await fetch("/api/outputs/" + JOB + "/" + path.split("/").map(encodeURIComponent).join("/"),
                          {headers: {"Authorization": "Bearer " + token}});
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || "HTTP " + r.status);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = path.split("/").pop();
    a.click();
    URL.revokeObjectURL(a.href);
  } catch (e) { showError(e.message); }
}
async function refreshFiles(status) {
  if (filesDone || status === "pending") return;
  const f = await api("/api/outputs/" + JOB);
  $("files-state").textContent = f.state + (f.error ? ": " + f.error : "") +
    (f.skipped.length ? "; skipped: " + f.skipped.map(s => s.path + " (" + s.reason + ")").join(", ") : "");
  $("files").tBodies[0].replaceChildren(...f.files.map(x => {
    const tr = row([[x.path], [x.size], [x.sha256 ? x.sha256.slice(0, 16) : null, "id"]]);
    const a = document.createElement("a");
    a.href = "#"; a.textContent = x.path;
    a.addEventListener("click", ev => { ev.preventDefault(); download(x.path); });
    tr.cells[0].replaceChildren(a);
    return tr;
  }));
  filesDone = !["running", "collecting"].includes(f.state);
}
async function refreshJob() {
  const j = await api("/api/status/" + JOB);
  const items = [["status", j.status], ["user", j.user_id], ["node", j.node_id], ["priority", j.priority],
    ["queue", j.queue_position === undefined ? null : inLine(j.queue_position)],
    ["estimated start", clock(j.estimated_start)],
    ["expected", duration(j.expected_time)], ["killed after", j.status === "pending" || j.status === "running" ? duration(j.time_limit) : null], ["submitted", clock(j.submitted_at)],
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
  await refreshFiles(j.status);
}
let refreshing = false, again = false;
async function refresh() {  // one at a time: two at once would append the same output twice
  if (refreshing) { again = true; return; }
  refreshing = true;
  try { await render(); } finally { refreshing = false; }
  if (again) { again = false; refresh(); }
}
async function render() {
  showLogin();
  try {
    if (!token) showError(refused || "Enter your token to see your jobs.");  // before any wait
    if (JOB === null) await refreshNodes();
    if (!token) return;
    await (JOB === null ? refreshJobs() : refreshJob());
    showError("");
  } catch (e) { showError(e.message); }
}
$("login").addEventListener("submit", ev => {
  ev.preventDefault();
  token = $("token").value.trim();
  refused = "";
  $("token").value = "";
  localStorage.setItem("gpuqueue.token", token);
  showLogin();
  refresh();
});
$("forget").addEventListener("click", () => {
  token = ""; localStorage.removeItem("gpuqueue.token"); showLogin(); refresh();
});
if (JOB !== null) $("cancel").addEventListener("click", async () => {
  try { await api("/api/cancel/" + JOB, {method: "POST"}); } catch (e) { showError(e.message); }
  refresh();
});
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""



def duration(seconds):
    """Seconds for people, as the page's script writes them too."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def environments_text(node):
    """A node's environments in one line, as the page's script writes them too."""
    return ", ".join(f"{name} (not working: {why})" if why else name
                     for name, why in (node.get("environments") or {}).items()) or "–"


def gpu_text(node):
    """A node's GPUs in one line, as the page's script writes them too: each one's
    state in the queue, then what nvidia-smi says of it."""
    read = {g["device"]: g for g in node.get("gpus") or ()}
    parts = []
    for slot in node.get("gpu_slots") or ():
        text, g = f"{slot['gpu']}: {slot['state']}", read.get(slot["gpu"])
        if g:
            used, total, busy = ("?" if g[k] is None else g[k] for k in
                                 ("memory_used_mib", "memory_total_mib", "utilization_pct"))
            text += (f", {g['name']} {used}/{total} MiB {busy}%"
                     + (f", {g['foreign']}" if g["foreign"] else ""))
        parts.append(text)
    return "; ".join(parts) or "–"


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


#: The longest name of a dropped folder, in bytes: NAME.<job id>.result.json must fit
#: in a file name (255 bytes).
MAX_DROP_NAME = 200


class Incoming:
    """spool/incoming/: a folder dropped there holding one ``.py`` script and a
    ``config.yaml`` (same keys as an upload, token included) becomes a job; so does
    a project folder (subfolders allowed) whose config.yaml names its
    ``entrypoint``.

    The outcome stays where the folder was dropped; nothing dropped is deleted::

        NAME.<job id>.accepted/   the folder as dropped, and NAME.<job id>.receipt.json
        NAME.<job id>.stdout      once the job has ended: its output, and then
        NAME.<job id>.stderr      NAME.<job id>.result.json (status, exit code,
        NAME.<job id>.outputs/    error, times, how its files came back), written
                                  last; outputs/ holds the job's files
        NAME.<time>.refused/      the folder as dropped, and NAME.<time>.reason.txt

    Names starting with '.' are never looked at: copy a folder in under a
    dot-name, then rename it.  A folder must also have been still for
    INCOMING_QUIET seconds.

    Only the server makes claims.  Before a folder is renamed to .accepted, the
    claim is written where no user can write (claims/<job id>.json: the folder's
    name; then its job ids); recovery and delivery read the claims, never names
    in incoming/, which anyone who may drop a folder may also plant.  A job's
    results are delivered through a private folder on the same disk and renamed
    in, so a crash leaves nothing half-written in incoming/; claims/<claim>.<job
    id>.delivering marks a delivery under way (with what was found planted), and
    .delivered one that is done.  A name someone planted where a result is due is
    left as it is, and result.json says what was not delivered and where it is.
    """

    OUTCOME = re.compile(r"\.(?:[0-9a-f]{24}\.(?:accepted|receipt\.json|stdout|stderr|result\.json"
                         r"|outputs)|[0-9T]{21}Z\.(?:refused|reason\.txt))\Z")

    def __init__(self, scheduler):
        self.dir = scheduler.incoming_dir()
        self.claims = scheduler.claims_dir()
        self.scratch = scheduler.scratch_dir("incoming")
        self.scheduler = scheduler
        self.max_bytes = scheduler.config.max_upload_bytes
        #: The claims not done yet: claim id (its first job's id) -> its record.
        self.open = {}
        #: Names already logged as taken by something planted: said once.
        self.said = set()

    def recover(self):
        """Take up every claim a former run left unfinished: its job queued (unless it
        already is), its receipt, its results as its jobs end."""
        for entry in os.scandir(self.claims):
            claim_id = entry.name[:-5]
            if not (entry.name.endswith(".json") and JOB_ID_RE.match(claim_id)):
                continue
            try:
                claim = read_json(entry.path)
                if not isinstance(claim.get("name"), str):
                    raise ValueError("no folder name")
            except (OSError, ValueError, AttributeError) as exc:
                log.error("incoming: claim %s unreadable, left as it is: %s", claim_id, exc)
                continue
            self.open[claim_id] = claim

    def scan(self):
        for claim_id, claim in list(self.open.items()):
            self._guarded(self._advance, claim_id, claim)
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
        if len(os.fsencode(name)) > MAX_DROP_NAME:  # (its outcomes' names would not fit)
            self._refuse(name, path, f"its name is longer than {MAX_DROP_NAME} bytes, which "
                         "leaves no room for the names of what comes back; it is set aside "
                         "under its name cut short", os.fsdecode(os.fsencode(name)[:150]))
            return
        try:
            self._files(path)
        except BadRequest as exc:
            self._refuse(name, path, exc.message)
            return
        claim_id = new_job_id()
        claim = {"name": name, "job_ids": None}
        write_json(self.claims / f"{claim_id}.json", claim)  # the server's claim, first
        try:
            os.rename(path, self.dir / f"{name}.{claim_id}.accepted")
        except OSError:  # (taken away meanwhile): no claim on it is left behind
            (self.claims / f"{claim_id}.json").unlink()
            raise
        fsync_dir(self.dir)
        self.open[claim_id] = claim
        self._advance(claim_id, claim)

    def _advance(self, claim_id, claim):
        """One step of a claim: its job queued and its receipt written (once), each
        job's results delivered once it has ended, then the claim forgotten."""
        if claim["job_ids"] is None and not self._queue(claim_id, claim):
            return
        name, done = claim["name"], 0
        for job_id in claim["job_ids"]:
            if (self.claims / f"{claim_id}.{job_id}.delivered").exists() or \
                    self._deliver(claim_id, job_id, name):
                done += 1
        if done == len(claim["job_ids"]):
            for job_id in claim["job_ids"]:
                (self.claims / f"{claim_id}.{job_id}.delivered").unlink(missing_ok=True)
            (self.claims / f"{claim_id}.json").unlink()
            del self.open[claim_id]

    def _queue(self, claim_id, claim):
        """Queue a claimed folder's job (unless a crash left it queued already), then
        write its receipt; False while it must wait (or once it was refused)."""
        name = claim["name"]
        path = self.dir / f"{name}.{claim_id}.accepted"
        array = None
        try:
            job = self.scheduler.job(claim_id)
            position, start = self.scheduler.queue_position(job)
        except NotFound:
            try:
                try:  # an array queued before a crash: its id is the claim's
                    array = {"array_id": claim_id,
                             "job_ids": self.scheduler.array(claim_id, counts=False)["job_ids"]}
                    job, position, start = self.scheduler.job(array["job_ids"][0]), None, None
                except NotFound:
                    if not os.path.lexists(path):  # a crash came between the claim and
                        log.warning("incoming: %r was claimed but is gone; the claim is "
                                    "dropped", name)  # the rename, or it was taken away
                        (self.claims / f"{claim_id}.json").unlink()
                        del self.open[claim_id]
                        return False
                    script, config = self._files(path)
                    job, position, start, _, array = self.scheduler.submit(script, config,
                                                                           job_id=claim_id)
            except Unavailable as exc:
                log.warning("incoming: %r waits: %s", name, exc.message)
                return False  # tried again at the next scan
            except GpuqueueError as exc:
                self._refuse(f"{name}.{claim_id}.accepted", path, exc.message, name)
                (self.claims / f"{claim_id}.json").unlink()
                del self.open[claim_id]
                return False
        claim["job_ids"] = array["job_ids"] if array else [job.id]
        self._publish(f"{name}.{claim_id}.receipt.json", json.dumps({
            "job_id": job.id, "node_id": job.node_id, "status": "pending",
            "queue_position": position, "estimated_start": isotime(start),
            "submitted_at": isotime(job.submitted_at),
            "user_id": job.user_id, **(array or {})}, indent=1).encode() + b"\n")
        write_json(self.claims / f"{claim_id}.json", claim)
        log.info("incoming: %r became %s %s", name, "array" if array else "job", claim_id)
        return True

    def _deliver(self, claim_id, job_id, name):
        """Put a finished job's output and outcome beside its receipt, so that a
        drop-folder user needs no HTTP client at all; result.json goes last.  True
        once delivered (or once there is nothing left to deliver it for)."""
        try:
            job = self.scheduler.job(job_id)
        except NotFound:
            log.warning("incoming: job %s of %r is gone; its results cannot be delivered",
                        job_id, name)
            return True
        if job.status not in FINAL_STATES or job.outputs == "collecting":
            return False
        marker = self.claims / f"{claim_id}.{job_id}.delivering"
        stem = f"{name}.{job_id}"
        items = ("stdout", "stderr", "outputs", "result.json")
        try:
            planted = read_json(marker)["planted"]  # a delivery cut short: go on with it
        except (OSError, ValueError, KeyError, TypeError):
            planted = [i for i in items if os.path.lexists(self.dir / f"{stem}.{i}")]
            write_json(marker, {"planted": planted})
        with self.scheduler.kept(job):
            listing = self._deliver_files(job, f"{stem}.outputs", planted)
            for stream, path in self.scheduler.output(job).items():
                if stream not in planted:
                    self._publish(f"{stem}.{stream}", source=path)
        result = {"job_id": job.id, "status": job.status, "exit_code": job.exit_code,
                  "error": job.error, "node_id": job.node_id,
                  "submitted_at": isotime(job.submitted_at),
                  "started_at": isotime(job.started_at),
                  "finished_at": isotime(job.finished_at),
                  "outputs": {k: listing[k] for k in ("state", "skipped", "cut", "error")}}
        if planted:
            result["undelivered"] = {
                item: f"{stem}.{item} was already taken (by something put there by someone "
                      f"else) and was left as it is; GET /api/{'outputs' if item == 'outputs' else 'results'}/{job.id} has it"
                for item in planted}
            if (stem, tuple(planted)) not in self.said:
                self.said.add((stem, tuple(planted)))
                log.warning("incoming: %s of %r not delivered: the name was taken",
                            ", ".join(planted), name)
        if "result.json" not in planted:
            self._publish(f"{stem}.result.json", json.dumps(result, indent=1,
                                                             sort_keys=True).encode() + b"\n")
        os.rename(marker, self.claims / f"{claim_id}.{job_id}.delivered")
        return True

    def _deliver_files(self, job, target, planted):
        """The job's files as NAME.<id>.outputs/, made in the private scratch folder
        and renamed in whole, before result.json says the job is done (unless the
        name was taken: then they stay on the server alone)."""
        listing, files = self.scheduler.outputs(job)
        if "outputs" in planted:
            return listing
        final = self.dir / target
        if final.is_dir() and not final.is_symlink():
            return listing  # delivered before a crash
        tmp = self.scratch / job.id
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for path, (_, opener) in files.items():
            dest = tmp.joinpath(*path.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with opener() as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out, FILE_CHUNK)
        os.rename(tmp, final)
        return listing

    def _publish(self, name, data=b"", source=None):
        """A file in incoming/ (``data``, or a copy of the file ``source``), written in
        the private scratch folder, synced and renamed in: whole or absent, never a
        temporary name in the users' folder."""
        tmp = self.scratch / f"{secrets.token_hex(8)}.tmp"
        with open(tmp, "xb") as out:
            if source is None:
                out.write(data)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, FILE_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, self.dir / name)
        fsync_dir(self.dir)

    def _refuse(self, current, path, reason, name=None):
        """Set the folder aside, then say why: the reason file is what a user (or a
        script) waits for, so it must not appear before the folder it speaks of."""
        base = f"{name or current}.{utcnow().strftime('%Y%m%dT%H%M%S%f')}Z"
        os.rename(path, self.dir / f"{base}.refused")
        self._publish(f"{base}.reason.txt", f"refused: {reason}\n".encode())
        log.warning("incoming: refused %r: %s", name or current, reason)

    def _quiet(self, path):
        """Has nothing in the folder, at any depth, changed for INCOMING_QUIET seconds?
        (A project copied in place grows deep down, where no time above it moves.)  One
        with more entries than a project may have is taken at once, to be refused."""
        newest = os.lstat(path).st_mtime
        if stat.S_ISDIR(os.lstat(path).st_mode):
            left = self.scheduler.config.max_project_files
            for top, dirs, names in os.walk(path):  # (links are not followed)
                for n in dirs + names:
                    left -= 1
                    if left < 0:
                        return True
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(os.path.join(top, n))
                        newest = max(newest, st.st_mtime, st.st_ctime)
        return time.time() - newest >= INCOMING_QUIET

    def _files(self, path):
        """(script bytes, config bytes) of a drop folder, or BadRequest saying why not."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise BadRequest("a symbolic link; drop a real folder")
        if not stat.S_ISDIR(st.st_mode):
            raise BadRequest("not a folder; drop a folder holding one .py script and config.yaml")
        if self._is_project(path):
            return self._project(path), _read_nofollow(path / "config.yaml", MAX_CONFIG_BYTES)
        scripts, total = [], 0
        names = sorted(os.listdir(path))
        for n in names:
            st = os.lstat(path / n)
            if stat.S_ISLNK(st.st_mode):
                raise BadRequest(f"{n!r} is a symbolic link")
            if stat.S_ISDIR(st.st_mode):
                raise BadRequest(f"{n!r} is a folder; nested folders are accepted in a "
                                 "project alone, with entrypoint: in its config.yaml")
            if not stat.S_ISREG(st.st_mode):
                raise BadRequest(f"{n!r} is not a regular file")
            total += st.st_size
            if total > self.max_bytes:
                raise BadRequest(f"larger than {self.max_bytes} bytes in all")
            if n.endswith(".py"):
                scripts.append(n)
            elif n != "config.yaml":
                raise BadRequest(f"unexpected file {n!r}; a drop folder holds one .py script "
                               "and config.yaml")
        if len(scripts) != 1 or "config.yaml" not in names:
            raise BadRequest("a drop folder holds exactly one .py script and one config.yaml")
        return (_read_nofollow(path / scripts[0], self.max_bytes),
                _read_nofollow(path / "config.yaml", MAX_CONFIG_BYTES))

    @staticmethod
    def _is_project(path):
        """Does the folder's config.yaml name an entrypoint (then it is a project)?"""
        try:
            cfg = yaml.safe_load(_read_nofollow(path / "config.yaml", MAX_CONFIG_BYTES))
        except (OSError, BadRequest, yaml.YAMLError, ValueError):
            return False  # _files says what is wrong with it
        return isinstance(cfg, dict) and "entrypoint" in cfg

    def _project(self, path):
        """A dropped project as a tar, config.yaml (its token) left out; links and
        special files refused, the project limits checked as it is read."""
        import tarfile
        c = self.scheduler.config
        buf, count, total = io.BytesIO(), 0, 0
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for top, dirs, names in os.walk(path):
                here = Path(top).relative_to(path)
                for n in sorted(dirs) + sorted(names):
                    rel = (here / n).as_posix()
                    st = os.lstat(Path(top) / n)
                    if stat.S_ISLNK(st.st_mode):
                        raise BadRequest(f"{rel!r} is a symbolic link")
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        raise BadRequest(f"{rel!r} is not a regular file")
                    count += 1
                    if count > c.max_project_files:
                        raise BadRequest(f"more than {c.max_project_files} files "
                                         "(max_project_files)")
                    if rel == "config.yaml" or stat.S_ISDIR(st.st_mode):
                        continue
                    if total + st.st_size > c.max_project_bytes:
                        raise BadRequest(f"larger than {c.max_project_bytes} bytes in all "
                                         "(max_project_bytes)")
                    data = _read_nofollow(Path(top) / n, c.max_project_bytes - total)
                    total += len(data)
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode = len(data), st.st_mode & 0o755
                    tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def _read_nofollow(path, most):
    """A dropped file's bytes, ``most`` at most: a link swapped in after it was
    checked is not followed, nor a FIFO waited for (open_regular), and a file that
    holds more (one that grew since it was looked at) is refused, never read whole."""
    try:
        with open_regular(path) as f:
            data = f.read(most + 1)
    except OSError as exc:  # (NotRegular says what stands there)
        raise BadRequest(f"cannot read {path.name!r}: {exc.strerror or exc}") from None
    if len(data) > most:
        raise BadRequest(f"{path.name!r} holds more than {most} bytes")
    return data


###############################################################################
# Admin control ###############################################################
###############################################################################

#: Seconds an admin command waits for the running server's reply.
CONTROL_TIMEOUT = 15
#: Replies nobody collected (their command gave up waiting) go after this long.
CONTROL_REPLY_TTL = 3600
#: The most bytes of a request: an admin command's take a few dozen.
MAX_CONTROL_BYTES = 64 * 1024


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

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.dir = scheduler.control_dir()

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
            request = self._read(path)
        except FileNotFoundError:
            return
        except ValueError as exc:  # set aside, never carried out, never in the way
            self.scheduler.quarantine(path, f"control request set aside: {exc}")
            write_json(self.dir / f"{name}.reply.json",
                       {"ok": False, "error": f"unreadable request, set aside: {exc}"})
            return
        try:
            reply = self.apply(request)
        except Exception as exc:
            log.exception("control: request %s failed", name)
            reply = {"ok": False, "error": f"internal error: {exc}"}
        write_json(self.dir / f"{name}.reply.json", reply)
        path.unlink()
        fsync_dir(self.dir)

    @staticmethod
    def _read(path):
        """A request's JSON, read as nothing may jam the scan: only a regular file of
        the server's own user, opened without following a link or waiting on a
        FIFO, MAX_CONTROL_BYTES at most, nested no deeper than the parser takes;
        ValueError saying why not."""
        try:
            with open_regular(path) as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.getuid():
                    raise ValueError("it is not the server user's own file")
                if st.st_size > MAX_CONTROL_BYTES:
                    raise ValueError(f"larger than {MAX_CONTROL_BYTES} bytes")
                data = f.read(MAX_CONTROL_BYTES + 1)
        except NotRegular as exc:
            raise ValueError(f"not a regular file but {exc.strerror}") from None
        except PermissionError as exc:
            raise ValueError(f"unreadable: {exc.strerror}") from None
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("nested deeper than a request can be") from None
        except ValueError:
            raise ValueError("not JSON") from None

    def apply(self, req):
        """Carry out one request; returns the reply: ``ok``, then ``error`` or the data."""
        op = req.get("op") if isinstance(req, dict) else None
        sched = self.scheduler
        try:
            if op == "nodes":
                return {"ok": True, "nodes": sched.nodes()}
            if op in ("drain", "resume"):
                return {"ok": True, "message": sched.drain(req.get("node"), op == "drain")}
            if op == "jobs":
                return self._jobs(req.get("user"), req.get("status"), req.get("limit", 50))
            if op == "cancel":
                return self._cancel(req.get("job"))
        except GpuqueueError as exc:
            return {"ok": False, "error": exc.message}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _jobs(self, user, status, limit):
        if status is not None and status not in STATES:
            raise BadRequest(f"status must be one of {', '.join(STATES)}")
        if not (isinstance(limit, int) and limit > 0):
            raise BadRequest("limit must be a whole number above 0")
        found, _ = self.scheduler.find(user, status, limit)
        return {"ok": True, "jobs": [{**job.public(), "queue_position":
                                      self.scheduler.shown(job).get("queue_position")}
                                     for job in found]}

    def _cancel(self, job_id):
        job = self.scheduler.cancel(self.scheduler.job(job_id))
        if job.status != "running":
            return {"ok": True, "message": f"job {job.id} cancelled"}
        when = "now" if self.scheduler.serving else "as soon as the server starts"
        return {"ok": True, "message": f"job {job.id} is running on node {job.node_id}: "
                                       f"it is being stopped {when}"}


def served_spool(config):
    """Refuse, in one line, an admin command about to act on a spool that no server
    has used: run from the wrong folder, it would make a new empty spool (or tokens
    file) there and report a success that changed nothing."""
    if not (config.spool / "server.lock").is_file():
        if config.source:
            raise ConfigError(
                f"no gpuqueue server has used the spool {config.spool} (from the config "
                f"{config.source}): start the server with that config first, or name the "
                "config of the server that runs with --config PATH or GPUQUEUE_CONFIG")
        raise ConfigError(
            f"no gpuqueue server has used the spool {config.spool} (the built-in default "
            "config's, beside gpuqueue.py): start it with 'make run' first, or, for a server "
            "started with a config file, name that file with --config PATH or "
            "GPUQUEUE_CONFIG")


def admin_tokens(config):
    """The token file of an admin's command.  Named by a config file, it may be
    made new; the built-in default's (./tokens.yaml) only beside a spool a server
    has used, so that a command run in the wrong folder makes none there."""
    if config.source is None and not config.tokens.exists():
        served_spool(config)
    return Tokens(config.tokens)


def control(config, request):
    """Carry out an admin request: through the running server's control/ folder
    or, with no server running, on the spool directly."""
    served_spool(config)
    spool = Spool(config.spool, [n.id for n in config.nodes], config.gpu_counts)
    try:
        spool.open()
    except SpoolBusy:
        return _ask_server(spool.root / "control", request)
    try:
        return Control(Scheduler(config, spool, serving=False)).apply(request)
    finally:
        spool.close()


def _ask_server(folder, request):
    name = new_job_id()
    write_json(folder / f"{name}.request.json", request)
    reply = folder / f"{name}.reply.json"
    deadline = time.monotonic() + CONTROL_TIMEOUT
    while not reply.exists():
        if time.monotonic() > deadline:
            raise Unavailable(
                f"the server did not answer within {CONTROL_TIMEOUT} s; the request stays in "
                f"{folder} and is carried out when it does")
        time.sleep(0.1)  # a command's own wait, not the server's: nothing to be woken by
    answer = read_json(reply)
    reply.unlink()
    return answer


###############################################################################
# CLI #########################################################################
###############################################################################
#
# Two halves.  The client commands speak to a server over HTTP with the standard
# library alone (argparse, urllib), so that gpuqueue.py copied to a user's laptop
# runs them on a bare python3.  The server's own commands (serve, tokens, nodes,
# jobs list|cancel) are a Click group built on first use: only they import click
# and the server's packages.  main() hands each command line to its half.

#: The client commands; ``jobs list`` and ``jobs cancel`` are the admin's, through the spool.
#: Seconds the client waits before it sends a submit again whose connection broke.
SUBMIT_RETRIES = (1, 2, 4)
CLIENT_COMMANDS = ("submit", "status", "results", "cancel", "logs", "jobs", "outputs")
#: The server's commands, for the help of a python that cannot run them.
SERVER_COMMANDS = ("serve", "tokens", "nodes", "jobs list", "jobs cancel")
#: Where the client commands look for the server unless told (--server, GPUQUEUE_URL).
DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds between a waiting client's looks at its job.
WAIT_POLL = 1.0
#: Seconds of silence after which a client gives up a stream (a follow, a waiting
#: submit): the server sends a space every FOLLOW_KEEPALIVE seconds meanwhile.
FOLLOW_SILENCE = 20


def server_root(url):
    """The server's root URL from what a user gave (--server, GPUQUEUE_URL): http://
    is assumed when no scheme is given; a path is refused, as every route is the
    root's own (a URL ending in /api would make every answer a 404)."""
    given = url.strip()
    full = given if "://" in given else f"http://{given}"
    try:
        parts = urllib.parse.urlsplit(full)
        parts.port  # a port that is no number raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise GpuqueueError(f"{url!r} is not a URL: give the server's root URL, like "
                            f"{DEFAULT_URL}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise GpuqueueError(f"{url} is not the server's root URL: give it without a path, "
                            f"like {parts.scheme}://{parts.netloc}")
    return f"{parts.scheme}://{parts.netloc}"


# -- client commands: the HTTP API for people and scripts ----------------------


class Client:
    """The HTTP API as the client commands call it."""

    def __init__(self, server, token):
        self.server = server_root(server)
        self.token = token

    def _request(self, method, path, body=None, headers=None):
        if not self.token:
            raise Unauthorized("no token: pass --token or set GPUQUEUE_TOKEN")
        return urllib.request.Request(
            self.server + path, data=body, method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})})

    def _open(self, request, timeout=60):
        try:
            return urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise GpuqueueError(
                    f"{self.server} answered with a redirect (HTTP {exc.code}) to "
                    f"{exc.headers.get('Location')}: if that is the server, give it as "
                    "--server or GPUQUEUE_URL (nothing, the token least, was sent on)") from None
            try:
                message = json.loads(exc.read(65536))["error"]
            except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
                message = f"{exc.reason}, from what is not a gpuqueue server's answer: is " \
                          f"{self.server} the server's root URL?"
            raise GpuqueueError(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach {self.server}: "
                              f"{getattr(exc, 'reason', None) or exc!r}") from None

    def _not_ours(self, r, exc):
        return Unavailable(f"{self.server} did not answer as a gpuqueue server does "
                           f"({r.headers.get('Content-Type', 'no type')}: {exc}); is it "
                           "the server's root URL?")

    def call(self, method, path, body=None, headers=None, news=None):
        """The JSON object the server answers.  ``news``: for a waiting submit, called
        with the answer's headers and then with each keep-alive byte ahead of the JSON
        (a space: the job is pending; a newline: it runs)."""
        timeout = 60 if news is None else FOLLOW_SILENCE
        with self._open(self._request(method, path, body, headers), timeout) as r:
            try:
                if news is not None and r.status == 200:
                    news(r.headers)
                    while (byte := r.read(1)) in (b" ", b"\n", b"\r", b"\t"):
                        news(byte)
                    answer = json.loads(byte + r.read())
                else:
                    answer = json.load(r)
            except TimeoutError:
                raise Unavailable(f"{self.server} sent nothing for {FOLLOW_SILENCE} s") \
                    from None
            except (ValueError, OSError, http.client.HTTPException) as exc:
                raise self._not_ours(r, exc) from None
        if not isinstance(answer, dict):
            raise self._not_ours(r, "not a JSON object")
        return answer

    def lines(self, path):
        """The NDJSON lines of a streamed answer, as they arrive; Unavailable when it
        breaks, or stays silent (not even a keep-alive space) FOLLOW_SILENCE seconds."""
        with self._open(self._request("GET", path), timeout=FOLLOW_SILENCE) as r:
            try:
                for line in r:
                    if line.strip():  # a quiet follow's keep-alive spaces
                        item = json.loads(line)
                        if not isinstance(item, dict):
                            raise ValueError("a line that is not a JSON object")
                        yield item
            except TimeoutError:
                raise Unavailable(f"{self.server} sent nothing for {FOLLOW_SILENCE} s: gave "
                                  "up following (the job goes on)") from None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise Unavailable(f"the stream from {self.server} broke: {exc}") from None

    def submit(self, script, config, array=None, news=None):
        """Submit a script, or a folder (packed by pack_project, within the
        server's limits, which GET / tells); ``array``: as config.yaml's ``array``.
        With ``news`` (see call) the submit waits for its job: the answer is then
        its results, or (the server did not wait) its record and a ``message``."""
        if os.path.isdir(script):
            code, filename = pack_project(script, self.call("GET", "/")["limits"]), \
                "project.tar.gz"
        else:
            code, filename = Path(script).read_bytes(), Path(script).name
        boundary = secrets.token_hex(16)
        body = b""
        config_data = Path(config).read_bytes()
        if array is not None:  # one more key: a line of YAML (a repeated key is refused)
            config_data = config_data.rstrip(b"\n") + f"\narray: {json.dumps(array)}\n".encode()
        for name, filename, data in (("code", filename, code),
                                     ("config_file", Path(config).name, config_data)):
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{urllib.parse.quote(filename)}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        # A key of its own on every submit: a submit whose connection broke is sent
        # again, and the server queues it once, however many times it arrived.
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Idempotency-Key": secrets.token_hex(16)}
        path = "/api/submit" if news is None else "/api/submit?wait=1"
        for wait in SUBMIT_RETRIES:  # (a waiting submit is sent again with the same key,
            try:                     # and waits again for the one job)
                return self.call("POST", path, body, headers, news)
            except Unavailable as exc:
                print(f"gpuqueue: {exc.message}; trying again in {wait} s", file=sys.stderr)
                time.sleep(wait)
        return self.call("POST", path, body, headers, news)

    def job_path(self, what, job_id):
        return f"/api/{what}/{urllib.parse.quote(job_id, safe='')}"

    def download(self, path, dest, size, sha256=None):
        """A job's file into ``dest``, by way of ``dest``.part: a download cut short
        (a closed connection, fewer bytes than promised, 60 s of silence) keeps what
        came and resumes from it (HTTP Range); the sha256, when the server has one,
        is checked before the file takes its name."""
        part = Path(f"{dest}.part")
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have < size or not size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            def cut(why):
                return GpuqueueError(f"{dest}: the download was cut short ({why}); run the "
                                     "command again to resume it")
            with self._open(self._request("GET", path, headers=headers), timeout=60) as r, \
                    open(part, "ab" if have and r.status == 206 else "wb") as out:
                promised, got = r.headers.get("Content-Length"), 0
                while True:
                    try:
                        chunk = r.read(1 << 20)
                    except (OSError, http.client.HTTPException) as exc:  # (60 s silent too)
                        raise cut(exc or type(exc).__name__) from None
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                if promised and promised.isdigit() and got < int(promised):
                    raise cut(f"{got} of {promised} bytes came")
        if sha256 is not None:
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != sha256:
                part.unlink()
                raise GpuqueueError(f"{dest}: its sha256 is not the server's; run the "
                                    "command again to download it afresh")
        os.replace(part, dest)


#: Left out of a project by ``submit DIR``, whatever .gpuqueueignore says.
PACK_LEFT_OUT = (".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".mypy_cache",
                 ".pytest_cache", ".ipynb_checkpoints")


def pack_project(folder, limits, out=sys.stderr):
    """A folder as a tar.gz for ``submit DIR``: without version control, caches,
    virtualenvs (any folder with a pyvenv.cfg) and what its .gpuqueueignore names
    (shell patterns, one a line, matched against paths and names; '#' comments).
    Refused before anything is sent when it is over the server's ``limits``,
    naming the largest files, so that a user knows what to leave out."""
    import fnmatch
    import tarfile
    root = Path(folder)
    patterns = []
    with contextlib.suppress(FileNotFoundError):
        patterns = [p.strip().rstrip("/") for p in (root / ".gpuqueueignore").read_text()
                    .splitlines() if p.strip() and not p.lstrip().startswith("#")]

    def ignored(rel, name):
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)
    files, left = [], []
    for top, dirs, names in os.walk(root):
        here = Path(top).relative_to(root)
        for d in list(dirs):
            rel = (here / d).as_posix()
            if d in PACK_LEFT_OUT or (Path(top) / d / "pyvenv.cfg").exists() or ignored(rel, d) \
                    or os.path.islink(Path(top) / d):
                dirs.remove(d)
                left.append(rel + "/")
        dirs.sort()
        for n in sorted(names):
            rel = (here / n).as_posix()
            st = os.lstat(Path(top) / n)
            if ignored(rel, n) or not stat.S_ISREG(st.st_mode):
                left.append(rel)
            else:
                files.append((rel, st.st_size))
    total = sum(size for _, size in files)
    largest = ", ".join(f"{rel} ({size / 1e6:.1f} MB)" for rel, size in
                        sorted(files, key=lambda f: -f[1])[:5])
    if total > limits["max_project_bytes"] or len(files) > limits["max_project_files"]:
        raise BadRequest(f"{folder} holds {len(files)} files, {total / 1e6:.1f} MB: over the "
                         f"server's max_project_bytes ({limits['max_project_bytes'] / 1e6:.1f} "
                         f"MB) or max_project_files ({limits['max_project_files']}). Its "
                         f"largest files: {largest}; name what the job does not need in "
                         f"{root / '.gpuqueueignore'}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tf:
        for rel, _ in files:
            tf.add(root / rel, arcname=rel, recursive=False)
    data = buf.getvalue()
    if len(data) > limits["max_upload_bytes"]:
        raise BadRequest(f"{folder} packs to {len(data) / 1e6:.1f} MB, over the server's "
                         f"max_upload_bytes ({limits['max_upload_bytes'] / 1e6:.1f} MB). Its "
                         f"largest files: {largest}; name what the job does not need in "
                         f"{root / '.gpuqueueignore'}")
    print(f"gpuqueue: packing {folder}: {len(files)} files, {total / 1e6:.1f} MB, "
          f"{len(data) / 1e6:.1f} MB to send"
          + (f" (left out: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''})"
             if left else ""), file=out)
    return data


def _in_line(position):
    """A queue position (the API's count from 0) for people, who count from 1."""
    return "next in line" if position == 0 else f"number {position + 1} in line"


def _seconds_since(iso):
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return max(0.0, (datetime.now(timezone.utc) - started).total_seconds())


def _show(job):
    """A job's status, for people."""
    line = f"{job['job_id']}  {job['status']}  node {job['node_id']}  user {job['user_id']}"
    if job["status"] == "pending" and job.get("queue_position") is not None:
        line += (f"\n  {_in_line(job['queue_position'])}, estimated start "
                 f"{job.get('estimated_start') or '-'}")
    for key in ("submitted_at", "started_at", "finished_at"):
        if job.get(key):
            line += f"\n  {key.replace('_at', ''):<9} {job[key]}"
    if job["status"] not in FINAL_STATES and job.get("time_limit"):
        line += (f"\n  expected  {duration(job['expected_time'])}, killed after "
                 f"{duration(job['time_limit'])}")
    if job["status"] == "running" and job.get("cancel_requested"):
        line += "\n  cancel requested: it is being stopped"
    if job["status"] in FINAL_STATES:
        line += f"\n  exit code {job['exit_code']}"
        if job["error"] and job["error"] != f"exit code {job['exit_code']}":
            line += f": {job['error']}"
    return line


def _exit_status(job):
    """The shell status that stands for a job's end: its exit code, 128 + the
    signal that killed it, or 1 when gpuqueue ended it (cancelled, timeout) or it
    has none (lost)."""
    code = job.get("exit_code")
    if code is None or job.get("status") == "cancelled" or job.get("error") == "timeout":
        return 1
    return 128 - code if code < 0 else min(code, 255)


def _print_results(results, as_json):
    if as_json:
        print(json.dumps(results, indent=1))
        return
    sys.stdout.write(results["stdout"])
    sys.stderr.write(results["stderr"])
    if results["error"]:
        print(f"gpuqueue: job {results['job_id']} {results['status']}: {results['error']}",
              file=sys.stderr)


class _Progress:
    """One line on stderr saying how a job is doing.  On a terminal it is redrawn
    in place, and set aside while the job's output is printed; elsewhere it is
    printed whenever its state (not its clock) changes."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.shown = False   # the line is on the terminal now
        self.midline = False  # the job's output stopped mid-line: do not draw over it
        self.state = None

    def show(self, text, state):
        if self.tty:
            if not self.midline:
                self.out.write("\r\033[K" + text)
                self.shown = True
        elif state != self.state:
            self.out.write(text + "\n")
        self.state = state
        self.out.flush()

    def output(self, stream, data):
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()
            self.shown = False
        stream.write(data)
        stream.flush()
        self.midline = not data.endswith("\n")

    def end(self, text):
        self.output(self.out, ("\n" if self.midline else "") + text + "\n")


def _progress_line(job):
    where = f"node {job['node_id']}"
    if job["status"] == "pending":
        return (f"pending on {where}: {_in_line(job['queue_position'])}, estimated start "
                f"{job.get('estimated_start') or '-'}"), ("pending", job["queue_position"])
    if job.get("cancel_requested"):
        return f"running on {where}: being cancelled", ("cancelling",)
    elapsed = duration(_seconds_since(job["started_at"])) if job.get("started_at") else "-"
    return (f"running on {where}: {elapsed} of {duration(job['expected_time'])} expected, "
            f"killed after {duration(job['time_limit'])}"), ("running",)


def _copy_output(client, job_id, offsets, progress):
    """Print what the job wrote since ``offsets``, each stream to its own."""
    for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        while True:
            part = client.call("GET", f"{client.job_path('logs', job_id)}?stream={stream}"
                                      f"&offset={offsets[stream]}")
            if not part["data"] and part["next_offset"] == offsets[stream]:
                break
            progress.output(out, part["data"])
            offsets[stream] = part["next_offset"]


def _watch(client, job):
    """Follow a job to its end for a person: its output as it is written and a
    progress line on stderr; its final record.  Ctrl-C leaves the job alone."""
    progress = _Progress(sys.stderr)
    offsets = {"stdout": 0, "stderr": 0}
    try:
        while True:
            job = client.call("GET", client.job_path("status", job["job_id"]))
            if job["status"] != "pending":
                _copy_output(client, job["job_id"], offsets, progress)
            if job["status"] in FINAL_STATES:
                _copy_output(client, job["job_id"], offsets, progress)  # what came last
                progress.end(_ended_line(job))
                return job
            progress.show(*_progress_line(job))
            time.sleep(WAIT_POLL)  # a client's poll; the server holds nothing open for it
    except KeyboardInterrupt:
        progress.end(_stopped_waiting(job))
        return None


def _me():
    """This command as a user would type it again (python3 and the script's path)."""
    return f"python3 {shlex.quote(sys.argv[0] or 'gpuqueue.py')}"


def _stopped_waiting(job):
    """What a Ctrl-C while a job is waited for leaves: the job, and how to go on."""
    fate = "stays queued" if job.get("status") == "pending" else "keeps running"
    return (f"gpuqueue: stopped waiting; job {job['job_id']} {fate}.  Follow it with "
            f"'{_me()} logs -f {job['job_id']}', cancel it with "
            f"'{_me()} cancel {job['job_id']}'")


class _Waiting:
    """What a waiting submit (``submit --wait``) hears before its job's results: the
    answer's headers (the job, its node, its place in line), then a keep-alive byte
    every few seconds, a newline once the job runs; shown as a progress line on
    stderr (none with --json)."""

    def __init__(self, quiet):
        self.progress = None if quiet else _Progress(sys.stderr)
        self.job = None    # {"job_id", "status"} once the headers came
        self.place = None  # its place in line when submitted
        self.since = None  # when it was seen to start running
        self.times = ""    # its expected time and limit, in words

    def news(self, what):
        if not isinstance(what, bytes):  # the headers
            self.job = {"job_id": what["X-Gpuqueue-Job-Id"], "status": "pending"}
            self.place = what.get("X-Gpuqueue-Queue-Position")
            with contextlib.suppress(TypeError, ValueError):
                self.times = (f" of {duration(float(what['X-Gpuqueue-Expected-Time']))} "
                              "expected, killed after "
                              f"{duration(float(what['X-Gpuqueue-Time-Limit']))}")
            if self.progress:
                job_id = self.job["job_id"]
                self.progress.output(sys.stderr, f"job {job_id} queued on node "
                                     f"{what['X-Gpuqueue-Node-Id']}; its output as it comes: "
                                     f"'{_me()} logs -f {job_id}'\n")
        elif what == b"\n" and self.since is None:
            self.job["status"], self.since = "running", time.monotonic()
        if not self.progress:
            return
        if self.since is None:
            place = f", {_in_line(int(self.place))} when submitted" if self.place else ""
            self.progress.show(f"pending{place}", ("pending",))
        else:
            self.progress.show(f"running: {duration(time.monotonic() - self.since)}"
                               + self.times, ("running",))

    def end(self, text):
        if self.progress:
            self.progress.end(text)
        else:
            print(text, file=sys.stderr)


def cli_submit(args, client):
    if args.outputs and not args.wait:
        raise BadRequest("-o/--outputs downloads the job's files once it ends: add --wait")
    if args.outputs and args.array:
        raise BadRequest("-o/--outputs downloads one job's files: an array's jobs each have "
                         f"theirs ('{_me()} outputs JOB -o DIR')")
    waiting = _Waiting(args.json) if args.wait else None
    try:
        job = client.submit(args.script, args.job_config, args.array,
                            news=waiting and waiting.news)
    except KeyboardInterrupt:
        if waiting is None or waiting.job is None:
            raise
        waiting.end(_stopped_waiting(waiting.job))
        return 130
    if "array_id" in job:  # an array: its jobs are followed with jobs --array
        if not (args.wait and args.json):  # (then the array's end is the answer)
            print(json.dumps(job, indent=1) if args.json else
                  f"array {job['array_id']}: {len(job['job_ids'])} jobs pending; follow them "
                  f"with '{_me()} jobs --array {job['array_id']}'")
        if not args.wait:
            return 0
        status = _wait_array(client, job["array_id"], args.json)
        if args.outputs and status != 130:  # (its config.yaml made it an array)
            print(f"gpuqueue: -o/--outputs downloads one job's files: get each of the array's "
                  f"with '{_me()} outputs JOB -o DIR'", file=sys.stderr)
            return 1
        return status
    if not args.wait:
        where = (f"pending on node {job['node_id']}, {_in_line(job['queue_position'])}, "
                 f"estimated start {job['estimated_start']}")
        if args.json:
            print(json.dumps(job, indent=1))
        elif sys.stdout.isatty():
            print(f"{job['job_id']}  {where}")
        else:  # J=$(... submit ...): the job id alone
            print(job["job_id"])
            print(f"gpuqueue: job {job['job_id']} {where}", file=sys.stderr)
        return 0
    if "stdout" in job:  # the server waited: the job's results
        results = job
        if not args.json:
            for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                if results[stream]:
                    waiting.progress.output(out, results[stream])
            waiting.end(_ended_line(job))
    else:  # it did not wait (see its message): follow the job by polling
        print(f"gpuqueue: {job['message']}", file=sys.stderr)
        results = _poll(client, job, args.json)
        if results is None:
            return 130
    if args.outputs:
        _download_outputs(client, job["job_id"], args.outputs, quiet=args.json)
    if args.json:
        _print_results(results, as_json=True)
    return _exit_status(results)


def _wait_array(client, array_id, as_json):
    """An array waited for, by polling, until none of its jobs is pending or running:
    0 when every one completed, else 1 (130 after a Ctrl-C), its counts said.  (The
    server holds a waiting request for one job alone, as a submit's ?wait=1; an array
    has none, so one GET of its counts a WAIT_POLL, as _poll after a 202.)"""
    path = client.job_path("arrays", array_id)
    try:
        while (got := client.call("GET", path))["counts"]["pending"] \
                + got["counts"]["running"]:
            time.sleep(WAIT_POLL)
    except KeyboardInterrupt:
        print(f"gpuqueue: stopped waiting; array {array_id} goes on.  Follow it with "
              f"'{_me()} jobs --array {array_id}'", file=sys.stderr)
        return 130
    counts = {k: n for k, n in got["counts"].items() if n}
    if as_json:
        print(json.dumps(got, indent=1))
    else:
        print(f"gpuqueue: array {array_id} ended: "
              + ", ".join(f"{n} {state}" for state, n in counts.items()), file=sys.stderr)
    return 0 if set(counts) <= {"completed"} else 1


def _ended_line(job):
    outcome = job["error"] or f"exit code {job['exit_code']}"
    return f"gpuqueue: job {job['job_id']} {job['status']}: {outcome}"


def _poll(client, job, as_json):
    """A job followed by polling, for a submit the server did not wait for: its
    results (printed already unless ``as_json``), or None after a Ctrl-C."""
    if not as_json:
        job = _watch(client, job)
        return job and client.call("GET", client.job_path("results", job["job_id"]))
    try:
        while client.call("GET", client.job_path("status", job["job_id"]))["status"] \
                not in FINAL_STATES:
            time.sleep(WAIT_POLL)  # the server said to poll (202): it holds nothing for us
    except KeyboardInterrupt:
        print(_stopped_waiting(job), file=sys.stderr)
        return None
    return client.call("GET", client.job_path("results", job["job_id"]))


def _download_outputs(client, job_id, folder, quiet=False):
    """A finished job's files into ``folder`` once they are back on the server
    (each checked against its sha256); says what was cut, skipped or lost."""
    while (listing := client.call("GET", client.job_path("outputs", job_id)))["state"] \
            == "collecting":
        time.sleep(WAIT_POLL)
    root = Path(folder)
    total = 0
    for f in listing["files"]:
        parts = f["path"].split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise GpuqueueError(f"the server listed a file as {f['path']!r}: refused")
        dest = root.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download(client.job_path("outputs", job_id) + "/" + urllib.parse.quote(
            f["path"]), dest, f["size"], f["sha256"])
        total += f["size"]
    if not quiet:
        print(f"gpuqueue: {len(listing['files'])} files of job {job_id}, {total / 1e6:.1f} MB, "
              f"in {root}", file=sys.stderr)
    for note in ([listing["error"]] if listing["error"] else []) + [
            f"{s['path']}: {s['reason']}" for s in listing["skipped"]]:
        print(f"gpuqueue: {note}", file=sys.stderr)
    return listing


def cli_outputs(args, client):
    if args.outputs:
        listing = _download_outputs(client, args.job_id, args.outputs, quiet=args.json)
    else:
        listing = client.call("GET", client.job_path("outputs", args.job_id))
    if args.json:
        print(json.dumps(listing, indent=1))
    elif not args.outputs:
        for f in listing["files"]:
            print(f"{f['size']:>14}  {f['path']}")
        print(f"{len(listing['files'])} files, {listing['state']}"
              + (f": {listing['error']}" if listing["error"] else ""))
    return 0 if listing["state"] in ("complete", "running") else 1


def cli_status(args, client):
    job = client.call("GET", client.job_path("status", args.job_id))
    print(json.dumps(job, indent=1) if args.json else _show(job))
    return 0


def cli_results(args, client):
    _print_results(client.call("GET", client.job_path("results", args.job_id)), args.json)
    return 0


def cli_cancel(args, client):
    job = client.call("POST", client.job_path("cancel", args.job_id))
    if args.json:
        print(json.dumps(job, indent=1))
    elif "cancelled" in job:  # an array's
        print(f"array {job['array_id']}: {job['cancelled']} jobs cancelled")
    else:
        print(_show(job))
    return 0


def cli_logs(args, client):
    """What a job wrote, stdout on stdout and stderr on stderr (or the one --stream
    names); with -f, as it is written, until the job ends: then its status on
    stderr, and its exit status as this command's, as submit --wait does."""
    streams = [args.stream] if args.stream else ["stdout", "stderr"]
    outs = {"stdout": sys.stdout, "stderr": sys.stderr}
    base = client.job_path("logs", args.job_id)
    if not args.follow:
        for stream in streams:
            offset = 0
            while True:
                part = client.call("GET", f"{base}?stream={stream}&offset={offset}")
                if args.json:
                    print(json.dumps(part))
                else:
                    outs[stream].write(part["data"])
                if part["next_offset"] == offset:
                    break
                offset = part["next_offset"]
        return 0
    which = args.stream or "both"
    try:
        for line in client.lines(f"{base}?stream={which}&follow=1"):
            if args.json:
                print(json.dumps(line), flush=True)
            elif "data" in line:
                out = outs[line.get("stream", args.stream or "stdout")]
                out.write(line["data"])
                out.flush()
            if line.get("end"):
                if not args.json:
                    outcome = line.get("error") or f"exit code {line.get('exit_code')}"
                    print(f"gpuqueue: job {args.job_id} {line.get('status')}: {outcome}",
                          file=sys.stderr)
                return _exit_status(line)
            if "error" in line:
                raise GpuqueueError(f"following the output failed: {line['error']}")
    except KeyboardInterrupt:
        print(f"gpuqueue: stopped following; job {args.job_id} goes on", file=sys.stderr)
        return 130
    raise Unavailable("the output stream ended before the job did")


def cli_jobs(args, client):
    query = urllib.parse.urlencode({k: v for k, v in (("status", args.status),
                                                      ("user_id", args.user),
                                                      ("array", args.array),
                                                      ("limit", args.limit)) if v is not None})
    page = client.call("GET", f"/api/jobs?{query}")
    if args.json:  # the API's own shape: {"jobs": [...], "next_cursor": ...}
        print(json.dumps(page, indent=1))
        return 0
    found = page["jobs"]
    print(f"{'JOB':<25} {'USER':<16} {'STATUS':<10} {'NODE':>4} {'SUBMITTED':<20} EXIT")
    for j in found:
        print(f"{j['job_id']:<25} {j['user_id'][:16]:<16} {j['status']:<10} {j['node_id']:>4} "
              f"{j['submitted_at'][:19]:<20} {'-' if j['exit_code'] is None else j['exit_code']}")
    return 0


def _limit(text):
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError("a whole number from 1 to 1000")
    return int(text)


class _ArgParser(argparse.ArgumentParser):
    """argparse, its errors with gpuqueue's one prefix."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"gpuqueue: {message}\n")


def client_parser():
    common = _ArgParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("GPUQUEUE_URL", DEFAULT_URL),
                        help=f"The server's URL (or GPUQUEUE_URL; default {DEFAULT_URL}).")
    common.add_argument("--token", default=os.environ.get("GPUQUEUE_TOKEN"),
                        help="Your token (or GPUQUEUE_TOKEN).")
    common.add_argument("--json", action="store_true", help="Print JSON, for scripts.")
    parser = _ArgParser(
        prog="gpuqueue.py", description="gpuqueue's client: talks to a gpuqueue server over "
        "HTTP and needs nothing but python3.  The server's own commands: gpuqueue.py --help "
        "where the server is installed.")
    parser.add_argument("--version", action="version", version=f"gpuqueue {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, summary):
        p = commands.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(run=run)
        return p

    p = command("submit", cli_submit, "Submit SCRIPT, or a project folder DIR (packed without "
                ".git, caches, virtualenvs and what DIR/.gpuqueueignore names), with its "
                "config.yaml.")
    p.add_argument("script", metavar="SCRIPT|DIR")
    p.add_argument("-c", "--config", dest="job_config", required=True, help="The job's config.yaml.")
    p.add_argument("--wait", action="store_true",
                   help="Wait for the job (one request the server holds open): how long "
                        "it has run against its expected time and limit, then its output; "
                        "exit with its exit code.  An array is waited for until all its "
                        "jobs have ended: exit 0 when every one completed, else 1.")
    p.add_argument("-o", "--outputs", metavar="DIR",
                   help="With --wait: download the job's files ($GPUQUEUE_OUTPUT_DIR) into DIR "
                        "once it ends.")
    p.add_argument("--array", metavar="SPEC",
                   help="Submit it as an array: N, A-B or A-B%%K (at most K at once).")
    command("status", cli_status, "A job's status.").add_argument("job_id")
    p = command("outputs", cli_outputs, "List a job's files ($GPUQUEUE_OUTPUT_DIR), or with -o "
                                        "download them (checked, and resumed when cut short).")
    p.add_argument("job_id")
    p.add_argument("-o", "--outputs", metavar="DIR", help="Download them into DIR.")
    command("results", cli_results,
            "A finished job's stdout (and stderr, on stderr).").add_argument("job_id")
    command("cancel", cli_cancel, "Cancel a pending or running job, or every unfinished job "
            "of an array.").add_argument("job_id", metavar="JOB_OR_ARRAY")
    p = command("logs", cli_logs, "What a job has written so far, read from its node while "
                                  "it runs.")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true",
                   help="Keep printing until the job ends, then exit with its exit status.")
    p.add_argument("--stream", choices=("stdout", "stderr"),
                   help="Only this stream (default: stdout on stdout, stderr on stderr).")
    p = command("jobs", cli_jobs, "Your jobs from the server, newest first (an admin on the "
                                  "server's machine also has 'jobs list' and 'jobs cancel').")
    p.add_argument("--status", choices=STATES, help="Only jobs in this state.")
    p.add_argument("--user", help="Only this user's jobs (admins).")
    p.add_argument("--limit", type=_limit, default=50, help="At most this many (default 50).")
    p.add_argument("--array", metavar="ID", help="Only the jobs of this array.")
    return parser


def client_main(argv):
    """A client command: its exit status; every error one line starting 'gpuqueue: ',
    whatever the server answered (or did not), and never a traceback."""
    args = client_parser().parse_args(argv)
    try:
        return args.run(args, Client(args.server, args.token))
    except GpuqueueError as exc:
        print(f"gpuqueue: {exc.message}", file=sys.stderr)
    except BrokenPipeError:
        raise  # the reader of our output went away: main() ends quietly
    except OSError as exc:  # a file to submit that cannot be read
        print(f"gpuqueue: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        print(f"gpuqueue: the server's answer lacks what a gpuqueue server sends "
              f"({type(exc).__name__}: {exc}); is {args.server} one, of this release?",
              file=sys.stderr)
    return 1



# -- the server's commands: on the server's machine ------------------------------


def cli_serve(config, host, port):
    """Start the server and one scheduler thread per node."""
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("paramiko").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" per burst
    host, port = host or config.host, config.port if port is None else port
    spool = Spool(config.spool, [n.id for n in config.nodes], config.gpu_counts)
    try:
        spool.open()
    except OSError as exc:
        raise ConfigError(
            f"cannot use the spool {config.spool}: {exc.strerror or exc}; it must be a folder "
            "this user may write (set 'spool' in the config to use another)") from None
    tokens = Tokens(config.tokens)
    scheduler = Scheduler(config, spool, tokens)
    try:
        api = Api(scheduler)
        server = _http_server(logged(api.app), host, port, config)
    except OSError as exc:
        spool.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          "stop what uses it, or choose another with --port") from None
    control = Control(scheduler)
    _logged_step(control.scan)  # requests left from before a restart: before any job starts
    scheduler.start(("watch", functools.partial(watch, Incoming(scheduler), control)),
                    ("waiters", api.waiters.run))
    _banner(config, server, tokens)

    def stop(signum, frame):  # systemd stops a service so: end as Ctrl-C does
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()  # waitress ends it quietly on KeyboardInterrupt
    except KeyboardInterrupt:  # one that came before waitress's loop began
        pass
    finally:
        pending, running = spool.counts()
        spool.close()
    print(f"gpuqueue stopped: {running} running job(s) go on running on their nodes and are "
          f"re-attached when it starts again; {pending} pending job(s) stay queued", flush=True)


def _banner(config, server, tokens):
    """What a person starting the server needs to know, and nothing false."""
    host, port = server.effective_host, server.effective_port
    everywhere = host in ("0.0.0.0", "::")
    print(f"gpuqueue {__version__} listening on http://{host}:{port} with "
          f"{len(config.nodes)} node(s); spool {config.spool}")
    here = f"http://{'127.0.0.1' if everywhere else host}:{port}"
    print(f"dashboard {here}/ui  API docs {here}/docs")
    if not tokens.records():
        here = Path(__file__).resolve()
        me = "gpuqueue.py" if Path.cwd().resolve() == here.parent else shlex.quote(str(here))
        named = f" --config {shlex.quote(str(config.source))}" if config.source else ""
        print(f"no tokens yet: create one with 'python3 {me}{named} tokens create USER'")
    sys.stdout.flush()
    if everywhere or not ipaddress.ip_address(host).is_loopback:
        log.warning("listening on %s: anyone who can reach this machine can reach the API; "
                    "set 'host: 127.0.0.1' in the config to keep it to this machine",
                    "every address" if everywhere else host)
    if any(n.is_local and not n.run_as for n in config.nodes):
        log.warning("local nodes run jobs as this server's own user: such a job can read and "
                    "change the spool, other jobs' records and the token file (see 'run_as')")


def cli_tokens_create(config, user, token, days, admin):
    generated = token is None
    token, rec = admin_tokens(config).create(user, token, days, admin)
    print(f"created token {fingerprint(rec['sha256'])} for {user}{' (admin)' if admin else ''}, "
          f"expires {rec['expires']}, in {config.tokens}")
    if not generated and len(token) < SHORT_TOKEN:
        print(f"warning: a token shorter than {SHORT_TOKEN} characters is easy to guess; leave "
              "TOKEN out and gpuqueue makes a strong one", file=sys.stderr)
    if generated:
        print(f"token (shown only now): {token}")


def cli_tokens_list(config):
    tokens = admin_tokens(config)
    records = tokens.records()
    if tokens.unreadable:
        raise ConfigError(f"cannot read the token file: {tokens.unreadable}")
    print(f"{'FINGERPRINT':<13} {'USER':<20} {'ADMIN':<5} {'CREATED':<25} {'EXPIRES':<25} REVOKED")
    for r in records:
        print(f"{fingerprint(str(r.get('sha256'))):<13} {r.get('user', '?'):<20} "
              f"{'yes' if r.get('admin') else 'no':<5} {r.get('created', ''):<25} "
              f"{r.get('expires', ''):<25} {r.get('revoked') or '-'}")


def cli_tokens_revoke(config, token_or_fingerprint):
    rec = admin_tokens(config).revoke(token_or_fingerprint)
    print(f"revoked token {fingerprint(rec['sha256'])} of {rec.get('user')}")


def _admin(config, request):
    """An admin request's reply, or the command's error."""
    reply = control(config, request)
    if not reply.get("ok"):
        raise GpuqueueError(reply.get("error", "failed"))
    return reply


def cli_nodes_list(config, as_json):
    found = _admin(config, {"op": "nodes"})["nodes"]
    if as_json:
        print(json.dumps(found, indent=1))
        return
    print(f"{'NODE':<5} {'HOST':<20} {'STATE':<18} {'DRAINED':<8} {'RUNNING':<25} "
          f"{'QUEUED':>6} {'QUEUED_S':>9}  ERROR")
    for n in found:
        print(f"{n['id']:<5} {n['host'][:20]:<20} {n['state']:<18} "
              f"{'yes' if n['drained'] else 'no':<8} {n['running_job'] or '-':<25} "
              f"{n['queued_jobs']:>6} {n['queued_seconds']:>9g}  {n['error'] or ''}")


def cli_jobs_list(config, status, user, limit, as_json):
    found = _admin(config, {"op": "jobs", "status": status, "user": user, "limit": limit})["jobs"]
    if as_json:
        print(json.dumps(found, indent=1))
        return
    print(f"{'JOB':<25} {'USER':<16} {'STATUS':<10} {'NODE':>4} {'POS':>4} {'PRIO':>4} "
          f"{'EXPECTED':>8} {'SUBMITTED':<20} EXIT")
    for j in found:
        position = "-" if j["queue_position"] is None else j["queue_position"] + 1
        print(f"{j['job_id']:<25} {j['user_id'][:16]:<16} {j['status']:<10} {j['node_id']:>4} "
              f"{position:>4} {j['priority']:>4} {j['expected_time']:>8g} "
              f"{j['submitted_at'][:19]:<20} {'-' if j['exit_code'] is None else j['exit_code']}")


def server_cli():
    """The server's commands as a Click group.  Each is a thin shell: its work is
    the cli_* function of the same name, and every GpuqueueError or OSError it
    meets ends it with a one-line message."""
    import click

    class Cli(click.Group):
        def invoke(self, ctx):
            try:
                return super().invoke(ctx)
            except GpuqueueError as exc:
                raise click.ClickException(exc.message) from None
            except BrokenPipeError:
                raise  # the reader of our output went away: main() ends quietly
            except OSError as exc:  # a path this machine refuses: say which, in one line
                where = f" {exc.filename}" if exc.filename else ""
                raise click.ClickException(f"{exc.strerror or exc}:{where}") from None

    @click.group(cls=Cli, epilog=(
        f"Client commands, which need only python3: {', '.join(CLIENT_COMMANDS)} (see "
        "'gpuqueue.py submit --help').  Admin commands act on the spool of the server "
        f"whose config they are given: --config, GPUQUEUE_CONFIG, ./{DEFAULT_CONFIG_FILE}, "
        f"{DEFAULT_CONFIG_FILE} beside gpuqueue.py, or the built-in one (make run's)."))
    @click.option("--config", "config_path", envvar="GPUQUEUE_CONFIG",
                  type=click.Path(dir_okay=False),
                  help=f"Config file (default: ./{DEFAULT_CONFIG_FILE}, else "
                       f"{DEFAULT_CONFIG_FILE} beside gpuqueue.py, else the built-in one: 8 "
                       "local nodes, spool/ and tokens.yaml beside gpuqueue.py).")
    @click.version_option(__version__, prog_name="gpuqueue", message="%(prog)s %(version)s")
    @click.pass_context
    def cli(ctx, config_path):
        """gpuqueue: a GPU job queue server."""
        ctx.obj = load_config(config_path or default_config_file())

    @cli.command("serve")
    @click.option("--host", help="Address to listen on (default: config 'host').")
    @click.option("--port", type=int, help="Port (default: config 'port'; 0 picks a free one).")
    @click.pass_obj
    def serve(config, host, port):
        """Start the server and one scheduler thread per node."""
        cli_serve(config, host, port)

    @cli.group("tokens")
    def tokens():
        """Create, list and revoke access tokens (in the config's 'tokens' file)."""

    @tokens.command("create")
    @click.argument("user")
    @click.argument("token", required=False)
    @click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True,
                  help="Days until the token expires.")
    @click.option("--admin", is_flag=True, help="May see and cancel every user's jobs.")
    @click.pass_obj
    def tokens_create(config, user, token, days, admin):
        """Create a token for USER (a random one unless TOKEN is given)."""
        cli_tokens_create(config, user, token, days, admin)

    @tokens.command("list")
    @click.pass_obj
    def tokens_list(config):
        """List tokens: user, admin, dates and fingerprint; never the token."""
        cli_tokens_list(config)

    @tokens.command("revoke")
    @click.argument("token_or_fingerprint")
    @click.pass_obj
    def tokens_revoke(config, token_or_fingerprint):
        """Revoke a token, given the token itself or its fingerprint."""
        cli_tokens_revoke(config, token_or_fingerprint)

    @cli.group("nodes")
    def nodes():
        """See, drain and resume nodes on a running server (admins: run where the spool is)."""

    @nodes.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_obj
    def nodes_list(config, as_json):
        """Each node: state, drained, running job, queue."""
        cli_nodes_list(config, as_json)

    @nodes.command("drain")
    @click.argument("node", type=int)
    @click.pass_obj
    def nodes_drain(config, node):
        """Let NODE finish its running job and start no new one; its pending jobs move elsewhere."""
        print(_admin(config, {"op": "drain", "node": node})["message"])

    @nodes.command("resume")
    @click.argument("node", type=int)
    @click.pass_obj
    def nodes_resume(config, node):
        """Let a drained NODE start jobs again."""
        print(_admin(config, {"op": "resume", "node": node})["message"])

    @cli.group("jobs")
    def jobs():
        """Any user's jobs, through the spool (admins, on the server's machine); 'jobs'
        alone is the client command that lists your own from the server."""

    @jobs.command("list")
    @click.option("--status", type=click.Choice(STATES), help="Only jobs in this state.")
    @click.option("--user", help="Only this user's jobs.")
    @click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_obj
    def jobs_list(config, status, user, limit, as_json):
        """Jobs newest first."""
        cli_jobs_list(config, status, user, limit, as_json)

    @jobs.command("cancel")
    @click.argument("job_id")
    @click.pass_obj
    def jobs_cancel(config, job_id):
        """Cancel any user's job, pending or running."""
        print(_admin(config, {"op": "cancel", "job": job_id})["message"])

    return cli


def _command(argv):
    """The command a command line names (past a leading --config), with the
    subcommand of ``jobs``."""
    words = list(argv)
    while words[:1] == ["--config"] or words[:1] and words[0].startswith("--config="):
        words = words[2:] if words[0] == "--config" else words[1:]
    first = words[0] if words else None
    if first == "jobs" and words[1:2] in (["list"], ["cancel"]):
        return f"jobs {words[1]}"
    return first


def _venv_python():
    """The python of the virtualenv beside this file (``make run`` makes .venv there),
    when there is one and it is not the one running: the server's commands run
    under it, so that they work as printed, with the machine's python3."""
    venv = Path(__file__).resolve().parent / ".venv"
    python = venv / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
        return python
    return None


def main(argv=None):
    """The command line's exit status.  Output cut short by its reader (``| head``)
    ends the command quietly, as it ends any program that writes to a pipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = _main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # nothing more may reach the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a writer killed by SIGPIPE


def _main(argv):
    """Client commands run on the standard library alone; the server's import its
    packages, from the virtualenv beside this file when the python running it lacks
    them, and else say which one is missing."""
    command = _command(argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"gpuqueue {__version__}")
        return 0
    if command in CLIENT_COMMANDS:
        return client_main(argv[argv.index(command):])
    try:
        for package in ("click", "bottle", "waitress", "yaml", "filelock"):
            importlib.import_module(package)
    except ImportError as exc:
        venv = _venv_python()
        if venv is not None:
            sys.stdout.flush()
            os.execv(venv, [str(venv), str(Path(__file__).resolve()), *argv])
        if command in (None, "-h", "--help"):
            client_parser().print_help()
            print(f"\nThe server's commands ({', '.join(SERVER_COMMANDS)}) need the packages "
                  "of requirements.txt: 'make run' installs them into .venv beside "
                  "gpuqueue.py, which these commands then use by themselves.")
            return 0 if command else 2
        print(f"gpuqueue: the server's commands need the package {exc.name!r}, which this "
              f"python lacks: run 'make run' in {Path(__file__).resolve().parent} (it makes "
              ".venv beside gpuqueue.py, which these commands then use by themselves), or "
              "install requirements.txt; the client commands need nothing: "
              f"{', '.join(CLIENT_COMMANDS)}", file=sys.stderr)
        return 1
    return _server_main(argv)


def _server_main(argv):
    """A server command, its errors (Click's own usage errors too) with gpuqueue's one
    prefix."""
    import click
    try:
        status = server_cli().main(argv, prog_name="gpuqueue.py", standalone_mode=False)
    except click.UsageError as exc:
        if exc.ctx is not None:
            print(exc.ctx.get_usage(), file=sys.stderr)
        print(f"gpuqueue: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except click.ClickException as exc:
        print(f"gpuqueue: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except click.Abort:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
