"""Submit a job to a Ray cluster with what the cluster cannot know: the git commit and the storage root.

    python -m jobs.submit --address http://127.0.0.1:8265 --storage-root /mnt/shared/odedit \\
        -- python -m jobs.demo --config jobs/configs/demo.yaml

Runs `ray job submit --working-dir <checkout> --runtime-env-json {...} -- <command>` with
`ODEDIT_GIT_COMMIT` (the checkout's `git rev-parse HEAD`, `-dirty` when it has uncommitted changes: Ray's copy of
the working directory has no `.git`), when given, `ODEDIT_STORAGE_ROOT`, and the switches that keep a log free of
progress-bar redraws (`pipeline.reporting.progress.QUIET_ENV`: a job's output is never a terminal, and these
reach every worker of the job) in the job's environment. Every other `ray job submit` option can follow
`--ray-args`; `RAY_ADDRESS` and Ray's token (`RAY_AUTH_MODE=token`) are honoured as by `ray job submit` itself.
Exits with `ray job submit`'s status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from jobs.common import run
from pipeline.reporting.progress import QUIET_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(checkout: str = ROOT) -> str:
    """HEAD of `checkout`, suffixed `-dirty` when tracked files differ from it; '' when it is no git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def submit_command(
    command: Sequence[str],
    *,
    address: str = "",
    storage_root: str = "",
    working_dir: str = ROOT,
    ray_args: Sequence[str] = (),
    commit: str | None = None,
) -> list[str]:
    """The `ray job submit` command line (see the module docstring)."""
    if not command:
        raise ValueError("no job command after `--` (e.g. -- python -m jobs.demo --config jobs/configs/demo.yaml)")
    if storage_root and not os.path.isabs(storage_root):
        raise ValueError(f"--storage-root {storage_root!r}: give an absolute path as the cluster's nodes mount it")
    env = {**QUIET_ENV, "ODEDIT_GIT_COMMIT": git_commit(working_dir) if commit is None else commit}
    if storage_root:
        env["ODEDIT_STORAGE_ROOT"] = storage_root
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    cmd = [ray, "job", "submit", "--working-dir", working_dir]
    cmd += ["--runtime-env-json", json.dumps({"env_vars": {k: v for k, v in env.items() if v}})]
    if address:
        cmd += ["--address", address]
    return [*cmd, *ray_args, "--", *command]


def cli(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, command = args[:i], args[i + 1 :]
    parser = argparse.ArgumentParser(
        description="Submit a job with its git commit and storage root: "
        "python -m jobs.submit [--address A] [--storage-root PATH] -- python -m jobs.<job> --config ..."
    )
    parser.add_argument("--address", default="", help="the cluster's dashboard address (else $RAY_ADDRESS)")
    parser.add_argument("--storage-root", default="", help="absolute path of the shared storage every node mounts")
    parser.add_argument("--ray-args", default="", help="more `ray job submit` options, quoted as one string")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    opts = parser.parse_args(args)
    try:
        cmd = submit_command(
            command, address=opts.address, storage_root=opts.storage_root, ray_args=shlex.split(opts.ray_args)
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opts.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    run(cli)
