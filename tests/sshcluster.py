"""A real OpenSSH cluster on loopback: a jump host on 127.0.0.1 and nodes on 127.0.0.2-9.

Used by the tests as a fixture and by ``make cluster`` so a person can try SSH
mode by hand.  Every sshd is a real /usr/sbin/sshd with its own fresh host
key, listening only on its loopback address; the client key and known_hosts
are fresh too.  Nodes are reached only through the jump host in the config
this writes.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

SSHD = "/usr/sbin/sshd"
JUMP_ADDR = "127.0.0.1"
#: The unprivileged user the test nodes log in as, as a real node's user would be; its
#: home is empty, so no login script of this machine's runs on the nodes.
NODE_USER = "gqnode"
NODE_HOME = Path("/var/lib/gqnode")
#: What the nodes run their agent with: the system's python3, as on a bare node.
NODE_PYTHON = "/usr/bin/python3"


def node_addr(i):
    return f"127.0.0.{i + 2}"


def _free_port(addrs):
    """A port free on every one of ``addrs``."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addrs[0], 0))
            port = s.getsockname()[1]
        try:
            for a in addrs:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port on loopback")


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class Sshd:
    """One sshd process bound to one loopback address."""

    def __init__(self, root, name, addr, port, authorized_keys):
        self.name, self.addr, self.port = name, addr, port
        self.dir = root / name
        self.dir.mkdir()
        self.host_key = self.dir / "host_key"
        _keygen(self.host_key)
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join([
            f"ListenAddress {addr}:{port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized_keys}",
            "UsePAM no", "StrictModes no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin yes", "AllowTcpForwarding yes", "PermitTunnel no",
            "MaxStartups 200", "MaxSessions 200", "LogLevel INFO", "UseDNS no",
            "Subsystem sftp internal-sftp", "",
        ]))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "ab"))
        end = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((self.addr, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"sshd {self.name} did not start: "
                                   f"{(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.05)

    def stop(self):
        """Kill this sshd and everything under it, as if the host went down."""
        if self.proc and self.proc.poll() is None:
            for pid in [self.proc.pid] + _descendants(self.proc.pid):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            self.proc.wait(10)

    def signal_all(self, sig):
        """Send ``sig`` to this sshd and everything under it (SIGSTOP: a hung host)."""
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def known_hosts_line(self):
        pub = (self.dir / "host_key.pub").read_text().split()
        return f"[{self.addr}]:{self.port} {pub[0]} {pub[1]}\n"


class Cluster:
    """A jump host and ``n`` nodes; ``config(...)`` gives a gpuqueue config for them."""

    def __init__(self, root, n=8, as_node_user=True):
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} is missing: install openssh-server (make test does)")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
        self.root = Path(root)
        #: Who the nodes log in as: NODE_USER when these tests run as root (then
        #: the jump host stays the tests' own user), else the tests' user.
        self.node_user = node_user() if as_node_user else None
        if self.node_user:
            open_to_nodes(self.root, writable=False)
        self.client_key = self.root / "client_key"
        _keygen(self.client_key)
        authorized = self.root / "authorized_keys"
        authorized.write_text((self.root / "client_key.pub").read_text())
        jump_port = _free_port([JUMP_ADDR])
        node_port = _free_port([node_addr(i) for i in range(n)])
        self.jump = Sshd(self.root, "jump", JUMP_ADDR, jump_port, authorized)
        self.nodes = [Sshd(self.root, f"node{i}", node_addr(i), node_port, authorized)
                      for i in range(n)]
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text("".join(s.known_hosts_line() for s in [self.jump] + self.nodes))
        for s in self.nodes:
            work = self.root / "work" / s.name
            work.mkdir(parents=True)
            if self.node_user:
                shutil.chown(work, self.node_user, self.node_user)

    def start(self):
        for s in [self.jump] + self.nodes:
            s.start()
        return self

    def stop(self):
        for s in [self.jump] + self.nodes:
            s.stop()

    def config(self, **settings):
        """A gpuqueue config mapping that reaches every node through the jump host."""
        user = _user()
        return {
            "jump": {"host": JUMP_ADDR, "port": self.jump.port, "user": user,
                     "key_file": str(self.client_key)},
            "known_hosts": str(self.known_hosts),
            "node_defaults": {"port": self.nodes[0].port, "user": self.node_user or user,
                              "key_file": str(self.client_key),
                              "python": NODE_PYTHON if self.node_user else sys.executable},
            "nodes": [{"id": i, "host": s.addr, "workdir": str(self.root / "work" / s.name)}
                      for i, s in enumerate(self.nodes)],
            **settings,
        }


def _descendants(pid):
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _user():
    return pwd.getpwuid(os.getuid()).pw_name


def node_user():
    """NODE_USER, created with an empty home when missing; None unless running as
    root (then the nodes log in as the tests' own user)."""
    if os.getuid() != 0:
        return None
    try:
        pwd.getpwnam(NODE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", str(NODE_HOME),
                        "--shell", "/bin/sh", NODE_USER], check=True)
    # No password, but not locked either: sshd refuses locked accounts even for keys.
    subprocess.run(["usermod", "--password", "*", NODE_USER], check=True)
    NODE_HOME.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(NODE_HOME, NODE_USER, NODE_USER)
    return NODE_USER


