"""A Slurm node whose cluster keeps accounting (slurmdbd with a private MariaDB on its
unix socket only): a job that ended and was forgotten by slurmctld while gpuqueue was
down is learned from sacct, with its real outcome.

The fixtures and helpers are test_slurm.py's; this module only brings its own Slurm.
"""
import pytest

from slurmcluster import SlurmCluster
from sshcluster import open_to_nodes
from test_slurm import forgotten_while_down, slurm_server, ssh  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(open_to_nodes(tmp_path_factory.mktemp("slurm-acct"), writable=False),
                           min_job_age=10, accounting=True).start()
    yield cluster
    cluster.stop()


def test_accounting_daemons_listen_on_loopback_only(slurm):
    listening = slurm.listening()
    # slurmctld, slurmd and slurmdbd on 127.0.0.1; MariaDB on its unix socket only.
    assert len(listening) == 3 and all(line.startswith("127.0.0.1:") for line in listening), listening


def test_a_forgotten_job_is_learned_from_sacct(slurm_server, slurm):
    server = slurm_server()
    st, done = forgotten_while_down(
        server, slurm, "import sys, time\ntime.sleep(8)\nprint('from the past')\nsys.exit(3)\n")
    assert done["status"] == "failed" and done["exit_code"] == 3, done
    assert done["error"] == "exit code 3" and done["slurm_state"] == "FAILED"
    assert done["slurm_job_id"] == st["slurm_job_id"]
    assert server.results(done["job_id"])["stdout"] == "from the past\n"
