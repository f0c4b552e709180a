"""A real single-node Slurm cluster on loopback, for tests of the "slurm" node kind.

Used by the tests as a fixture and by hand as ``python tests/slurmcluster.py DIR``
(starts it, prints how to reach it, runs until Ctrl-C).

What it starts: munged (reused when one already answers ``munge -n | unmunge``),
slurmctld and slurmd, each in the foreground under this process, all talking
over 127.0.0.1 only, on ports chosen free.  Everything Slurm writes (state,
spool, logs, the generated slurm.conf and gres.conf) lives in the folder given;
nothing is written to /etc/slurm.  Client commands (sbatch, squeue, scontrol,
scancel) find the cluster through ``SLURM_CONF``: see ``env()``.  By default there
is no slurmdbd, so ``sacct`` does not work; a finished job stays in ``scontrol
show job`` for ``MinJobAge`` seconds (``min_job_age``) and is also written to the
jobcomp/filetxt log (``jobcomp_log``) for good.

``accounting=True`` adds slurmdbd (on 127.0.0.1 too) and a private MariaDB (data
under DIR, a unix socket only, no TCP port), so that ``sacct`` still knows a job
after slurmctld has forgotten it.  It adds about 1-2 s to the start.

The node has ``gpus`` fake GPUs (gres "gpu", backed by empty files under
DIR/dev, named nvidia0...), so ``sbatch --gres=gpu:1`` is accepted and the job
gets ``CUDA_VISIBLE_DEVICES``.  It declares ``cpus`` CPUs (default: at least 8,
more than a small machine has, via ``SlurmdParameters=config_overrides``) so
that several one-CPU jobs run at once.

Slurm is a system package: ``ensure_installed()`` installs slurm-wlm and munge
(and slurmdbd and mariadb-server for accounting) with apt-get when they are
missing (as root); importing this module installs nothing, ``start()`` calls it.
Starting fails loudly, with the daemons' log tails, never skips.

As a fixture::

    @pytest.fixture(scope="session")
    def slurm(tmp_path_factory):
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
        yield cluster
        cluster.stop()

Facts the slurm node kind can rely on (Slurm 22.05, Debian 12):

* Over SSH the remote shell has no SLURM_CONF; the node's ``env`` (``env()``) puts
  it before every command (``SLURM_CONF=/path/slurm.conf sbatch ...``).  Without it
  a client looks for /etc/slurm/slurm.conf, then DNS SRV records, and fails.
* A finished job's outcome without accounting: ``scontrol -o show job ID`` gives
  JobState (COMPLETED, FAILED, CANCELLED, TIMEOUT...), Reason (NonZeroExitCode,
  TimeLimit, JobLaunchFailure...) and ExitCode=CODE:SIGNAL; or ``squeue -h -t all
  -j ID -O JobID:|,State:|,Reason:|,exit_code:`` where exit_code is the raw wait
  status (3 << 8 for ``exit 3``); or ``squeue --json -t all``.  Both forget the
  job MinJobAge seconds after it ends; the jobcomp log keeps it.
* With accounting, ``sacct -n -P -X -j ID --format=State,ExitCode`` knows a job as
  soon as it ends and after MinJobAge: ``FAILED|3:0`` for ``exit 3``,
  ``COMPLETED|0:0``, ``CANCELLED by 0|0:0`` after scancel (the state has the
  canceller's uid; ExitCode 0:0 where scontrol says 0:15).
* A job is started about 1-2 s after sbatch; a pending job's Reason is None until
  the scheduler has looked at it (about 2 s), then e.g. Resources.
* slurmctld checks time limits only about every 30 s: a 10 s limit ends as TIMEOUT
  after 30-90 s (SIGTERM, then SIGKILL KillWait seconds later).
"""
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sshcluster import _descendants, until_interrupted

NEEDED = ("slurmctld", "slurmd", "munged", "sbatch")
PACKAGES = ("slurm-wlm", "munge")
ACCT_NEEDED = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb-admin", "sacct")
ACCT_PACKAGES = ("slurmdbd", "mariadb-server")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
ADDR = "127.0.0.1"
SPOOL_MAX = 60  # characters; see SlurmCluster.__init__
SUN_PATH_MAX = 107  # characters in a unix socket's path
NODE = "localhost"  # NodeName; resolves to 127.0.0.1, and slurmctld accepts it as its own name


