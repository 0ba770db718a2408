"""What every job entry point shares: argument parsing, help that explains the config, quiet logs.

    cfg = parse_job_args(__doc__, argv)       # --config <yaml> [key=value ...] --help --help-config [SECTION]
    parser = job_parser(__doc__)              # the same flags, for a job that adds its own (jobs.tune, jobs.results)
    cfg = load_job_config(args.config, args.overrides)

`--help` shows the job's purpose (the first paragraph of its module docstring), its arguments and the config
sections; `--help-config [SECTION]` prints every key of the typed config (`odedit.config`), or of one section
(`data`, `data.demo`, `method`: each editor's own keys too), with its type, default and help, and exits.

A config with mistakes prints every problem (dotted path, value, hint) and exits with status 2. A job's process
entry, `run(cli)`, makes its log quiet where it is not a terminal (`pipeline.reporting.progress.install_quiet_logs`):
progress as a line now and then instead of bar redraws, each repeated warning once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from odedit.config import Config, ConfigError, MethodConfig
from odedit.configlib import help_rows
from odedit.loading import load_config
from odedit.methods import METHODS
from pipeline.data.sources.base import check_source
from pipeline.reporting.progress import install_quiet_logs
from pipeline.storage.root import StorageError, check_writable, resolve_storage

HELP_WIDTH = 100


def load_job_config(path: str | None, overrides: Sequence[str], extra_checks: Sequence = ()) -> Config:
    """The config with every location resolved under the storage root; on a bad config or a location that
    would lose results, print all problems and exit 2 (before any work)."""
    try:
        cfg = resolve_storage(load_config(path, overrides, extra_checks=[check_source, *extra_checks]))
        check_writable(cfg)  # an unwritable output or checkpoint directory stops here (issue 19 item 8)
        return cfg
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_job_args(doc: str, argv: Sequence[str] | None = None) -> Config:
    """Parse `--config PATH [key=value ...]` (with `--help` and `--help-config`) for a job whose module
    docstring is `doc`; on a bad config print all problems and exit 2."""
    args = job_parser(doc).parse_args(argv)
    return load_job_config(args.config, args.overrides)


def job_parser(
    doc: str,
    config_help: str = "YAML config (see jobs/configs/)",
    overrides_help: str = "dotted overrides such as stream.batch_size=16",
) -> argparse.ArgumentParser:
    """The parser every config-driven job starts from: the job's purpose, `--config`, `overrides`,
    `--help-config [SECTION]`, and the config sections listed under `--help`."""
    prog = job_prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=purpose(doc),
        epilog=sections_epilog(prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--help-config",
        nargs="?",
        const="",
        metavar="SECTION",
        action=_HelpConfig,
        help="print every config key (or SECTION's: data, data.demo, method, ...) with its type, default and help",
    )
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


def purpose(doc: str | None) -> str:
    """The first paragraph of a module docstring, on one line."""
    text = textwrap.dedent(doc or "").strip()
    return " ".join(text.split("\n\n", 1)[0].split())


def job_prog() -> str:
    """How the job was started: `python -m jobs.<name>`, `odedit <name>`, else the script's name."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name.startswith("jobs.") and name != "jobs.cli":
        return f"python -m {name}"
    if (name == "jobs.cli" or script == "odedit") and len(sys.argv) > 1:
        return f"odedit {sys.argv[1]}"
    return script or "job"


# ---------------------------------------------------------------------------------------------- config help


def config_sections() -> list[tuple[str, str]]:
    """(section, one-line description) of every section of `Config`, then ("top level", its plain keys)."""
    hints = typing.get_type_hints(Config)
    out: list[tuple[str, str]] = []
    plain: list[str] = []
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            text = _first_line(tp.__doc__) or f.metadata.get("help", "")
            if tp is MethodConfig:
                text = f"The host editor: shared keys and each editor's own (method.name: {', '.join(METHODS.names())})"
            out.append((f.name, text))
        else:
            plain.append(f.name)
    out.append(("top level", ", ".join(plain)))
    return out


