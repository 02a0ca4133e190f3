"""`lfm edit`: the commands are thin over the API and print one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from lfm.cli.edit import app


def test_apply_without_a_request_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["apply", "no-such-model", "--out", str(tmp_path / "p.st")])
    assert (
        res.exit_code == 2 and "error:" in res.output and len(res.output.strip().splitlines()) == 1
    )


def test_unknown_method_is_refused(tmp_path):
    args = ["apply", "m", "-m", "teleport", "--prompt", "A is", "--subject", "A", "--target", "B"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p.st")])
    assert res.exit_code == 2 and "no method 'edit/teleport'" in res.output


def test_patch_revert_needs_an_edited_folder(tmp_path):
    res = CliRunner().invoke(app, ["patch-revert", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "edit-undo.safetensors" in res.output
