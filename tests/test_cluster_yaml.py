"""cluster.yaml boots as written and keeps the security promises of docs/operations.md.

What is checked here without a cloud account: Ray's own schema and command wrapping, every `pip install` of the
setup commands through pip's own parser (paths expanded as bash would, constraint files and extras present,
every named requirement pinned), ci/constraints-gpu.txt against ci/constraints.txt, the image's Python, Ray and
CUDA versions against the pins, the security settings, and the secret/env/MLflow-auth commands run twice in a
scratch home. The `slow` tests ask the package indexes whether the pins exist for the image's Python (skipped
where an index cannot be reached).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import tomllib
import types
import urllib.parse
import urllib.request
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONSTRAINTS = "ci/constraints.txt"
GPU_CONSTRAINTS = "ci/constraints-gpu.txt"
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
CONTAINER_HOME = "/home/ray"  # Ray's images run as user `ray`; `~` in commands and file_mounts is this home
IMAGE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cu\d+|gpu|cpu)$")
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
WORLD = {"0.0.0.0/0", "::/0"}


def _cluster():
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _commands(cfg, *lists):
    return [c for name in (lists or COMMAND_LISTS) for c in cfg.get(name) or []]


def _pins(relpath):
    """name -> Requirement for each pin line of a constraints file."""
    pins = {}
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                name = canonicalize_name(req.name)
                assert name not in pins, f"{relpath}: {req.name} pinned twice"
                pins[name] = req
    return pins


def _pinned_version(req):
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


def _image(cfg):
    match = IMAGE_TAG.match(cfg["docker"]["image"])
    assert match, f"docker.image {cfg['docker']['image']!r} is not rayproject/ray:<ray>-py3XX-<platform>"
    return match


def _requires_python():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["requires-python"]


# --- a small model of bash: enough to find `pip install` and expand its words as bash would -------------------


def _simple_commands(cmd):
    """Split a shell string into simple commands (lists of raw words, quotes kept) at unquoted && || ; | & ( )."""
    commands, words, word, i, quote = [], [], "", 0, None
    while i < len(cmd):
        ch = cmd[i]
        if quote:
            word += ch
            if ch == "\\" and quote == '"' and i + 1 < len(cmd):
                word += cmd[i + 1]
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote, word = ch, word + ch
        elif ch == "\\" and i + 1 < len(cmd):
            word += cmd[i : i + 2]
            i += 1
        elif ch == "$" and cmd.startswith("$(", i):  # command substitution: one word, never split
            depth, j = 0, i
            while j < len(cmd):
                depth += {"(": 1, ")": -1}.get(cmd[j], 0)
                if depth == 0 and cmd[j] == ")":
                    break
                j += 1
            word += cmd[i : j + 1]
            i = j
        elif ch.isspace() or ch in "&|;()":
            if word:
                words.append(word)
                word = ""
            if ch in "&|;()\n" and words:
                commands.append(words)
                words = []
        else:
            word += ch
        i += 1
    assert quote is None, f"unbalanced quote in {cmd!r}"
    if word:
        words.append(word)
    if words:
        commands.append(words)
    return commands


def _expand(word, home=CONTAINER_HOME):
    """Expand one raw word as bash does for the few forms used here: `~`/`~/` at the start of an unquoted word and
    $HOME/${HOME} outside single quotes. Anything else that bash would expand (or leave alone, like a quoted `~`)
    is an error: pip does not expand `~` or `$VAR` in paths, so such a path would reach pip literally."""
    out, i = "", 0
    if word == "~" or word.startswith("~/"):
        out, i = home, 1
    quote = None
    while i < len(word):
        ch = word[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                out += ch
        elif ch in "'\"" and (quote is None or ch == quote):
            quote = None if quote else ch
        elif ch == "\\" and i + 1 < len(word):
            out += word[i + 1]
            i += 1
        elif ch == "$":
            var = re.match(r"\$(HOME\b|\{HOME\})", word[i:])
            if not var:
                raise ValueError(f"{word!r}: only $HOME is known to expand here")
            out += home
            i += len(var.group(0)) - 1
        else:
            out += ch
        i += 1
    if "~" in out:
        raise ValueError(f"{word!r}: a quoted or embedded ~ is expanded by neither bash nor pip")
    if "$" in out:
        raise ValueError(f"{word!r}: a single-quoted $ is expanded by neither bash nor pip")
    return out


def _pip_install_argvs(cmd):
    """The expanded argv after `pip` of every `pip install` in a command string."""
    argvs = []
    for words in _simple_commands(cmd):
        for i, raw in enumerate(words):
            bare = raw.strip("'\"")
            if os.path.basename(bare) in ("pip", "pip3"):
                rest = words[i + 1 :]
            elif re.fullmatch(r"(.*/)?python3?(\.\d+)?", bare) and words[i + 1 : i + 3] == ["-m", "pip"]:
                rest = words[i + 3 :]
            else:
                continue
            if "install" in rest:
                argvs.append(rest)
            break
    return [[_expand(w) for w in argv] for argv in argvs]


def _local_path(remote, cfg):
    """The repository path that a node path comes from, through file_mounts (None when it comes from none)."""
    for target, source in cfg["file_mounts"].items():
        target = CONTAINER_HOME + target[1:] if target.startswith("~") else target
        if remote == target or remote.startswith(target.rstrip("/") + "/"):
            return os.path.normpath(os.path.join(ROOT, source, os.path.relpath(remote, target)))
    return None


def _pip_install_problems(cmd, cfg, monkeypatch):
    """Every reason why a `pip install` in `cmd` would fail or install something unpinned (empty: fine)."""
    from pip._internal.cli.main_parser import parse_command
    from pip._internal.commands import create_command

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip.conf must not leak into the options
    problems = []
    try:
        argvs = _pip_install_argvs(cmd)
    except ValueError as exc:
        return [str(exc)]
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    for argv in argvs:
        try:
            name, rest = parse_command(argv)
            options, args = create_command(name, isolated=True).parse_args(rest)
        except SystemExit:
            problems.append(f"pip cannot parse {argv}")
            continue
        if not options.constraints:
            problems.append(f"{argv}: no -c constraints file, so pip resolves its own versions")
        pins = {}
        for path in options.constraints + options.requirements:
            local = _local_path(path, cfg)
            if local is None or not os.path.isfile(local):
                problems.append(f"{path}: no such file in the repository (file_mounts)")
            elif path in options.constraints:
                pins.update(_pins(os.path.relpath(local, ROOT)))
        for url in [options.index_url, *options.extra_index_urls]:
            if not url.startswith("https://"):
                problems.append(f"{url}: package index not over https")
        for editable in options.editables:
            path, extras = re.fullmatch(r"(.*?)(?:\[([^\]]*)\])?", editable).groups()
            local = _local_path(path, cfg)
            if local is None or not os.path.isfile(os.path.join(local, "pyproject.toml")):
                problems.append(f"{editable}: not the project mounted from the repository")
            unknown = {e.strip() for e in (extras or "").split(",") if e.strip()} - set(
                project.get("optional-dependencies", {})
            )
            if unknown:
                problems.append(f"{editable}: pyproject.toml has no extra {sorted(unknown)}")
        for arg in args:
            req = Requirement(arg)
            name = canonicalize_name(req.name)
            if name in pins:
                version = _pinned_version(pins[name])
                if not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{arg}: the constraints pin {version}")
            elif not (len(req.specifier) == 1 and next(iter(req.specifier)).operator == "=="):
                problems.append(f"{arg}: neither constrained nor pinned with ==")
                continue
            else:
                version = _pinned_version(req)
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue
            if Version(dist.version) == version:  # the same release is installed here: its extras are known
                missing = set(req.extras) - set(dist.metadata.get_all("Provides-Extra") or [])
                if missing:
                    problems.append(f"{arg}: {req.name} {version} has no extra {sorted(missing)}")
    return problems


def _run(cmd, home, **env):
    """Run one command of cluster.yaml in bash with `home` as HOME (the commands tested this way touch only it)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    return subprocess.run(
        ["bash", "-c", cmd], env={"HOME": str(home), "PATH": path, **env}, capture_output=True, text=True, timeout=120
    )


