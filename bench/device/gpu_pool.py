"""Two projects on one pool of one real GPU, through a real kiln server: each driver's
gpu=0.5 run is admitted within its queue's half, both run at once on GPU 0, and NVML
sees both processes."""

import json
import os
import subprocess
import sys
import tempfile
import time

import httpx


def drive() -> None:
    from gpu_share import half

    print(json.dumps(half.remote(12.0)), flush=True)


def main() -> None:
    env = dict(os.environ)
    base = tempfile.mkdtemp(prefix="kiln-pool-")
    with open(os.path.join(base, "server.log"), "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kiln", "server", "--home", f"{base}/srv", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    url = server.stdout.readline().split()[2]
    enrol = server.stdout.readline().split("--enrol ")[1].split()[0]

    def h(token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    out: dict = {}
    try:
        c = httpx.Client(base_url=url + "/api/v1", timeout=30)
        red = c.post("/enrol", json={"name": "root"}, headers=h(enrol)).json()["token"]
        blue = c.post("/projects", json={"name": "blue"}, headers=h(red)).json()["token"]["token"]
        c.put(
            "/pools/box", json={"cpu": 8, "gpu": 1, "gpu_type": "H200"}, headers=h(red)
        ).raise_for_status()
        for t in (red, blue):
            c.put("/queues/box", json={"cpu": 4, "gpu": 0.5}, headers=h(t)).raise_for_status()
        drivers = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "drive"],
                env={
                    **env,
                    "KILN_SERVER": url,
                    "KILN_TOKEN": t,
                    "KILN_POOL": "box",
                    "KILN_HOME": f"{base}/driver-{i}",
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, t in enumerate((red, blue))
        ]
        time.sleep(9)
        out["workloads_midway"] = [c.get("/workloads", headers=h(t)).json() for t in (red, blue)]
        done = [d.communicate(timeout=200) for d in drivers]
        out["stderr_tails"] = [e[-1500:] for _, e in done]
        results = [json.loads(o.strip().splitlines()[-1]) for o, _ in done]
        out["results"] = results
        seen = set(results[0]["nvml_pids_seen"]) | set(results[1]["nvml_pids_seen"])
        out["checks"] = {
            "both_seen_by_nvml": {results[0]["pid"], results[1]["pid"]} <= seen,
            "both_on_gpu0": results[0]["visible"] == results[1]["visible"] == "0",
            "ran_at_once": abs(results[0]["started"] - results[1]["started"]) < 8,
        }
        out["runs"] = [
            c.post("/runs:search", json={"app": "gpucheck"}, headers=h(t)).json()["runs"][0]["run"][
                "resources"
            ]
            for t in (red, blue)
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(out, indent=1, default=str)[-6000:])
    with open(os.path.join(os.environ.get("OUT", "."), "pool.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    drive() if sys.argv[1:] == ["drive"] else main()
