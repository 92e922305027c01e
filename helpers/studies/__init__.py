"""Side studies: each answers one question on cached stages and publishes one table with its record.

This module holds what their command lines share: the options (``parser``), reading them (``parse``: torch's
threads, the params), the record beside a published table (``write_record``) and both at once (``publish_table``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import io, paths
from .. import params as params_mod


def parser(doc: str | None, *, threads: int | None = None) -> argparse.ArgumentParser:
    """A study's parser with the options they all take: ``--params``, ``--publish PROFILE``, ``--threads``."""
    found = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    found.add_argument("--params", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    found.add_argument("--publish", metavar="PROFILE", help="write the table to figures/PROFILE/")
    found.add_argument("--threads", type=int, default=threads, help="torch threads (two runs side by side: 1 each)")
    return found


def parse(found: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, params_mod.Params]:
    """The options, with torch's threads set (when given) and the params loaded, their data root resolved."""
    args = found.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args, params_mod.with_resolved_root(params_mod.load(Path(args.params)))


def shown_path(path: str | Path) -> Path:
    """``path`` as a record names it: relative to the repository when inside it."""
    given = Path(path).resolve()
    return given.relative_to(paths.REPO_ROOT) if given.is_relative_to(paths.REPO_ROOT) else given


def write_record(profile: str, stem: str, title: str, command: str, lines: list[str]) -> Path:
    """``figures/PROFILE/STEM_RECORD.md``: the commit and command that published the table, then ``lines``."""
    from ..runners.reproduce import git_commit

    record = [f"# {title}: record", "", f"- published at commit `{git_commit()}` by `{command}`", *lines]
    target = paths.published_dir(profile) / f"{stem}_RECORD.md"
    io.write_text(target, "\n".join(record) + "\n")
    return target


def publish_table(table, profile: str, notebook: str, name: str, title: str, command: str, lines: list[str]) -> Path:
    """``figures/PROFILE/NOTEBOOK_NAME.{csv,md}`` and its record ``NOTEBOOK_NAME_RECORD.md`` (``write_record``)."""
    from ..plotting import save_table

    csv = save_table(table, profile, notebook, name, published=True)
    write_record(profile, f"{notebook}_{name}", title, command, lines)
    return csv