def _command_with(cfg, needle, *lists):
    (cmd,) = [c for c in _commands(cfg, *lists) if needle in c]
    return cmd


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _reachable(host):
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


# --- schema and shape ------------------------------------------------------------------------------------------


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))  # defaults filled in as `ray up` does, then the schema


def test_cluster_has_cpu_head_and_gpu_workers():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert any(t["resources"].get("GPU", 0) > 0 for name, t in types.items() if name != cfg["head_node_type"])


def test_every_command_is_valid_bash_as_ray_runs_it():
    """Ray runs each command as `bash --login -c -i 'source ~/.bashrc; ... && (<command>)'`: a heredoc whose
    delimiter is not on a line of its own, or an unbalanced quote, only shows up once wrapped like that."""
    from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

    for cmd in _commands(_cluster()):
        wrapped = _with_interactive(_with_environment_variables(cmd, {"RAY_HEAD_IP": "10.0.0.1"}))
        (inner,) = shlex.split(wrapped[-1])
        check = subprocess.run(["bash", "-n", "-c", inner], capture_output=True, text=True)
        assert check.returncode == 0 and not check.stderr, f"{cmd!r}:\n{check.stderr}"


# --- install: pip's parser, the constraint files, the image ----------------------------------------------------


def test_pip_install_commands_parse_expand_and_resolve_by_name(monkeypatch):
    cfg = _cluster()
    installs = [c for c in _commands(cfg) if re.search(r"\bpip3?\b.*\binstall\b", c)]
    assert any(c in cfg["setup_commands"] for c in installs), "every node installs the project"
    for cmd in installs:
        assert _pip_install_problems(cmd, cfg, monkeypatch) == [], cmd
    (project_install,) = [c for c in cfg["setup_commands"] if _pip_install_argvs(c)]
    (argv,) = _pip_install_argvs(project_install)
    assert f"{CONTAINER_HOME}/odedit/{GPU_CONSTRAINTS}" in argv and f"{CONTAINER_HOME}/odedit[demo,vision]" in argv


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ('~/venv/bin/pip install -q -e "~/odedit[demo,vision]"', "expanded by neither bash nor pip"),
        ("pip install -c '$HOME/odedit/ci/constraints-gpu.txt' -e \"$HOME/odedit\"", "single-quoted $"),
        ('pip install -c "$HOME/odedit/ci/nope.txt" -e "$HOME/odedit"', "no such file"),
        ('pip install -e "$HOME/odedit[demo]"', "no -c constraints file"),
        ('pip install -c "$HOME/odedit/ci/constraints-gpu.txt" -e "$HOME/odedit[gpu]"', "no extra"),
        ('pip install -c "$HOME/odedit/ci/constraints-gpu.txt" Flask-WTF', "neither constrained nor pinned"),
        ('pip install -c "$HOME/odedit/ci/constraints-gpu.txt" "torch>=2.14"', "the constraints pin"),
        ('pip install -c "$HOME/odedit/ci/constraints-gpu.txt" "mlflow[nosuch]"', "has no extra"),
        ('pip install -c "$HOME/odedit/ci/constraints-gpu.txt" --frobnicate torch', "cannot parse"),
        ('pip install -c "$HOME/x/constraints.txt" torch', "no such file"),
        ('pip install -c "$CONSTRAINTS" torch', "only $HOME"),
    ],
)
def test_pip_install_check_rejects_broken_commands(cmd, reason, monkeypatch):
    problems = _pip_install_problems(cmd, _cluster(), monkeypatch)
    assert any(reason in p for p in problems), problems


