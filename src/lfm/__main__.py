"""`python -m lfm` runs the CLI."""

from lfm.cli import run

run()
