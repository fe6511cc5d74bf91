"""`ray job submit` target: run the whole pipeline (preflight first) on the cluster the job was submitted to.

    ray dashboard ray_cluster.yaml     # an SSH tunnel to the head's job API, in another terminal
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.submit --config configs/imagenet256.yaml storage.root=s3://bucket/runs

KubeRay runs it as deploy/k8s/rayjob.yaml's entrypoint. Arguments are those of `vq2 run`, and
`--stop-after-s SECONDS`: the job stops itself then, as `ray job stop` stops it (SIGTERM: its MLflow runs
end KILLED, its leases are released), and a later job resumes from the checkpoints.
"""

import argparse
import os
import signal
import sys
import threading

from jobs.cli import main


def stop_after(seconds: float) -> None:
    """SIGTERM this process after `seconds`. A RayJob's activeDeadlineSeconds only marks the RayJob failed: the
    Ray job runs on until its cluster is deleted, which kills it without ending its MLflow runs or leases."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stop-after-s", type=float)
    known, run_args = parser.parse_known_args()
    if known.stop_after_s:
        stop_after(known.stop_after_s)
    # Inside a Ray job, "auto" joins the cluster that runs the job instead of starting a local one.
    sys.exit(main(["run", *run_args, "ray.address=auto"]))
