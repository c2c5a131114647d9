"""The command line's own promises: flags that error messages recommend exist, shared options
are spelt and explained the same everywhere, ``--version`` and the embed flags work."""

from __future__ import annotations

import argparse
import ast
import json
import re
import socket
from importlib import metadata
from pathlib import Path

import pytest

from care_scale.cli import build_parser, main
from care_scale.cli import embed as embed_cli
from care_scale.exceptions import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "care_scale"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _parsers(parser: argparse.ArgumentParser, name: str = "") -> dict[str, argparse.ArgumentParser]:
    """``{"": top level, "embed": ..., "export patch-encoder": ...}`` for every (sub-)command."""
    out = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                out.update(_parsers(p, f"{name} {sub}".strip()))
    return out


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


COMMANDS = {name: _options(p) for name, p in _parsers(build_parser()).items()}


def _raised_flags() -> dict[str, set[str]]:
    """``{exception class name: flags}`` from the string literals (f-string parts included)
    of every ``raise SomeError(...)`` in care_scale/."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "?")
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    for flag in FLAG.findall(sub.value):
                        out.setdefault(name, set()).add(flag)
    return out


def test_the_scan_finds_the_flags_errors_recommend():
    flags = _raised_flags()
    assert "--mpp-override" in flags["MissingMPPError"]
    assert "--storage-option" in set().union(*flags.values())


def test_every_flag_an_error_recommends_exists_on_some_command():
    known = set().union(*(set(opts) for opts in COMMANDS.values()))
    missing = {(exc, flag) for exc, flags in _raised_flags().items() for flag in flags
               if flag not in known}
    assert not missing, f"error messages recommend flags no command has: {sorted(missing)}"


def test_missing_mpp_error_flags_exist_on_embed_and_inspect():
    # Both commands open slides, so both can print MissingMPPError.
    for flag in _raised_flags()["MissingMPPError"]:
        for command in ("embed", "inspect"):
            assert flag in COMMANDS[command], f"care-scale {command} has no {flag}"


def test_shared_options_have_one_spelling_and_help():
    for flag in ("--storage-option", "--mpp-override"):
        actions = [opts[flag] for opts in COMMANDS.values() if flag in opts]
        assert len(actions) >= 2, flag
        assert len({(a.dest, a.help, a.metavar, type(a)) for a in actions}) == 1, flag
    users = {name for name, opts in COMMANDS.items() if "--storage-option" in opts}
    assert users >= {"embed", "inspect", "sql", "tables", "export patch-encoder",
                     "export slide-encoder"}


def test_embed_help_lists_storage_option_and_mpp_override(capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--storage-option KEY=VALUE" in out and "--mpp-override MPP" in out
    # jobs/embed_cohort.py parses with the same arguments.
    job = _options(embed_cli.build_parser())
    assert {"--storage-option", "--mpp-override"} <= set(job)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"care-scale {metadata.version('care-scale')}"


def _embed_config(*argv: str):
    return embed_cli.config_from_args(embed_cli.build_parser().parse_args(list(argv)))


def test_embed_flags_map_to_config_fields(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("storage_options:\n  aws_region: us-east-1\n  aws_allow_http: 'false'\n")
    cfg = _embed_config(
        "s3://b/cohort/", "--warehouse", "s3://b/wh", "--config", str(job),
        "--mpp-override", "0.25", "--storage-option", "aws_allow_http=true",
        "--storage-option", "aws_endpoint_url=http://127.0.0.1:9000",
        "--set", "storage_options.aws_conditional_put=etag")
    assert cfg.mpp_override == 0.25
    assert cfg.storage_options == {
        "aws_region": "us-east-1",  # from the file
        "aws_allow_http": "true",  # the flag wins over the file
        "aws_endpoint_url": "http://127.0.0.1:9000",
        "aws_conditional_put": "etag",  # --set merges, not replaces
    }
    assert _embed_config("x", "--warehouse", "y").mpp_override is None
    assert _embed_config("x", "--warehouse", "y").precision == "fp32"
    assert _embed_config("x", "--warehouse", "y", "--precision", "int8").precision == "int8"


def test_bad_storage_option_does_not_echo_the_value():
    with pytest.raises(ConfigError) as info:
        _embed_config("x", "--warehouse", "y", "--storage-option",
                      "aws_secret_access_key:s3cr3t")
    assert "--storage-option 'aws_secret_access_key'" in str(info.value)
    assert "KEY=VALUE" in str(info.value) and "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError, match="mpp_override must be > 0"):
        _embed_config("x", "--warehouse", "y", "--mpp-override", "0")


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["models"]) == 141
    assert capsys.readouterr().err == ""


def test_store_errors_are_one_line_with_what_to_check(s3_server, s3_options, tmp_path,
                                                      capsys):
    """A wrong warehouse bucket or endpoint: exit 2 and one line naming the table's URI and
    what to check (not a traceback of nested S3 errors), for embed, sql and tables."""
    from care_scale.synthetic import write_synthetic_slide

    write_synthetic_slide(tmp_path / "s.tiff", width=512, height=512, mpp=0.5, seed=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens here once the socket is closed
    good = [x for k, v in s3_options.items() if k != "aws_endpoint_url"
            for x in ("--storage-option", f"{k}={v}")]
    cases = [
        (["embed", str(tmp_path / "s.tiff"), "--warehouse", "s3://no-such-bucket-x/wh"],
         s3_server, "the bucket does not exist"),
        (["sql", "SELECT 1", "--warehouse", "s3://no-such-bucket-x/wh"], s3_server,
         "the bucket does not exist"),
        (["tables", "history", "--table", "slides", "--warehouse", "s3://any-bucket/wh"],
         f"http://127.0.0.1:{closed}", "cannot connect to the store"),
    ]
    for args, endpoint, hint in cases:
        code = main([*args, *good, "--storage-option", f"aws_endpoint_url={endpoint}"])
        err = [ln for ln in capsys.readouterr().err.splitlines()
               if ln.startswith(("StorageError", "TableError", "Traceback"))]
        assert code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("StorageError: table ") and hint in err[0]
        assert "testing-secret" not in err[0]


def test_inspect_slide_backend_and_its_deprecated_alias(capsys):
    # `--backend` is the inference kind on embed; the slide reader of inspect is
    # --slide-backend, and the old spelling still works with a one-line note on stderr.
    parser = build_parser()
    assert parser.parse_args(["inspect", "s.svs"]).slide_backend == "auto"
    assert parser.parse_args(["inspect", "s.svs", "--slide-backend", "tifffile"]
                             ).slide_backend == "tifffile"
    assert capsys.readouterr().err == ""
    assert main(["inspect", "--demo", "--backend", "tifffile", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["backend"] == "tifffile"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "deprecated" in lines[0] and "--slide-backend" in lines[0]
    assert "--backend" in COMMANDS["embed"] and "--slide-backend" not in COMMANDS["embed"]


@pytest.mark.slow
def test_embed_console_is_our_lines_only(tmp_path):
    """A real `care-scale embed` in its own process (its own local Ray, warnings shown as
    the CLI shows them): the untrained warning once per model, as one line; no Ray lines."""
    import subprocess
    import sys

    import h5py
    import numpy as np

    src = tmp_path / "feats"
    src.mkdir()
    xs, ys = np.meshgrid(np.arange(5) * 224, np.arange(4) * 224)
    with h5py.File(src / "a.h5", "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(20, 192)).astype(np.float32)
        f["coords"] = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-m", "care_scale", "embed", str(src), "--features", "--warehouse",
         str(tmp_path / "wh"), "--set", "progress=log", "--set", "num_cpus=2"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    untrained = [ln for ln in lines if ln.startswith("UntrainedWeightsWarning: care_tiny:")]
    assert len(untrained) == 1, lines
    assert all(ln.startswith(("UntrainedWeightsWarning: ", "slides ")) for ln in lines), lines
    assert "UNTRAINED weights: care_tiny" in proc.stdout
