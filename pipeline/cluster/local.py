"""A multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start` processes.

    cluster = LocalCluster(scratch="/tmp/odc", storage_root="/tmp/odc/shared").start(workers=2)
    cluster.address            # http://127.0.0.1:<dashboard>: for `ray job submit --address`
    cluster.kill_node("w1")    # the node's raylet, agents and workers, all at once (SIGKILL)
    cluster.stop()

What a real cluster looks like to the code, on one machine: every node is its own `ray start --block` process
tree with its own `--temp-dir` (its scratch: session files, logs, Ray's copy of a job's working directory), which
the other nodes never read; the only directory they share is the storage root. Every port a node opens is
picked free, so several nodes and other Ray instances coexist. Nodes run in their own process groups: stopping
or killing one touches nothing else. `python -m jobs.local_cluster up|down` drives the same class from a shell
(docs/operations.md).

[INFERENCE] Scratch paths are kept short (under /tmp): Ray puts Unix sockets inside the temp dir, and a socket
path is limited to 107 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import psutil

from pipeline.cluster.session import SESSION_FILE, recorded_cluster
from pipeline.storage.jsonio import write_json

STATE_FILE = "local_cluster.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    """Every per-node agent port pinned to a free one: Ray's defaults (52365, ...) clash between nodes."""
    out: list[str] = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        out += [flag, str(free_port())]
    return out


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


@dataclass
class Node:
    name: str
    pid: int
    scratch: str
    num_cpus: float
    head: bool = False


@dataclass
class LocalCluster:
    """See the module docstring. `storage_root` is created; every node's scratch lies under `scratch`."""

    scratch: str
    storage_root: str
    head_cpus: float = 1.0
    worker_cpus: float = 2.0
    port: int = 0
    dashboard_port: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of every node and client: token authentication, usage stats off, the storage root,
        the project's `ray` first on PATH."""
        bin_dir = os.path.dirname(sys.executable)
        return dict(
            os.environ,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="token",  # the head writes the token (~/.ray/auth_token); nodes and clients present it
            ODEDIT_STORAGE_ROOT=self.storage_root,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
        )

    # ------------------------------------------------------------------ nodes

    def _ray_start(self, name: str, args: list[str], num_cpus: float, head: bool) -> Node:
        node_scratch = os.path.join(self.scratch, name)
        os.makedirs(node_scratch, exist_ok=True)
        log = open(os.path.join(self.scratch, f"{name}.log"), "w")  # noqa: SIM115 (kept open for the child)
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        proc = subprocess.Popen(
            [
                ray,
                "start",
                "--block",
                "--disable-usage-stats",
                "--num-cpus",
                f"{num_cpus:g}",
                "--temp-dir",
                node_scratch,
            ]
            + _agent_ports()
            + args,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        node = Node(name=name, pid=proc.pid, scratch=node_scratch, num_cpus=num_cpus, head=head)
        self.nodes[name] = node
        return node

    def start(self, workers: int = 2, timeout: float = 180.0) -> LocalCluster:
        """Start the head and `workers` worker nodes (`w1`, `w2`, ...); return once all are alive."""
        os.makedirs(self.storage_root, exist_ok=True)
        self.port, self.dashboard_port = free_port(), free_port()
        self._ray_start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--dashboard-port",
                str(self.dashboard_port),
                "--dashboard-host",
                "127.0.0.1",
                "--ray-client-server-port",
                str(free_port()),
            ],
            self.head_cpus,
            head=True,
        )
        self._wait_dashboard(timeout)
        for i in range(1, workers + 1):
            self.add_worker(f"w{i}")
        self.wait_nodes(1 + workers, timeout)
        self.save()
        return self

    def add_worker(self, name: str, num_cpus: float | None = None) -> Node:
        return self._ray_start(
            name, ["--address", self.gcs_address], self.worker_cpus if num_cpus is None else num_cpus, head=False
        )

    def _wait_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # it answered (401 without the token): it is up
                return
            except OSError:
                if not psutil.pid_exists(self.nodes["head"].pid):
                    raise RuntimeError(f"the head exited; see {os.path.join(self.scratch, 'head.log')}") from None
                time.sleep(1)
        raise TimeoutError(f"the head's dashboard did not answer within {timeout:g} s")

    def alive_nodes(self) -> int:
        """How many nodes the head's GCS counts alive (through `ray list nodes`, a separate process)."""
        out = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "ray"),
                "list",
                "nodes",
                "--address",
                self.address,
                "--filter",
                "state=ALIVE",
                "--format",
                "json",
            ],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            return len(json.loads(out.stdout))
        except ValueError:
            return 0

    def wait_nodes(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= count:
                return
            time.sleep(2)
        raise TimeoutError(f"{count} nodes were not alive within {timeout:g} s; logs in {self.scratch}")

    def node_processes(self, name: str) -> list[psutil.Process]:
        """Every process of node `name`: its `ray start` tree and anything started with its scratch path."""
        node = self.nodes[name]
        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(node.pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if node.scratch + os.sep in cmdline or cmdline.endswith(node.scratch):
                procs[proc.pid] = proc
        return list(procs.values())

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of node `name` at once (a machine lost, not a clean `ray stop`); returns how many."""
        procs = self.node_processes(name)
        _signal(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        self.nodes.pop(name)
        self.save()
        return len(procs)

    def stop(self) -> None:
        """Stop every node (workers first), then forget Ray's session file when it points at this head."""
        # [INFERENCE] One grace period for all nodes, not one per node: some of Ray's processes ignore SIGTERM,
        # and waiting out each node in turn took the whole period once per node.
        workers = [p for n in self.nodes if not self.nodes[n].head for p in self.node_processes(n)]
        heads = [p for n in self.nodes if self.nodes[n].head for p in self.node_processes(n)]
        _signal(workers, signal.SIGTERM)
        _, alive = psutil.wait_procs(workers, timeout=5)
        _signal(heads, signal.SIGTERM)
        _, alive_heads = psutil.wait_procs(heads + alive, timeout=10)
        _signal(alive_heads, signal.SIGKILL)
        psutil.wait_procs(alive_heads, timeout=10)
        self.nodes.clear()
        if (recorded_cluster() or "").endswith(f":{self.port}"):
            os.remove(SESSION_FILE)
        state = os.path.join(self.scratch, STATE_FILE)
        if os.path.exists(state):
            os.remove(state)

    # ------------------------------------------------------------------ state for the CLI

    def save(self) -> str:
        path = os.path.join(self.scratch, STATE_FILE)
        data = {k: v for k, v in asdict(self).items() if k != "nodes"}
        data["nodes"] = {n: asdict(node) for n, node in self.nodes.items()}
        return write_json(path, data, indent=1)

    @classmethod
    def load(cls, scratch: str) -> LocalCluster:
        with open(os.path.join(scratch, STATE_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
        nodes = {n: Node(**node) for n, node in data.pop("nodes").items()}
        return cls(**data, nodes=nodes)

    def remove_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
