# Two commands matter: `make run` and `make test`.  Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench gpu-check setup sshd chromium slurm tsp cluster screenshot clean

run: $(VENV)/.installed
	$(PY) gpuqueue.py serve

test: $(VENV)/.dev-installed sshd chromium slurm
	$(PY) -m pytest -q tests

# Not part of `make test`: measures, asserts nothing, writes bench/RESULTS.md (20-40 minutes).
bench: $(VENV)/.dev-installed sshd tsp
	cd bench && ../$(PY) run_all.py

# Not part of `make test`: on a machine with an NVIDIA GPU, the real nvidia-smi and GPU
# memory seen as gpuqueue's own or used outside the queue (about a minute).
gpu-check: $(VENV)/.dev-installed
	$(PY) tests/gpu_check.py

setup: $(VENV)/.dev-installed

# The README's picture of the dashboard (docs/dashboard.png), taken again from the real one.
screenshot: $(VENV)/.dev-installed chromium
	cd tests && ../$(PY) screenshot.py

# A loopback sshd cluster (jump host + 8 nodes) and a config for it, to try SSH mode by hand.
cluster: $(VENV)/.dev-installed sshd
	$(PY) tests/sshcluster.py .cluster

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The SSH tests start real OpenSSH servers on loopback; install sshd when missing.
sshd:
	@test -x /usr/sbin/sshd || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; \
	  else echo "openssh-server is needed for the tests: run 'sudo apt-get install openssh-server'" >&2; exit 1; fi; }
	@test -x /usr/sbin/sshd

# bench/idle.py measures a drain against task-spooler; install it when missing
# (Debian names its command tsp; elsewhere it may be ts, which moreutils also has).
HAVE_TSP := { command -v tsp || { command -v ts && ts -V </dev/null 2>&1 | grep -qi spooler; }; } >/dev/null
tsp:
	@$(HAVE_TSP) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq task-spooler >/dev/null; \
	  else echo "task-spooler is needed for the benchmarks: run 'sudo apt-get install task-spooler'" >&2; exit 1; fi; }
	@$(HAVE_TSP)

# The dashboard tests drive Debian's headless Chromium; install it when missing.
chromium:
	@test -x /usr/lib/chromium/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is needed for the tests: run 'sudo apt-get install chromium'" >&2; exit 1; fi; }
	@test -x /usr/lib/chromium/chromium

# The Slurm tests start a real single-node Slurm on loopback, one with accounting
# (slurmdbd and a private MariaDB) too; install them when missing.
SLURM_PACKAGES := slurm-wlm munge slurmdbd mariadb-server
slurm:
	@test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/sbin/munged \
	  -a -x /usr/sbin/slurmdbd -a -x /usr/sbin/mariadbd || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null; \
	  else echo "$(SLURM_PACKAGES) are needed for the tests: run 'sudo apt-get install $(SLURM_PACKAGES)'" >&2; exit 1; fi; }
	@test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmdbd

clean:
	rm -rf $(VENV) .pytest_cache .cluster