def sections_epilog(prog: str) -> str:
    rows = config_sections()
    width = max(len(name) for name, _ in rows)
    lines = [f"config sections ({prog} --help-config [SECTION] lists every key with its type, default and help):"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


def config_help(section: str = "") -> str:
    """Every key of the config (or of `section`, a section or any dotted prefix) with type, default and help.

    Raises:
        KeyError: `section` matches no key (the message lists the sections).
    """
    blocks: list[str] = []
    rows = [r for r in help_rows(Config) if not r[0].startswith("method.")]
    names = [name for name, _ in config_sections()]
    if not section or section == "method" or section.startswith("method."):
        blocks += _method_blocks(section)
    chosen = [r for r in rows if not section or r[0] == section or r[0].startswith(section + ".")]
    if not section:
        sections = [name for name in names if name not in ("method", "top level")]
        for name in sections:
            blocks.append(_block(name, [r for r in chosen if r[0].startswith(name + ".")]))
        blocks.append(_block("top level", [r for r in chosen if "." not in r[0]]))
    elif chosen:
        blocks.append(_block(section, chosen))
    if not blocks:
        sections = ", ".join(n for n in names if n != "top level")
        raise KeyError(f"no config key or section {section!r}; sections: {sections} (or a key such as seed)")
    return "\n\n".join(b for b in blocks if b)


def _method_blocks(section: str) -> list[str]:
    base = help_rows(MethodConfig, "method")
    base_keys = {r[0] for r in base}
    blocks = []
    if section in ("", "method") or section in base_keys:
        chosen = [r for r in base if not section or section == "method" or r[0] == section]
        blocks.append(_block("method", chosen, "every editor; method.name picks one: " + ", ".join(METHODS.names())))
    for name in METHODS.names():
        own = [r for r in help_rows(METHODS.get(name).config_cls, "method") if r[0] not in base_keys]
        if section in ("", "method", f"method.{name}"):
            blocks.append(_block(f"method.name={name}", own, "adds"))
        elif section in {r[0] for r in own}:
            blocks.append(_block(f"method.name={name}", [r for r in own if r[0] == section], "adds"))
    return blocks


def _block(title: str, rows: Sequence[tuple[str, str, str, str]], note: str = "") -> str:
    if not rows:
        return ""
    lines = [f"{title}:" + (f"  ({note})" if note else "")]
    for key, tp, default, text in rows:
        lines.append(f"  {key}: {tp} = {default}")
        lines += textwrap.wrap(text, HELP_WIDTH, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _first_line(doc: str | None) -> str:
    text = " ".join((doc or "").strip().split("\n\n", 1)[0].split())
    return text.split(". ", 1)[0].rstrip(".")


class _HelpConfig(argparse.Action):
    """`--help-config [SECTION]`: print the config keys and exit (before `--config` is required)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            text = config_help(values or "")
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        print(text)
        parser.exit(0)


# ---------------------------------------------------------------------------------------------- results


def print_locations(cfg: Config, summary_path: str) -> None:
    """Where the results are, as absolute locations a user can open from the submitting side's shared mount."""
    from pipeline.reporting.tracking import tracking_uri  # deferred: keeps mlflow's import chain off --help

    print(f"summary:   {os.path.abspath(summary_path)}")
    storage = cfg.stream.storage_path or os.path.join(cfg.output_dir, "storage")
    print(f"results:   {storage}/<run>/results/ (rows.parquet, curve.json, plots)")
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg)
        print(f"MLflow:    {uri}")
        print(f"open it:   mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """Around a job's work: input data that cannot make a stream (`pipeline.prepare.DataError`: no records,
    none kept, an unreadable records file, a model path that is not there) is one `error:` line and exit 2,
    not a traceback (issue 19 item 16)."""
    try:
        yield
    except Exception as err:
        # deferred: pulls in Ray, torch and transformers; imported only once something failed (`--help` needs none)
        from pipeline.prepare import DataError

        if not isinstance(err, DataError):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cli: Callable[[], int]) -> NoReturn:
    """A job's process entry (`if __name__ == "__main__": run(cli)`): each repeated warning once and, off a
    terminal, progress as occasional lines; then the job, whose status is the process's exit status."""
    install_quiet_logs()
    with storage_errors(), data_errors():  # every job: bad storage or input data is one error line, exit 2
        code = cli()
    sys.exit(code)


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Around a job: storage that refuses the job's writes (`StorageError`; during a stream,
    `pipeline.train.storagefail.StorageWriteError`: permission, read-only, full disk) is one `error:` line with
    the fix and exit 2, not a traceback (issue 19 item 8)."""
    try:
        yield
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
