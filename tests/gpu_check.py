"""`make gpu-check`: on a machine with an NVIDIA GPU and its driver, run a gpuqueue
server with one local node on GPU 0 and check, with the real nvidia-smi, that

1. the GPU is read (name, memory, utilisation);
2. a job that allocates GPU memory is seen on it as gpuqueue's own job, not foreign;
3. a process started outside the queue on the GPU makes it ``foreign``: a job
   submitted meanwhile waits, saying why, and starts once that process has ended.

GPU memory is allocated through the CUDA driver (libcuda, with ctypes), so nothing
beyond the driver is needed.  Not part of `make test`: it needs a GPU.
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Server, job_config, kill_processes_under  # noqa: E402

#: Allocates MiB of GPU memory on the first visible GPU, says so, then sleeps.
HOLD_GPU = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
ctx, ptr, dev = ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_int()
assert cuda.cuInit(0) == 0, "cuInit failed"
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), MIB << 20) == 0, "cuMemAlloc failed"
print("holding", MIB, "MiB", flush=True)
time.sleep(SECONDS)
"""


def holder(mib, seconds):
    return HOLD_GPU.replace("MIB", str(mib)).replace("SECONDS", str(seconds))


def wait(what, check, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"FAIL: {what} (after {timeout} s)")


def main():
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        raise SystemExit("FAIL: nvidia-smi does not answer: this check needs an NVIDIA GPU")
    root = Path(tempfile.mkdtemp(prefix="gpuqueue-gpu-check-"))
    server = Server(root / "s", nodes=[{"id": 0, "host": "local", "gpus": "0"}]).start()
    outsider = None
    try:
        node = wait("nvidia-smi read", lambda: (n := server.get("/api/nodes").json()["nodes"][0])
                    .get("gpus") and n)
        gpu = node["gpus"][0]
        assert gpu["name"] and gpu["memory_total_mib"] > 0, gpu
        print(f"PASS 1: read {gpu['name']}, {gpu['memory_used_mib']}/{gpu['memory_total_mib']} "
              f"MiB, {gpu['utilization_pct']}% busy; state {node['gpu_slots'][0]['state']}")

        job = server.submit_ok(holder(512, 60), config=job_config("alice", 120))
        server.wait(job["job_id"], ("running",))

        def own():
            g = server.get("/api/nodes").json()["nodes"][0].get("gpus", [{}])[0]
            return any(p["job"] == job["job_id"] for p in g.get("processes", [])) and g
        g = wait("the job's process seen as gpuqueue's own", own)
        assert g["foreign"] is None, g
        print(f"PASS 2: the job's process is on GPU 0 as job {job['job_id']}: {g['processes']}")
        server.post(f"/api/cancel/{job['job_id']}", server.token())
        server.wait(job["job_id"])

        outsider = subprocess.Popen([sys.executable, "-c", holder(256, 300)],
                                    stdout=subprocess.PIPE, text=True)
        outsider.stdout.readline()
        node = wait("the GPU marked foreign", lambda: (n := server.get("/api/nodes").json()
                                                        ["nodes"][0])["gpu_slots"][0]["state"]
                    == "foreign" and n)
        waiting = server.submit_ok("print('ran after the outsider')\n")
        st = server.status(waiting["job_id"])
        assert st["status"] == "pending" and f"pid {outsider.pid}" in st["waiting"], st
        print(f"PASS 3a: foreign: {node['gpus'][0]['foreign']}; a new job waits: {st['waiting']}")
        outsider.kill()
        outsider.wait()
        done = server.wait(waiting["job_id"], timeout=60)
        assert done["status"] == "completed", done
        print("PASS 3b: once the outside process ended, the waiting job ran")
    finally:
        if outsider is not None and outsider.poll() is None:
            outsider.kill()
        server.kill()
        kill_processes_under(root)
    print("gpu-check: all passed")


if __name__ == "__main__":
    main()