def open_to_nodes(path, writable=True):
    """Let the nodes' user reach ``path``: every folder above it traversable, and the
    folder itself writable to all when ``writable`` (jobs leave marker files there).
    A second pytest session started meanwhile makes /tmp/pytest-of-<user> private
    again (pytest does so at each start), and from then on the nodes' logins fail
    ("Could not open user 'gqnode' authorized keys": Permission denied, in each
    sshd.log): run one session at a time."""
    path = Path(path).resolve()
    for folder in [path, *path.parents]:
        mode = os.stat(folder).st_mode
        os.chmod(folder, mode | 0o011)
    if writable:
        os.chmod(path, 0o777)
    return path


#: The port of the server that ``make cluster``'s config sets.
CLUSTER_PORT = 8001


def main(folder):
    """``make cluster``: start the cluster, write its config, run until Ctrl-C."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir():
            subprocess.run(["rm", "-rf", str(old)], check=True)
        else:
            old.unlink()
    if os.getuid() == 0:
        print(f"the nodes log in as the unprivileged user {NODE_USER}, created now if "
              "missing (with an empty home)", flush=True)
    cluster = Cluster(root).start()
    # Port 8001, so that it runs beside a `make run` server (which has 8000).
    cfg = cluster.config(host="127.0.0.1", port=CLUSTER_PORT, spool=str(root / "spool"),
                         tokens=str(root / "tokens.yaml"))
    (root / "gpuqueue.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    me = f"python3 {Path(__file__).resolve().parent.parent / 'gpuqueue.py'}"
    print(f"sshd cluster up: jump host {JUMP_ADDR}:{cluster.jump.port}, nodes "
          f"{node_addr(0)}-{node_addr(len(cluster.nodes) - 1)} port {cluster.nodes[0].port}")
    print(f"in another terminal:\n  {me} --config {root}/gpuqueue.yaml tokens create alice\n"
          f"  {me} --config {root}/gpuqueue.yaml serve\n"
          f"(it serves on http://127.0.0.1:{CLUSTER_PORT}: GPUQUEUE_URL=http://127.0.0.1:"
          f"{CLUSTER_PORT} for the client)")
    print("this stays in the foreground until Ctrl-C, which stops the cluster", flush=True)
    until_interrupted(cluster)


def until_interrupted(cluster):
    """Keep a cluster started by hand up until Ctrl-C (or SIGTERM), then stop it."""
    print("Ctrl-C stops the cluster.", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background
        signal.signal(sig, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".cluster")
