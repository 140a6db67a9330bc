"""Entry scripts' command lines (configs.cli.parse_cli): flags and key=value overrides in any
order, for plain parsers and subcommands alike; a stray argument is a one-line error, exit 2."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import compile as compile_script
import evaluate
import train
from configs.cli import is_override, parse_cli
from conftest import ROOT
from interop import hf as hf_cli


def exit_line(capsys, fn, *args) -> str:
    """Run `fn(*args)`, which must exit with code 2; returns its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("argv", [
    ["tiny", "--dry-run", "train.steps=3", "--devices", "8", "model.d_model=32"],
    ["tiny", "train.steps=3", "--dry-run", "model.d_model=32", "--devices", "8"],
    ["--dry-run", "--devices", "8", "tiny", "train.steps=3", "model.d_model=32"],
])
def test_train_flags_and_overrides_in_any_order(argv):
    args = train.parse_args(argv)
    assert (args.config, args.dry_run, args.devices) == ("tiny", True, 8)
    assert args.overrides == ["train.steps=3", "model.d_model=32"]


def test_compile_flag_then_overrides():
    args = compile_script.parse_args(["llama2-7b", "--topology", "v5p-8", "train.batch_size=16", "--serve",
                                      "data.seq_len=4096"])
    assert (args.config, args.topology, args.serve) == ("llama2-7b", "v5p-8", True)
    assert args.overrides == ["train.batch_size=16", "data.seq_len=4096"]


@pytest.mark.parametrize("command", ["classify", "lm", "choice"])
def test_evaluate_subcommands_flag_then_overrides(command):
    args = evaluate.parse_args([command, "ckpt", "rows.txt", "--out", "o", "model.attention_impl=xla",
                                "--batch-size", "4", "data.seq_len=64"])
    assert (args.command, args.checkpoint, args.data, args.out, args.batch_size) == (command, "ckpt", "rows.txt",
                                                                                     "o", 4)
    assert args.overrides == ["model.attention_impl=xla", "data.seq_len=64"]
    assert evaluate.parse_args([command, "ckpt", "rows.txt"]).overrides == []


@pytest.mark.parametrize("argv,want", [
    (["import", "hf", "run", "--quiet", "model.param_dtype=bfloat16"], ["model.param_dtype=bfloat16"]),
    (["export", "run", "out", "--dtype", "bfloat16", "mesh.fsdp=4", "--max-shard-size", "1GB", "mesh.tensor=2"],
     ["mesh.fsdp=4", "mesh.tensor=2"]),
    (["export", "run", "out", "mesh.fsdp=4", "--quiet"], ["mesh.fsdp=4"]),
])
def test_interop_hf_subcommands_flag_then_overrides(argv, want):
    args = parse_cli(hf_cli.build_parser(), argv)
    assert args.command == argv[0] and args.overrides == want
    if argv[0] == "export":
        assert args.out_dir == "out"


@pytest.mark.parametrize("fn,argv,named", [
    (train.parse_args, ["tiny", "--dry-run", "stray"], "'stray'"),
    (train.parse_args, ["tiny", "stray", "--dry-run"], "'stray'"),
    (train.parse_args, ["tiny", "--dry-run", "a=b", "--bogus"], "'--bogus'"),
    (train.parse_args, ["tiny", "=3"], "'=3'"),
    (compile_script.parse_args, ["tiny", "--topology", "v5p-8", "a=b", "stray"], "'stray'"),
    (evaluate.parse_args, ["lm", "ckpt", "data", "--out", "o", "stray"], "'stray'"),
    (evaluate.parse_args, ["lm", "ckpt", "data", "a=b", "--out", "o", "stray"], "'stray'"),
    (hf_cli.main, ["export", "run", "out", "--dtype", "bfloat16", "stray"], "'stray'"),
])
def test_stray_argument_is_one_line_exit_2(capsys, fn, argv, named):
    assert named in exit_line(capsys, fn, argv)


def test_overrides_to_a_command_without_them(capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plain").add_argument("--n", type=int)
    with_overrides = sub.add_parser("configured")
    with_overrides.add_argument("overrides", nargs="*")
    with_overrides.add_argument("--n", type=int)
    assert parse_cli(parser, ["configured", "--n", "1", "a.b=2"]).overrides == ["a.b=2"]
    assert "takes no key=value overrides" in exit_line(capsys, parse_cli, parser, ["plain", "--n", "1", "a.b=2"])


def test_override_form():
    for good in ("train.steps=3", "serve.prefill_buckets=[16,32]", "data.path=a=b.txt", "x=", "a_b.c_d=-1"):
        assert is_override(good), good
    for bad in ("stray", "=3", "--a=b", ".a=b", "a..b=1", "a b=1", "1a=2"):
        assert not is_override(bad), bad


def test_entry_script_stray_argument_subprocess(tmp_path):
    """The real command line: one line on stderr, exit code 2, nothing else printed."""
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "choice", str(tmp_path), "q.jsonl",
                          "--out", str(tmp_path / "o"), "model.attention_impl=xla", "stray"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: unexpected argument 'stray': config overrides look like key=value (e.g. train.steps=100)"]