def _which(name):
    """``name`` on PATH or in an sbin folder (a non-login PATH may lack /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return None


def missing(accounting=False):
    return [n for n in NEEDED + (ACCT_NEEDED if accounting else ()) if not _which(n)]


def ensure_installed(accounting=False):
    """Install slurm-wlm and munge (and ACCT_PACKAGES for accounting) with apt-get
    when any of NEEDED (and ACCT_NEEDED) is missing.

    Returns the seconds spent (0.0 when nothing was missing).  ``apt-get update``
    runs only when a first install fails (a stale or empty package list).  Where
    services may start (systemd, no policy-rc.d), mariadb-server also starts the
    system MariaDB; the cluster does not use it.
    """
    if not missing(accounting):
        return 0.0
    t0 = time.monotonic()
    packages = PACKAGES + (ACCT_PACKAGES if accounting else ())
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"Slurm is missing ({', '.join(missing(accounting))}): "
                           f"run 'sudo apt-get install {' '.join(packages)}'")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0 or missing(accounting):
        u = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0 or missing(accounting):
            raise RuntimeError(f"apt-get install {' '.join(packages)} failed; still missing "
                               f"{missing(accounting)}:\n{u.stdout[-2000:]}{u.stderr[-2000:]}"
                               f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.monotonic() - t0


def _free_port(addr=ADDR, avoid=()):
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free port on loopback")


def _tail(path, n=4000):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({path}: {e})"


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _kill(pids, sig=signal.SIGKILL):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _stop_proc(proc, grace=10):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- munge ---------------------------------------------------------------------


def munge_works():
    """True when a munged answers on the default socket (``munge -n | unmunge``)."""
    m, u = _which("munge"), _which("unmunge")
    if not (m and u):
        return False
    try:
        cred = subprocess.run([m, "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run([u], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Munge:
    """munged as the munge user, socket in /run/munge; reuses a working one."""

    def __init__(self, log):
        self.log = Path(log)
        self.proc = None
        self.reused = False

    def start(self):
        if munge_works():
            self.reused = True
            return self
        pw = pwd.getpwnam("munge")
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        os.chown(MUNGE_RUN, pw.pw_uid, pw.pw_gid)
        os.chmod(MUNGE_RUN, 0o755)
        for d in ("/var/lib/munge", "/var/log/munge"):  # seed file; default log
            os.makedirs(d, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        if not MUNGE_KEY.exists():
            _make_munge_key()
        os.chown(MUNGE_KEY.parent, pw.pw_uid, pw.pw_gid)
        os.chmod(MUNGE_KEY.parent, 0o700)
        os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
        # -F: stays in the foreground, so it is ours to stop; it logs to stderr.
        # --force: a socket left by a munged that was killed does not stop it.
        self.proc = subprocess.Popen([_which("munged"), "-F", "--force"],
                                     user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                                     start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        end = time.monotonic() + 20
        while not munge_works():
            if self.proc.poll() is not None or time.monotonic() > end:
                _stop_proc(self.proc)
                raise RuntimeError(f"munged did not start:\n{_tail(self.log)}")
            time.sleep(0.05)
        return self

    def stop(self):
        if not self.reused:
            _stop_proc(self.proc)


def _make_munge_key():
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    tries = []
    if _which("mungekey"):
        tries.append([_which("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"])
    if _which("create-munge-key"):
        tries.append([_which("create-munge-key"), "-f"])
    for cmd in tries:
        if subprocess.run(cmd, capture_output=True).returncode == 0 and MUNGE_KEY.exists():
            return
    with open(MUNGE_KEY, "wb") as f:
        f.write(os.urandom(1024))


# -- slurm -----------------------------------------------------------------------


class SlurmCluster:
    """slurmctld + slurmd for one node "localhost" on 127.0.0.1, all state under ``root``.

    ``start()`` returns self once ``sinfo`` shows the node idle; ``stop()`` cancels
    every job, stops the daemons and kills whatever job processes are left.
    ``accounting=True`` adds slurmdbd and MariaDB, so ``sacct`` works.
    """

    def __init__(self, root, cpus=None, gpus=2, kill_wait=2, name="gpuqtest", min_job_age=3600,
                 accounting=False):
        self.root = Path(root).resolve()
        if any(c.isspace() for c in str(self.root)):
            raise ValueError(f"slurm.conf paths cannot hold spaces: {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.cpus = cpus or max(8, os.cpu_count() or 1)
        self.gpus = gpus
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age
        self.name = name
        self.conf = self.root / "slurm.conf"
        self.gres_conf = self.root / "gres.conf"
        self.state_dir = self.root / "state"
        self._short_dirs = []
        # slurmstepd's socket SPOOL/localhost_JOBID.4294967291 must fit in a
        # 108-byte sun_path: a long pytest tmp_path gets a short spool in /tmp.
        self.spool_dir = self._short_dir("spool", SPOOL_MAX, "slurmd-")
        self.log_dir = self.root / "log"
        self.dev_dir = self.root / "dev"
        self.jobcomp_log = self.log_dir / "jobcomp.log"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.slurmd_log = self.log_dir / "slurmd.log"
        self.ctld_port = _free_port()
        self.slurmd_port = _free_port(avoid=(self.ctld_port,))
        self.accounting = accounting
        if accounting:
            self.dbd_conf = self.root / "slurmdbd.conf"  # slurmdbd looks next to SLURM_CONF
            self.dbd_log = self.log_dir / "slurmdbd.log"
            self.dbd_port = _free_port(avoid=(self.ctld_port, self.slurmd_port))
            self.mysql_data = self.root / "mysql-data"
            self.mysql_log = self.log_dir / "mariadb.log"
            sock = "mysqld.sock"
            self.mysql_sock = self._short_dir("mysql-run", SUN_PATH_MAX - len(sock) - 1,
                                              "mariadb-") / sock
        self.munge = Munge(self.log_dir / "munged.log")
        self.ctld = self.slurmd = self.dbd = self.mysql = None
        self.startup_seconds = None
        self.accounting_seconds = None
        self.install_seconds = None

    def _short_dir(self, name, limit, prefix):
        """root/name; a new folder in /tmp that root/name links to when root/name is
        longer than ``limit`` characters (for unix sockets in it)."""
        path = self.root / name
        if len(str(path)) <= limit:
            return path
        short = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        path.symlink_to(short)
        self._short_dirs.append(short)
        return short

    # -- configuration ---------------------------------------------------------

    def env(self):
        """What a client command (sbatch, squeue, scontrol, scancel) needs."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self):
        """os.environ plus env(), for running client commands here."""
        return {**os.environ, **self.env()}

    def _write_config(self):
        for d in (self.state_dir, self.spool_dir, self.log_dir, self.dev_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.accounting:
            self.mysql_sock.parent.mkdir(exist_ok=True)
            self._write_dbd_config()
            acct = ["AccountingStorageType=accounting_storage/slurmdbd",
                    f"AccountingStorageHost={ADDR}", f"AccountingStoragePort={self.dbd_port}"]
        else:
            acct = ["AccountingStorageType=accounting_storage/none"]
        gres = []
        if self.gpus:
            for i in range(self.gpus):
                dev = self.dev_dir / f"nvidia{i}"
                if not dev.is_symlink():
                    dev.symlink_to("/dev/null")  # slurmd wants a character device
            last = self.gpus - 1
            files = f"{self.dev_dir}/nvidia[0-{last}]" if last else f"{self.dev_dir}/nvidia0"
            self.gres_conf.write_text(f"NodeName={NODE} Name=gpu File={files}\n")
            gres = ["GresTypes=gpu"]
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={NODE}({ADDR})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            # Bind to the configured addresses, not INADDR_ANY: nothing beyond loopback.
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmdSpoolDir={self.spool_dir}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "MailProg=/bin/true",
            # No cgroups: works in containers and gVisor.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "LaunchType=launch/slurm",
            # Several jobs on the one node at once, one core each by default.
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            # Without accounting sacct does not work; finished jobs stay in
            # `scontrol show job` for MinJobAge seconds, and go to the jobcomp log.
            *acct,
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_log}",
            f"MinJobAge={self.min_job_age}",
            # Fast, predictable timers.
            f"KillWait={self.kill_wait}",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # declare more CPUs than the machine has
            *gres,
            f"NodeName={NODE} NodeAddr={ADDR} NodeHostname={NODE} CPUs={self.cpus} "
            f"Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory=1000"
            + (f" Gres=gpu:{self.gpus}" if self.gpus else "") + " State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
        self.conf.write_text("\n".join(lines))

    def _write_dbd_config(self):
        lines = [
            "AuthType=auth/munge",
            "DbdHost=localhost", f"DbdAddr={ADDR}", f"DbdPort={self.dbd_port}",
            # Bind to gethostname()'s address, not INADDR_ANY: see _start_accounting().
            "CommunicationParameters=NoInAddrAny",
            "SlurmUser=root",
            "DebugLevel=info",
            f"LogFile={self.dbd_log}",
            f"PidFile={self.root / 'slurmdbd.pid'}",
            # "localhost": the unix socket in MYSQL_UNIX_PORT; root gets in by unix_socket.
            "StorageType=accounting_storage/mysql",
            "StorageHost=localhost", "StorageUser=root", "StorageLoc=slurm_acct_db",
            "",
        ]
        # slurmdbd refuses a slurmdbd.conf that others may read.
        fd = os.open(self.dbd_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write("\n".join(lines))
        os.chmod(self.dbd_conf, 0o600)

    # -- processes -------------------------------------------------------------

    def _daemon_env(self):
        # The marker lets stop() find this cluster's slurmstepd processes, which
        # slurmd starts detached (they inherit slurmd's environment).
        return {**os.environ, **self.env(), "GPUQUEUE_SLURMCLUSTER": str(self.root)}

    def run(self, *args, check=True, timeout=30):
        """Run a client command (``"squeue", "-h"``) against this cluster; CompletedProcess."""
        r = subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.client_env(),
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def logs(self):
        acct = (f"\n--- slurmdbd.log\n{_tail(self.dbd_log)}"
                f"\n--- slurmdbd.out\n{_tail(self.log_dir / 'slurmdbd.out')}"
                f"\n--- mariadb.log\n{_tail(self.mysql_log)}") if self.accounting else ""
        return (f"--- slurmctld.log\n{_tail(self.ctld_log)}\n"
                f"--- slurmd.log\n{_tail(self.slurmd_log)}"
                f"\n--- munged.log\n{_tail(self.munge.log)}{acct}")

    def _fail(self, what):
        msg = f"{what}\n{self.logs()}"
        self.stop()
        raise RuntimeError(msg)

    def _wait(self, what, ok, proc, timeout):
        end = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            if proc.poll() is not None:
                self._fail(f"{what}: the daemon exited with {proc.returncode}")
            if time.monotonic() > end:
                self._fail(f"{what}: not ready after {timeout}s")
            time.sleep(0.1)

    def start(self, timeout=60):
        self.install_seconds = ensure_installed(self.accounting)
        t0 = time.monotonic()
        self._write_config()
        self.munge.start()
        env = self._daemon_env()
        if self.accounting:
            self._start_accounting(env, timeout)
        self.ctld = subprocess.Popen(
            [_which("slurmctld"), "-D", "-f", str(self.conf)], env=env, cwd=self.root,
            start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(self.log_dir / "slurmctld.out", "ab"), stderr=subprocess.STDOUT)
        self._wait("slurmctld did not answer `scontrol ping`",
                   lambda: "UP" in self.run("scontrol", "ping", check=False, timeout=5).stdout,
                   self.ctld, timeout)
        self.slurmd = subprocess.Popen(
            [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)], env=env, cwd=self.root,
            start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(self.log_dir / "slurmd.out", "ab"), stderr=subprocess.STDOUT)
        self._wait(f"node {NODE} did not become idle", self._node_idle, self.slurmd, timeout)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_accounting(self, env, timeout):
        """MariaDB on a unix socket only, then slurmdbd on 127.0.0.1 only.

        ``--no-defaults`` (first) keeps /etc/mysql's options (system socket, log
        file, bind-address) out.  slurmdbd.conf has no socket option: slurmdbd's
        client library takes it from ``MYSQL_UNIX_PORT``, and lets slurmdbd in as
        the MariaDB user root by unix_socket auth since it runs as root; slurmdbd
        creates its database, slurmctld registers the cluster.  slurmdbd ignores
        DbdAddr and binds to INADDR_ANY, or with ``NoInAddrAny`` to what its
        hostname resolves to, which may be a public address: so it runs in a UTS
        namespace of its own, named "localhost".
        """
        t0 = time.monotonic()
        if not (self.mysql_data / "mysql").is_dir():
            r = subprocess.run([_which("mariadb-install-db"), "--no-defaults", "--user=root",
                                f"--datadir={self.mysql_data}", "--skip-test-db",
                                "--auth-root-authentication-method=socket"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                self._fail(f"mariadb-install-db exited {r.returncode}:\n{r.stdout}{r.stderr}")
        self.mysql = subprocess.Popen(
            [_which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={self.mysql_data}",
             f"--socket={self.mysql_sock}", "--skip-networking",
             f"--pid-file={self.root / 'mariadb.pid'}", f"--log-error={self.mysql_log}"],
            cwd=self.root, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(self.log_dir / "mariadb.out", "ab"), stderr=subprocess.STDOUT)
        ping = [_which("mariadb-admin"), "--no-defaults", f"--socket={self.mysql_sock}",
                "--user=root", "ping"]
        self._wait("MariaDB did not answer `mariadb-admin ping`",
                   lambda: subprocess.run(ping, capture_output=True, timeout=5).returncode == 0,
                   self.mysql, timeout)
        self.dbd = subprocess.Popen(
            [_which("unshare"), "--uts", "sh", "-c", 'hostname localhost && exec "$@"', "sh",
             _which("slurmdbd"), "-D"],
            env={**env, "MYSQL_UNIX_PORT": str(self.mysql_sock)}, cwd=self.root,
            start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(self.log_dir / "slurmdbd.out", "ab"), stderr=subprocess.STDOUT)
        self._wait("slurmdbd did not answer `sacctmgr show cluster`",
                   lambda: self.run("sacctmgr", "-n", "show", "cluster", check=False,
                                    timeout=5).returncode == 0,
                   self.dbd, timeout)
        self.accounting_seconds = time.monotonic() - t0

    def _node_idle(self):
        state = self.node_state()
        if any(bad in state for bad in ("inval", "drain", "fail")):
            node = self.run("scontrol", "show", "node", NODE, check=False, timeout=5).stdout
            self._fail(f"node {NODE} is {state}:\n{node}")
        return state == "idle"

    def node_state(self):
        return self.run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", check=False,
                        timeout=5).stdout.strip()

    def _stepds(self):
        """Pids of this cluster's slurmstepd processes."""
        marker = f"GPUQUEUE_SLURMCLUSTER={self.root}".encode()
        out = []
        for p in filter(str.isdigit, os.listdir("/proc")):
            if _comm(p) == "slurmstepd" and marker in _environ(p):
                out.append(int(p))
        return out

    def stop(self):
        """Cancel all jobs, stop slurmd and slurmctld, kill leftovers; then slurmdbd and
        MariaDB; munged too if ours."""
        if self.ctld and self.ctld.poll() is None:
            try:
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    ids = self.run("squeue", "-h", "-o", "%i", check=False,
                                   timeout=5).stdout.split()
                    if not ids:
                        break
                    self.run("scancel", *ids, check=False, timeout=5)
                    time.sleep(0.2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        helpers = [c for proc in (self.slurmd, self.ctld) if proc and proc.poll() is None
                   for c in _descendants(proc.pid)]  # slurmscriptd and the like
        for proc in (self.slurmd, self.ctld):
            _stop_proc(proc)
        stepds = self._stepds()
        _kill([c for p in stepds for c in _descendants(p)] + stepds
              + [p for p in helpers if _comm(p).startswith("slurm")])
        for proc in (self.dbd, self.mysql):  # after slurmctld, which reports to them
            _stop_proc(proc)
        self.munge.stop()
        for d in self._short_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def listening(self):
        """``ss`` lines for the TCP sockets slurmctld, slurmd, slurmdbd and mariadbd
        listen on (mariadbd: none)."""
        pids = {str(p.pid) for p in (self.ctld, self.slurmd, self.dbd, self.mysql)
                if p and p.poll() is None}
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        return [line.split()[3] + " " + line.split()[-1] for line in out.splitlines()
                if any(f"pid={pid}," in line for pid in pids)]

    # -- for the tests ---------------------------------------------------------------

    def job(self, job_id):
        """``scontrol -o show job ID`` as a dict ({} once the job is forgotten)."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return parse_scontrol(r.stdout)


def parse_scontrol(line):
    """``Key=Value Key=Value ...`` (one job of ``scontrol -o show job``) to a dict.

    Values may hold spaces only in a few fields (Command, WorkDir, StdOut...); a
    token without ``=`` is joined to the previous value.
    """
    out, key = {}, None
    for tok in line.strip().split(" "):
        k, eq, v = tok.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][\w/:]*", k):
            key = k
            out[key] = v
        elif key:
            out[key] += " " + tok
    return out


def _fresh(folder):
    """``folder``, emptied: only an empty folder or one this module made is removed."""
    root = Path(folder).resolve()
    if root.exists():
        if any(root.iterdir()) and not (root / "slurm.conf").exists():
            raise SystemExit(f"{root} is not empty and holds no slurm.conf: not removing it")
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return root


def main(folder):
    """Start the cluster in ``folder`` and run until Ctrl-C (or SIGTERM)."""
    root = _fresh(folder)
    cluster = SlurmCluster(root).start()
    print(f"slurm cluster up in {cluster.startup_seconds:.1f}s: "
          f"slurmctld {ADDR}:{cluster.ctld_port}, slurmd {ADDR}:{cluster.slurmd_port}, "
          f"{cluster.cpus} CPUs, {cluster.gpus} fake GPUs")
    print(f"in another terminal:\n  export SLURM_CONF={cluster.conf}\n"
          f"  sbatch --gres=gpu:1 --wrap 'echo $CUDA_VISIBLE_DEVICES'; squeue -t all")
    until_interrupted(cluster)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".slurmcluster")
