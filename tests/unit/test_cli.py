"""Command line: exit codes and the demo's output."""

from __future__ import annotations

import json

import pytest

from streamer.cli import EXIT_OK, EXIT_USAGE, main


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--entities", "0"])
    assert exc.value.code == EXIT_USAGE
    assert "positive integer" in capsys.readouterr().err


def test_bad_config_file_exits_2_and_names_the_field(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nhorizon = "three"\n')
    assert main(["--config", str(path), "demo"]) == EXIT_USAGE
    assert "model.horizon" in capsys.readouterr().err


def test_demo_streams_and_summarises(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text("[model]\nunits = [8]\n")
    assert (
        main(
            [
                "--config",
                str(path),
                "demo",
                "--in-process",
                "--entities",
                "5",
                "--steps",
                "20",
                "--json",
            ]
        )
        == EXIT_OK
    )
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["events"] == 100
    assert summary["steps_closed"] == 20
    assert summary["refused"] == 0 and summary["late"] == 0
    assert "SYN00000 next=" in out