def test_gpu_constraints_match_ci_pins_except_torch_family():
    cpu, gpu = _pins(CPU_CONSTRAINTS), _pins(GPU_CONSTRAINTS)
    for name, req in cpu.items():
        if name not in TORCH_FAMILY:
            assert name in gpu, f"{GPU_CONSTRAINTS} lacks {req}"
            assert str(gpu[name]) == str(req), f"{GPU_CONSTRAINTS} pins {gpu[name]}, {CPU_CONSTRAINTS} pins {req}"
    extra = sorted(set(gpu) - set(cpu) - TORCH_FAMILY)
    assert not extra, f"{GPU_CONSTRAINTS} pins what {CPU_CONSTRAINTS} does not: {extra}"


def test_torch_family_is_the_cuda_build_of_the_image():
    cfg = _cluster()
    cpu, gpu = _pins(CPU_CONSTRAINTS), _pins(GPU_CONSTRAINTS)
    torch, vision = _pinned_version(gpu["torch"]), _pinned_version(gpu["torchvision"])
    assert torch.public == _pinned_version(cpu["torch"]).public, "the same torch release as CI, another build"
    cuda = _image(cfg)["platform"]
    assert cuda.startswith("cu"), "an explicit -cuXYZ image: -gpu aliases whichever CUDA Ray chose"
    assert torch.local == vision.local == cuda, f"torch +{torch.local}, torchvision +{vision.local}, image -{cuda}"
    # torchvision 0.(N+15) is built against torch 2.N (PyPI metadata: torchvision 0.28.0 requires torch==2.13.0,
    # 0.29.0 requires torch==2.14.0); another pairing makes pip replace the CUDA torch or fail.
    assert (torch.major, vision.major, vision.minor) == (2, 0, torch.minor + 15)
    (install,) = [c for c in cfg["setup_commands"] if _pip_install_argvs(c)]
    assert f"--extra-index-url https://download.pytorch.org/whl/{cuda}" in install


