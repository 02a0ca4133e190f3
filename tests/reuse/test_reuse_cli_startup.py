"""Start-up of `lfm reuse merge`: only its own area's command module is imported."""

from __future__ import annotations

import platform
import subprocess
import sys

from conftest import cli_run


def _modules_after(argv: list[str]) -> list[str]:
    return cli_run(argv, ("lfm.cli.", "lfm.serve"))[1]


def test_reuse_merge_imports_only_the_reuse_commands():
    # lfm.cli.common: what every group shares (one-line errors, exit status 2); the catalogue:
    # the names of the groups
    assert _modules_after(["reuse", "merge", "--help"]) == [
        "lfm.cli.catalogue", "lfm.cli.common", "lfm.cli.reuse"
    ]  # fmt: skip
    # the top-level help lists every group from the catalogue, importing none of them
    assert _modules_after(["--help", "reuse"]) == ["lfm.cli.catalogue", "lfm.cli.common"]


def test_the_full_app_still_has_every_group():
    from lfm.cli import app
    from lfm.registry import AREAS

    groups = {g.name for g in app.registered_groups}
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(AREAS) <= groups and {"merge", "serve", "methods"} <= commands


def test_keep_freed_memory_takes_on_glibc():
    code = "from lfm.cli.reuse import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.strip() == str(glibc)
