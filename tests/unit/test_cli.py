"""`etcd-rdzv`'s command line is careful with what it echoes: no abbreviated options, a
`--password` that is refused without showing it, unknown options named without their values,
and hints that name the command's own flags."""

from __future__ import annotations

import pytest

from etcd_rdzv.cli import main

SECRET = "AlicePw-TopSecret-42"
STATUS = ["status", "--endpoint", "127.0.0.1:1", "--run-id", "job"]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*STATUS, *argv])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    return captured.err


@pytest.mark.parametrize(
    "argv", [("--password", SECRET), (f"--password={SECRET}",), ("--password",)]
)
def test_password_on_the_command_line_is_refused_and_points_elsewhere(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    error = refused(capsys, *argv)
    assert "--password would show the password on the command line" in error
    assert "ETCD_RDZV_PASSWORD" in error and "--password-file PATH" in error


@pytest.mark.parametrize("option", ["--pass", "--password-f", "--passwd", "--user"])
def test_no_option_is_taken_by_an_abbreviation_and_none_is_echoed_with_its_value(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    error = refused(capsys, option, SECRET)
    assert f"unknown options {option}" in error, error
    assert "password_file" not in error  # not read as --password-file


def test_analyze_takes_no_abbreviation_either(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["analyze", "traces.jsonl", "--run", SECRET])
    assert SECRET not in capsys.readouterr().err


def test_status_names_its_own_flags_when_the_password_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ETCD_RDZV_PASSWORD", raising=False)
    assert main([*STATUS, "--username", "trainer"]) == 2
    error = capsys.readouterr().err
    assert "set ETCD_RDZV_PASSWORD, or name a file with --password-file PATH" in error, error
    assert "--rdzv-conf" not in error
    monkeypatch.setenv("ETCD_RDZV_PASSWORD", SECRET)
    assert main(STATUS) == 2
    error = capsys.readouterr().err
    assert "no user: add --username NAME" in error and SECRET not in error
    monkeypatch.delenv("ETCD_RDZV_PASSWORD")
    assert main([*STATUS, "--username", "trainer", "--password-file", "/no/such/file"]) == 2
    assert "--password-file /no/such/file: cannot read it" in capsys.readouterr().err