def test_image_python_satisfies_requires_python():
    tag = _image(_cluster())
    python = f"{tag['py'][0]}.{tag['py'][1:]}"
    assert SpecifierSet(_requires_python()).contains(python), f"image Python {python} vs {_requires_python()}"


def test_image_ray_is_the_pinned_ray():
    ray_version = _image(_cluster())["ray"]
    assert str(_pinned_version(_pins(GPU_CONSTRAINTS)["ray"])) == ray_version, "pip would replace the image's Ray"
    import ray

    assert ray.__version__ == ray_version, "the cluster launcher and job client here are another Ray"


def test_nodes_run_the_gpu_image_with_a_driver_and_fail_without_gpus():
    cfg = _cluster()
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    for name, node_type in cfg["available_node_types"].items():
        # Ray's default AMI (no ImageId / latest_dlami) is the end-of-life Ubuntu 18.04 DLAMI V71.0.
        assert node_type["node_config"].get("ImageId", "latest_dlami") != "latest_dlami", name
        assert "docker" not in node_type, f"{name}: one image for all nodes"
    assert any("torch.cuda.is_available()" in c for c in cfg["worker_setup_commands"])


# --- security ----------------------------------------------------------------------------------------------------


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


@pytest.fixture
def ray_aws_config(monkeypatch):
    """Ray's AWS bootstrap module. It imports boto3, which `ray up` needs on the launching machine but the test
    environment may lack: then boto3 is stood in for by empty modules (nothing here calls AWS), and the modules
    imported against them are dropped afterwards."""
    import ray.autoscaler._private as private

    try:
        import boto3  # noqa: F401
    except ImportError:
        stubs = {
            "boto3": [],
            "boto3.exceptions": ["ResourceNotExistsError"],
            "boto3.resources": [],
            "boto3.resources.base": ["ServiceResource"],
            "botocore": [],
            "botocore.client": ["BaseClient"],
            "botocore.config": ["Config"],
        }
        for name, classes in stubs.items():
            module = types.ModuleType(name)
            module.__version__ = "1.40.0"  # Ray asserts boto3 >= 1.4.8 at import
            for cls in classes:
                setattr(module, cls, type(cls, (Exception,), {}))
            monkeypatch.setitem(sys.modules, name, module)
    before = set(sys.modules)
    had_aws = hasattr(private, "aws")
    from ray.autoscaler._private.aws import config

    yield config
    for name in set(sys.modules) - before:
        if name.startswith("ray.autoscaler._private.aws"):
            del sys.modules[name]
    if not had_aws and hasattr(private, "aws"):
        delattr(private, "aws")


