#!/usr/bin/env python3
"""W10 of benches/e2e.sh: N restores at once through one `rehydrate serve`.

  jobs.py SERVER PROFILE MANIFEST TARGET_DIR N PREFIX

Submits N jobs (ids PREFIX-0 .. PREFIX-N-1, targets TARGET_DIR/PREFIX-I.img) as fast as
it can, then polls the job list every 20 ms until every job has finished.
Prints one JSON object: {"job_secs": [...], "failed": n}: each job's time from
its submission to the first poll that saw it finished (resolution 20 ms; the
worker's own timestamps are whole seconds). Exit 1 if a job did not succeed.
JOBS_TIMELINE=FILE: also write each poll there, one line per poll: the seconds since the
first submission, then each job's written bytes (in job order; "-" before it shows up).
"""
import json
import os
import sys
import time
import urllib.request


def call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def main():
    server, profile, manifest, target_dir, n, prefix = sys.argv[1:5] + [int(sys.argv[5]), sys.argv[6]]
    submitted = {}
    timeline = open(os.environ["JOBS_TIMELINE"], "w") if os.environ.get("JOBS_TIMELINE") else None
    order = [f"{prefix}-{i}" for i in range(n)]
    start = time.monotonic()
    for i in range(n):
        job = f"{prefix}-{i}"
        call("POST", f"{server}/v1/jobs", {"id": job, "profile": profile, "manifest": manifest,
                                             "target": f"{target_dir}/{job}.img", "restart": True})
        submitted[job] = time.monotonic()
    done, failed = {}, 0
    while len(done) < n:
        time.sleep(0.02)
        now = time.monotonic()
        jobs = call("GET", f"{server}/v1/jobs?limit=1000")["jobs"]
        if timeline:
            written = {job["id"]: job.get("bytes", {}).get("written", 0) for job in jobs}
            timeline.write(" ".join([f"{now - start:.3f}"] + [str(written.get(j, "-")) for j in order]) + "\n")
        for job in jobs:
            if job["id"] in submitted and job["id"] not in done and job["state"] in ("succeeded", "failed", "cancelled"):
                done[job["id"]] = now - submitted[job["id"]]
                if job["state"] != "succeeded":
                    failed += 1
                    print(f"jobs.py: {job['id']} {job['state']}: {job.get('reason')}", file=sys.stderr)
    print(json.dumps({"job_secs": [done[j] for j in sorted(done)], "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
