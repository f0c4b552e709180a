"""The config file: defaults, the shipped example, and clear refusals naming the key."""
import re
import subprocess
import sys

import pytest
import yaml

import gpuqueue
from conftest import GPUQUEUE, ROOT


def test_built_in_default_is_eight_local_nodes():
    c = gpuqueue.load_config(None)
    assert [n.id for n in c.nodes] == list(range(8))
    assert all(n.is_local and n.gpus == (str(n.id),) for n in c.nodes)
    assert (c.host, c.port, c.timeout_multiplier, c.max_expected_time) == ("0.0.0.0", 8000, 2, 86400)
    assert (c.max_upload_bytes, c.output_limit_bytes) == (16 * 1024 * 1024, 10 * 1024 * 1024)


def test_example_config_loads_and_documents_every_key():
    example = ROOT / "gpuqueue.example.yaml"
    c = gpuqueue.load_config(example)
    assert c.jump.host == "jump.example.com"
    text = example.read_text()
    documented = set(re.findall(r"([a-z_]+):", text))
    for key in list(gpuqueue._CONFIG_KEYS) + list(gpuqueue._NODE_KEYS) + list(gpuqueue._JUMP_KEYS):
        assert key in documented, f"{key} is not in the example config"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "c.yaml").write_text("spool: q\ntokens: t/tokens.yaml\n")
    c = gpuqueue.load_config(tmp_path / "c.yaml")
    assert c.spool == tmp_path / "q" and c.tokens == tmp_path / "t" / "tokens.yaml"


def test_node_defaults_apply_and_a_nodes_own_keys_win(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "node_defaults": {"user": "gpu", "python": "python3.11", "env": {"A": "1"}},
        "nodes": [{"id": 0, "host": "n0.example.com"},
                  {"id": 1, "host": "n1.example.com", "user": "other", "gpus": "1,2"}]}))
    a, b = gpuqueue.load_config(tmp_path / "c.yaml").nodes
    assert (a.ssh.user, a.python, a.env, a.gpus) == ("gpu", "python3.11", {"A": "1"}, ("0",))
    assert (b.ssh.user, b.gpus, b.workdir) == ("other", ("1", "2"), "~/.gpuqueue")


@pytest.mark.parametrize("text, named", [
    ("prot: 80\n", "'prot'"),
    ("port: '8000'\n", "'port'"),
    ("timeout_multiplier: -1\n", "'timeout_multiplier'"),
    ("kill_grace: .nan\n", "'kill_grace'"),
    ("nodes: [{id: 0}]\n", "'host'"),
    ("nodes: [{id: 0, host: local, gpu: '0'}]\n", "'gpu'"),
    ("nodes: [{id: 0, host: local}, {id: 0, host: local}]\n", "unique"),
    ("nodes: []\n", "'nodes'"),
    ("jump: {hots: jump.example.com}\n", "'hots'"),
    ("nodes: [{id: 0, host: local, kind: slurm}]\n", "'kind'"),
    ("nodes: [{id: 0, host: n.example.com, kind: local}]\n", "'kind'"),
    ("nodes: [{id: 0, host: n.example.com, kind: pbs}]\n", "'kind'"),
    ("nodes: [{id: 0, host: n.example.com, kind: slurm, max_jobs: 0}]\n", "'max_jobs'"),
    ("accept_new_host_keys: 'yes'\n", "'accept_new_host_keys'"),
    ("- a list\n", "mapping"),
    ("port: [\n", "cannot read config"),
])
def test_bad_config_stops_start_up_naming_the_key(tmp_path, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, str(GPUQUEUE), "--config", str(cfg), "serve"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert named in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "spool").exists()