def test_ray_never_creates_its_world_open_security_group(ray_aws_config, monkeypatch):
    """Ray's default group admits SSH from 0.0.0.0/0 (rules in provider.security_group are only added to it): every
    node type names an existing group instead, and Ray's security-group step then leaves the config alone."""
    cfg = _cluster()
    assert "security_group" not in cfg["provider"]
    for name, node_type in cfg["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(g.startswith("sg-") for g in groups), f"{name}: no SecurityGroupIds"

    def create(*_args, **_kwargs):
        raise AssertionError("Ray would create its default security group")

    monkeypatch.setattr(ray_aws_config, "_upsert_security_groups", create)
    monkeypatch.setattr(ray_aws_config, "_set_config_info", lambda **_kwargs: None)
    before = copy.deepcopy(cfg)
    assert ray_aws_config._configure_security_group(cfg) == before
    # ...whereas without SecurityGroupIds Ray would go on to create (and open) its own group.
    del cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["SecurityGroupIds"]
    with pytest.raises(AssertionError, match="default security group"):
        ray_aws_config._configure_security_group(cfg)


def test_no_ingress_from_the_world():
    for node in _walk(_cluster()):
        if isinstance(node, dict):
            assert node.get("CidrIp") not in WORLD and node.get("CidrIpv6") not in WORLD, node
    with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as fh:
        rules = [line for line in fh if "authorize-security-group-ingress" in line]
    assert rules, "docs/operations.md shows how to create the security group"
    assert not [r for r in rules if any(w in r for w in WORLD)]
    (ssh,) = [r for r in rules if "--port 22" in r]
    assert '--cidr "$ADMIN_CIDR"' in ssh
    assert all("--port 22" in r or "--source-group" in r for r in rules), "other ports only from the group itself"


def test_dashboard_and_servers_bind_privately():
    cfg = _cluster()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmd in _commands(cfg):
        assert "0.0.0.0" not in cmd and "--host ::" not in cmd, f"nothing listens on all interfaces: {cmd!r}"
    server = _command_with(cfg, "mlflow server", "head_start_ray_commands")
    assert '--host "$ODEDIT_HEAD_IP"' in server, "MLflow on the head's private address"


def test_ray_token_auth_on_every_node_and_process():
    cfg = _cluster()
    env_cmd = _command_with(cfg, "> ~/.odedit_env", "setup_commands")
    assert "RAY_AUTH_MODE=token" in env_cmd and "RAY_AUTH_TOKEN_PATH=%s" in env_cmd
    assert '"$HOME/.odedit-secrets/ray_auth_token"' in env_cmd
    for name in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[name] if "ray start" in c]
        assert start.startswith(". ~/.odedit_env && "), f"{name}: ray start without the token environment"
    assert cfg["file_mounts"]["~/.odedit-secrets"] == "./.secrets"
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as fh:
        assert ".secrets/" in fh.read().split(), "the project mount (rsync_filter .gitignore) must skip .secrets"


def test_secrets_are_owner_only_and_not_on_shared_storage(tmp_path):
    cfg = _cluster()
    for target in cfg["file_mounts"]:
        assert not target.startswith("/mnt/shared"), target
    secrets_dir = tmp_path / ".odedit-secrets"
    secrets_dir.mkdir(mode=0o755)
    for name in ("ray_auth_token", "mlflow_credentials"):
        (secrets_dir / name).write_text("x\n")
        (secrets_dir / name).chmod(0o644)  # as rsync brings a file created without umask 077
    commands = [c for c in cfg["setup_commands"] if ".odedit-secrets" in c and "odedit_env" not in c]
    assert len(commands) == 2
    for _ in range(2):
        for cmd in commands:
            result = _run(cmd, tmp_path)
            assert result.returncode == 0, result.stderr
    assert _mode(secrets_dir) == 0o700
    assert _mode(secrets_dir / "ray_auth_token") == 0o600
    assert _mode(secrets_dir / "mlflow_credentials") == 0o600
    assert _mode(tmp_path / ".mlflow") == 0o700 and _mode(tmp_path / ".mlflow" / "credentials") == 0o600


def _credentials(home, password):
    (home / ".mlflow").mkdir(mode=0o700, exist_ok=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = odedit\nmlflow_tracking_password = {password}\n"
    )


