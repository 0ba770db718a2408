"""A multi-node Ray cluster on this machine, for trying the cluster path end to end without one.

    python -m jobs.local_cluster up   --scratch /tmp/odc --workers 2     # head + 2 worker nodes, shared storage
    python -m jobs.local_cluster down --scratch /tmp/odc

`up` starts a head and worker nodes as separate `ray start` process trees, each with its own scratch directory
under `--scratch` (`head/`, `w1/`, ...), and one shared storage root (`<scratch>/shared` unless
`--storage-root` says otherwise); it prints the address to submit to and the environment to use, then returns
(the nodes keep running). `down` stops every node of that scratch directory. See `pipeline.cluster.local`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jobs.common import run


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a multi-node Ray cluster on this machine.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--scratch", default="/tmp/odedit-cluster", help="short path: each node's scratch goes here")
    parser.add_argument("--storage-root", default="", help="shared storage root; default <scratch>/shared")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes")
    parser.add_argument("--worker-cpus", type=float, default=2.0, help="CPUs each worker node offers")
    parser.add_argument("--head-cpus", type=float, default=1.0, help="CPUs the head offers")
    args = parser.parse_args(argv)
    # deferred: psutil and Ray's CLI plumbing only when a cluster is started or stopped
    from pipeline.cluster.local import LocalCluster

    scratch = os.path.abspath(args.scratch)
    if args.action == "down":
        try:
            cluster = LocalCluster.load(scratch)
        except FileNotFoundError:
            print(f"error: no cluster recorded in {scratch}", file=sys.stderr)
            return 2
        cluster.stop()
        print(f"stopped the cluster of {scratch}")
        return 0
    cluster = LocalCluster(
        scratch=scratch,
        storage_root=os.path.abspath(args.storage_root or os.path.join(scratch, "shared")),
        head_cpus=args.head_cpus,
        worker_cpus=args.worker_cpus,
    ).start(workers=args.workers)
    print(f"cluster up: head + {args.workers} worker nodes; each node's scratch under {scratch}")
    print(f"submit to:    {cluster.address}")
    print(f"storage root: {cluster.storage_root}")
    print(
        f"try:          python -m jobs.submit --address {cluster.address} --storage-root {cluster.storage_root} "
        "-- python -m jobs.demo --config jobs/configs/demo.yaml resources.num_workers=2"
    )
    print(f"stop it:      python -m jobs.local_cluster down --scratch {scratch}")
    return 0


if __name__ == "__main__":
    run(cli)
