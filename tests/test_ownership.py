"""Ownership the code enforces, read from gpuqueue.py's own source: the Spool's
index is the Spool's alone, the front ends reach the queue only through the
Scheduler, and the node protocol's comment says what its declaration says."""
import ast
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gpuqueue  # noqa: E402

SOURCE = (ROOT / "gpuqueue.py").read_text()
#: The classes that answer people and scripts: they may call the Scheduler alone.
FRONT_ENDS = ("Api", "Incoming", "Control")


def _classes(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _state_of(cls):
    """The attributes a class's __init__ gives its instances."""
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    return {t.attr for node in ast.walk(init) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for t in ast.walk(t) if isinstance(t, ast.Attribute)
            and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _public_names(cls):
    return {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not f.name.startswith("_")}


def _spool_like(expr):
    """Is ``expr`` a spool: a name or attribute called spool (or _spool)?"""
    return (isinstance(expr, ast.Name) and expr.id in ("spool", "_spool")) or (
        isinstance(expr, ast.Attribute) and expr.attr in ("spool", "_spool"))


def _job_like(expr):
    """Does ``expr`` name a job: ``job``, ``j``, ``other_job``, ``run.job``?"""
    return (isinstance(expr, ast.Name) and (expr.id == "j" or "job" in expr.id)) or (
        isinstance(expr, ast.Attribute) and expr.attr == "job")


def ownership_faults(source):
    """Every place in ``source`` that breaks the rules, as (line, what) pairs."""
    tree = ast.parse(source)
    classes = _classes(tree)
    spool = classes["Spool"]
    state, public = _state_of(spool), _public_names(spool)
    inside_spool = {id(node) for node in ast.walk(spool)}
    faults = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inside_spool:
            continue
        if node.attr in state and node.attr.startswith("_") and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"):
            faults.append((node.lineno, f"reads Spool's {node.attr}"))
        elif _spool_like(node.value) and node.attr not in public:
            faults.append((node.lineno, f"uses spool.{node.attr}, which is no method of Spool"))
    fields = {f.name for f in dataclasses.fields(gpuqueue.Job)}
    for node in ast.walk(tree):
        if id(node) in inside_spool or not isinstance(node, (ast.Assign, ast.AugAssign)):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in (e for target in targets for e in (
                target.elts if isinstance(target, ast.Tuple) else [target])):
            if isinstance(t, ast.Subscript):
                t = t.value  # job.slurm["state"] = ... changes the job too
            if isinstance(t, ast.Attribute) and t.attr in fields and _job_like(t.value):
                faults.append((node.lineno, f"changes a job's {t.attr} outside the Spool"))
    for name in FRONT_ENDS:
        for node in ast.walk(classes[name]):
            if isinstance(node, ast.Attribute) and node.attr in (
                    "spool", "_spool", "workers", "_workers"):
                faults.append((node.lineno, f"front end {name} reaches {node.attr}"))
            if isinstance(node, ast.Name) and node.id in ("Spool", "JobFolder", "spool"):
                faults.append((node.lineno, f"front end {name} names {node.id}"))
    return faults


def test_only_the_spool_touches_its_index_and_front_ends_only_the_scheduler():
    assert ownership_faults(SOURCE) == []


def test_the_check_finds_what_breaks_the_rules():
    """The check above can fail: each kind of breach, planted in a copy of the
    source, is found."""
    planted = {
        "a worker reading the index": SOURCE.replace(
            "    def _resume_all(self):\n        for job in self.spool.running_on(self.node.id):",
            "    def _resume_all(self):\n        for job in self.spool._running[self.node.id].values():"),
        "the scheduler taking the lock": SOURCE.replace(
            "        self._spool.admit(len(code)", "        self._spool._lock.acquire()\n"
            "        self._spool.admit(len(code)"),
        "a front end reaching the spool": SOURCE.replace(
            "        self.dir = scheduler.incoming_dir()",
            "        self.dir = scheduler._spool.incoming_dir()"),
        "a worker changing a job": SOURCE.replace(
            "                self.spool.note_slurm(j, scancel_sent=True)",
            "                j.slurm[\"scancel_sent\"] = True"),
        "a front end reaching the workers": SOURCE.replace(
            '        when = "now" if self.scheduler.serving else',
            '        when = "now" if self.scheduler._workers else'),
    }
    for what, source in planted.items():
        assert source != SOURCE, what
        assert ownership_faults(source), what


def _protocol_comment():
    """op -> fields of each command and of each report, as the Node program
    section's head comment writes them ("name {a, b?}")."""
    head = SOURCE[SOURCE.index("# Node program ####"):SOURCE.index("\nPROTOCOL = ")]
    said = {"commands": {}, "reports": {}}
    for line in head.splitlines():
        command, arrow, report = line.partition("->")
        for side, text in (("commands", command), ("reports", report if arrow else "")):
            for op, fields in re.findall(r"\b([a-z]+) \{([^}]*)\}", text):
                names = {f.strip() for f in fields.split(",") if f.strip()}
                said[side].setdefault(op, set()).update(names)
    return said


def test_the_protocol_comment_says_what_the_tables_declare():
    said = _protocol_comment()
    assert said["commands"] == {op: set(f) for op, f in gpuqueue.COMMANDS.items()}
    assert said["reports"] == {op: set(f) for op, f in gpuqueue.REPORTS.items()}


def test_both_ends_build_messages_the_tables_allow():
    line = gpuqueue.message(gpuqueue.REPORTS, "exited", id="a" * 24)
    assert line.endswith(b"\n") and b'"op": "exited"' in line
    for table, op, fields in ((gpuqueue.COMMANDS, "cancel", {}),  # a field missing
                              (gpuqueue.COMMANDS, "ping", {"id": "x"}),  # one undeclared
                              (gpuqueue.REPORTS, "started", {"id": "x", "wrapper": 1})):
        try:
            gpuqueue.message(table, op, **fields)
        except ValueError as exc:
            assert op in str(exc)
        else:
            raise AssertionError(f"{op} {fields} was let through")


def test_the_node_program_names_its_files_once():
    """The files of a job's folder on its node are named in NodeFiles alone; no
    other string in the module names one (JobFolder's names are the spool's own,
    Incoming's those of a drop folder's outcome, and "stdout", "stderr", "launched"
    and "outputs" are words of the API and the protocol too)."""
    names = {v for k, v in vars(gpuqueue.NodeFiles).items() if k.isupper() and isinstance(v, str)}
    names -= {"launched", "outputs"}
    tree = ast.parse(SOURCE)
    allowed = {id(n) for cls in ("NodeFiles", "JobFolder", "Incoming")
               for n in ast.walk(_classes(tree)[cls])}
    found = [(n.lineno, n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and n.value in names and id(n) not in allowed]
    assert len(names) >= 6 and found == []