def _mlflow_read_auth_config():
    """MLflow's own reader of basic_auth.ini. Loaded from its file: the package `mlflow.server.auth` imports
    Flask-WTF, which only the head installs (mlflow[auth])."""
    import mlflow

    path = os.path.join(os.path.dirname(mlflow.__file__), "server", "auth", "config.py")
    spec = importlib.util.spec_from_file_location("_mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_auth_config


def test_mlflow_requires_a_login_from_the_local_credentials(tmp_path, monkeypatch):
    read_auth_config = _mlflow_read_auth_config()
    cfg = _cluster()
    server = _command_with(cfg, "mlflow server", "head_start_ray_commands")
    assert "--app-name basic-auth" in server
    assert 'MLFLOW_AUTH_CONFIG_PATH="$HOME/.mlflow/basic_auth.ini"' in server
    assert 'MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat ~/.mlflow/flask_secret_key)"' in server
    (auth_install,) = [c for c in cfg["head_setup_commands"] if "mlflow[auth]" in c]
    assert "Flask-WTF==" in auth_install  # basic-auth imports flask_wtf (mlflow's `auth` extra)

    generate = _command_with(cfg, "admin_password", "head_start_ray_commands")
    password = "correct-horse-battery-staple"
    _credentials(tmp_path, password)
    (tmp_path / ".mlflow" / "basic_auth.db").write_text("stale user store")
    results = [_run(generate, tmp_path) for _ in range(2)]
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    ini = tmp_path / ".mlflow" / "basic_auth.ini"
    key = (tmp_path / ".mlflow" / "flask_secret_key").read_text()
    assert _run(generate, tmp_path).returncode == 0 and (tmp_path / ".mlflow" / "flask_secret_key").read_text() == key
    assert _mode(ini) == 0o600 and _mode(tmp_path / ".mlflow" / "flask_secret_key") == 0o600 and len(key) >= 32
    assert not (tmp_path / ".mlflow" / "basic_auth.db").exists(), "the user store is rebuilt from the credentials"

    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    auth = read_auth_config()  # MLflow's own reader
    assert (auth.admin_username, auth.admin_password) == ("odedit", password)
    assert auth.default_permission == "NO_PERMISSIONS"
    assert auth.database_uri == f"sqlite:///{tmp_path}/.mlflow/basic_auth.db", "the head's local disk"

    _credentials(tmp_path, "short")
    assert _run(generate, tmp_path).returncode != 0, "a weak password stops the head, not the login"


def test_efs_is_mounted_over_tls():
    cfg = _cluster()
    mounts = []
    for cmd in _commands(cfg):
        for words in _simple_commands(cmd):
            if "mount" in words:
                argv = words[words.index("mount") + 1 :]
                mounts.append((cmd, argv))
    assert mounts, "shared storage is mounted"
    for cmd, argv in mounts:
        assert argv[argv.index("-t") + 1] == "efs", f"{cmd!r}: mount through amazon-efs-utils"
        assert "tls" in argv[argv.index("-o") + 1].split(","), f"{cmd!r}: EFS without TLS"
        assert f"mountpoint -q {argv[-1]} ||" in cmd, f"{cmd!r}: mounts again on every setup"
        assert cmd in cfg["initialization_commands"], "mounted on the host, before the container starts"
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]


def test_setup_commands_are_idempotent(tmp_path):
    cfg = _cluster()
    for cmd in _commands(cfg):
        for target in re.findall(r">>\s*(\S+)", cmd):
            guard = rf"grep -q\w*\s+(?:'[^']*'|\"[^\"]*\"|\S+)\s+{re.escape(target)}(\s+2>/dev/null)?\s*\|\|"
            assert re.search(guard, cmd), f"{cmd!r}: appends to {target} on every run"
        if "git clone" in cmd or "build-deb" in cmd:
            assert re.match(r"command -v \S+ >/dev/null 2>&1 \|\|", cmd), f"{cmd!r}: builds again on every run"
        assert "python -m venv" not in cmd or "test -x" in cmd, cmd

    # The environment file and the login shell hook, run twice as on a worker and once as on the head.
    env_cmd = _command_with(cfg, "> ~/.odedit_env", "setup_commands")
    hook = _command_with(cfg, ">> ~/.bashrc", "setup_commands")
    (tmp_path / ".bashrc").write_text("# the image's own\n")
    for _ in range(2):
        for cmd in (env_cmd, hook):
            result = _run(cmd, tmp_path, RAY_HEAD_IP="10.0.0.7")
            assert result.returncode == 0, result.stderr
    assert (tmp_path / ".bashrc").read_text() == "# the image's own\n. ~/.odedit_env\n"
    env = (tmp_path / ".odedit_env").read_text()
    assert env == (
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={tmp_path}/.odedit-secrets/ray_auth_token "
        "ODEDIT_HEAD_IP=10.0.0.7 MLFLOW_TRACKING_URI=http://10.0.0.7:5000 ODEDIT_STORAGE_ROOT=/mnt/shared/odedit\n"
    )
    assert _mode(tmp_path / ".odedit_env") == 0o600
    head = _run(env_cmd, tmp_path)  # no RAY_HEAD_IP: the head's own address, from Ray
    assert head.returncode == 0, head.stderr
    assert re.search(r"ODEDIT_HEAD_IP=(\d+\.){3}\d+ ", (tmp_path / ".odedit_env").read_text())


