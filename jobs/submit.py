"""`ray job submit` target: run the whole pipeline (preflight first) on the cluster the job was submitted to.

    ray dashboard ray_cluster.yaml     # an SSH tunnel to the head's job API, in another terminal
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.submit --config configs/imagenet256.yaml storage.root=s3://bucket/runs

KubeRay runs it as deploy/k8s/rayjob.yaml's entrypoint. Arguments are those of `vq2 run`.
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    # Inside a Ray job, "auto" joins the cluster that runs the job instead of starting a local one.
    sys.exit(main(["run", *sys.argv[1:], "ray.address=auto"]))
