"""`ray job submit` target: run the whole pipeline on the cluster the job was submitted to.

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.submit --config configs/imagenet256.yaml storage.root=s3://bucket/runs
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    # Inside a Ray job, "auto" joins the cluster that runs the job instead of starting a local one.
    sys.exit(main(["run", *sys.argv[1:], "ray.address=auto"]))