# --- the package indexes (slow; skipped where an index cannot be reached) -------------------------------------


def _pip_dry_run(tmp_path, python, index, args):
    """`pip install --dry-run --no-deps` of `args` for Linux x86_64 CPython `python`, this machine's pip
    configuration left out; returns the pip report (name -> metadata) or fails with pip's output."""
    tag = python.replace(".", "")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any"]
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    cmd += ["--index-url", index, "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}"]
    cmd += [arg for p in platforms for arg in ("--platform", p)]
    cmd += ["--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"), "--quiet", *args]
    if os.environ.get("PIP_CERT"):
        cmd[4:4] = ["--cert", os.environ["PIP_CERT"]]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "report.json", encoding="utf-8") as fh:
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.load(fh)["install"]}


@pytest.mark.slow
def test_cpu_pins_exist_for_the_image_python(tmp_path):
    """Every pin of ci/constraints.txt (so every non-torch pin of constraints-gpu.txt) has a release for the image's
    CPython on Linux x86_64 on PyPI: a pin needing another Python fails here, as on the nodes."""
    if not _reachable("pypi.org"):
        pytest.skip("PyPI cannot be reached")
    tag = _image(_cluster())["py"]
    report = _pip_dry_run(tmp_path, f"{tag[0]}.{tag[1:]}", "https://pypi.org/simple", ["-r", CPU_CONSTRAINTS])
    for name, req in _pins(CPU_CONSTRAINTS).items():
        assert Version(report[name]["version"]) == _pinned_version(req), name


@pytest.mark.slow
def test_torchvision_pin_requires_the_pinned_torch(tmp_path):
    if not _reachable("pypi.org"):
        pytest.skip("PyPI cannot be reached")
    gpu = _pins(GPU_CONSTRAINTS)
    torch, vision = _pinned_version(gpu["torch"]), _pinned_version(gpu["torchvision"])
    tag = _image(_cluster())["py"]
    report = _pip_dry_run(tmp_path, f"{tag[0]}.{tag[1:]}", "https://pypi.org/simple", [f"torchvision=={vision.public}"])
    requires = [Requirement(r) for r in report["torchvision"].get("requires_dist", [])]
    (torch_req,) = [r for r in requires if canonicalize_name(r.name) == "torch"]
    assert torch_req.specifier.contains(torch.public), f"torchvision {vision.public} requires {torch_req}"


@pytest.mark.slow
def test_cuda_torch_pins_exist_on_the_pytorch_index():
    """The +cuXYZ builds are on the PyTorch index only (its simple page for each package, one request each)."""
    if not _reachable("download.pytorch.org"):
        pytest.skip("download.pytorch.org cannot be reached")
    cfg = _cluster()
    cuda, tag = _image(cfg)["platform"], _image(cfg)["py"]
    gpu = _pins(GPU_CONSTRAINTS)
    for name in sorted(TORCH_FAMILY & set(gpu)):
        with urllib.request.urlopen(f"https://download.pytorch.org/whl/{cuda}/{name}/", timeout=60) as page:
            files = {urllib.parse.unquote(f) for f in re.findall(r">([^<>]+\.whl)<", page.read().decode())}
        wheel = f"{name}-{_pinned_version(gpu[name])}-cp{tag}-cp{tag}-"
        assert any(f.startswith(wheel) and f.endswith("x86_64.whl") for f in files), f"no {wheel}*x86_64.whl"
