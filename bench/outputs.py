"""10. The idle gap with a job's files to bring back.

4 local nodes, 6 jobs each, submitted at once. Each job prints time.time() first and
last (idle.py's gap: from one job's last line to the next job's first line on the same
node). Each job writes 100 MB before its last line. Baseline: it writes them in its
working folder, which is thrown away when it ends. Then it writes them into
$GPUQUEUE_OUTPUT_DIR, and they are brought back (copied, hashed and synced) beside the
scheduler, so the next job should not wait for the copy. Target: p50 gap with the
files brought back <= 1.5 x without (the copy shares the two cores and the disk with
the jobs).
"""
import shutil

from common import Row, Server, kill_processes_under, pct, workdir
from idle import gaps, session

NODES, ROUNDS, MB, SLEEP = 4, 6, 100, 0.2
JOB = ("import os, time\nprint(time.time(), flush=True)\n"
       f"time.sleep({SLEEP})\n"
       "with open(os.path.join({where}, 'ck.bin'), 'wb') as f:\n"
       f"    f.write(bytes({MB} << 20))\n"
       "print(time.time())\n")
FILES_JOB = JOB.replace("{where}", "os.environ['GPUQUEUE_OUTPUT_DIR']")
PLAIN_JOB = JOB.replace("{where}", "'.'")


def measure(root, name, job):
    server = Server(root / name, nodes=NODES, max_pending_per_user=10 ** 6,
                    keep_finished_days=0).start()
    try:
        return gaps(session(server), server, NODES, rounds=ROUNDS, job=job)
    finally:
        server.kill()
        kill_processes_under(root)
        shutil.rmtree(root / name, ignore_errors=True)  # 2.4 GB of files


def run():
    root = workdir("outputs")
    plain = measure(root, "plain", PLAIN_JOB)
    files = measure(root, "files", FILES_JOB)
    rows = []
    for p in (50, 90):
        base, value = pct(plain, p), pct(files, p)
        row = Row("outputs", f"idle gap p{p}, {MB} MB per job brought back vs left", base, value,
                  value / base if base else None, "<= 1.5" if p == 50 else "", "ms")
        row.show()
        rows.append(row)
    return rows


if __name__ == "__main__":
    run()
