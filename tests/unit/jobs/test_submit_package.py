"""What `mmray submit` sends: the command, checked here first, and a working dir without the heavy folders."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from mmray.cli.main import build_parser, main
from mmray.config.errors import UserError
from mmray.jobs.submit import prepare as submit_prepare

REPO = Path(__file__).resolve().parents[3]


def prepare(args, **kw):
    """What `mmray submit` does: the library checks the command with the command line's own parser."""
    return submit_prepare(args, parse_args=build_parser().parse_args, **kw)


def _project(root: Path) -> Path:
    for rel in ("jobs/quickstart.yaml", "search_spaces/quick.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text((REPO / rel).read_text())
    for rel in (".venv/lib/big.so", "data/synth/train/part-00000.parquet", "runs/old/checkpoint/model.pt",
                ".git/config", "mmray/data/pipeline.py", "mmray/__pycache__/x.pyc", "notes/readme.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


def test_the_package_holds_job_and_code_files_but_no_venv_data_runs_or_git(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    root = _project(tmp_path / "proj")
    spec = prepare(["train", "jobs/quickstart.yaml", "--set", "data.path=/shared/synth", "--storage", "/shared/runs"],
                   working_dir=str(root))
    assert spec.entrypoint.startswith("mmray train jobs/quickstart.yaml --set data.path=/shared/synth")
    assert spec.runtime_env["working_dir"] == str(root) and spec.warnings == []
    zip_path = tmp_path / "pkg.zip"
    create_package(str(root), zip_path, include_gitignore=True, excludes=spec.runtime_env["excludes"])
    names = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert {"jobs/quickstart.yaml", "search_spaces/quick.yaml", "mmray/data/pipeline.py", "notes/readme.md"} <= names
    assert not [n for n in names if n.startswith((".venv/", "data/", "runs/", ".git/")) or n.endswith(".pyc")]


def test_arguments_are_quoted_for_the_cluster_shell(tmp_path):
    root = _project(tmp_path)
    spec = prepare(["tune", "jobs/quickstart.yaml", "--space", "search_spaces/quick.yaml", "--set",
                    "data.path=/shared/my data", "--storage", "s3://b/runs", "--name", "a;b"], working_dir=str(root))
    assert "'data.path=/shared/my data'" in spec.entrypoint and "'a;b'" in spec.entrypoint
    assert spec.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_paths_the_cluster_cannot_see_are_warned_about(tmp_path):
    spec = prepare(["train", "jobs/quickstart.yaml"], working_dir=str(_project(tmp_path)))
    joined = "\n".join(spec.warnings)
    assert "data.path data/synth is not uploaded" in joined
    assert "storage runs is relative" in joined


@pytest.mark.parametrize("args,message", [
    ([], "give the command to run after `--`"),
    (["evaluate", "x"], "got 'evaluate' (choose one of train, tune)"),
    (["train", "jobs/quickstart.yaml", "--set", "model.fusion.name=nope"], "model.fusion.name: 'nope'"),
    (["tune", "jobs/quickstart.yaml"], "give --space SPACE.yaml"),
])
def test_bad_commands_are_refused_before_anything_is_contacted(tmp_path, args, message):
    with pytest.raises(UserError, match=__import__("re").escape(message)):
        prepare(args, working_dir=str(_project(tmp_path)))


def test_cli_bad_verb_exits_2_without_a_cluster(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing there: must not be reached
    assert main(["submit", "--", "predict", "x"]) == 2
    assert "submit runs `mmray train` or `mmray tune`" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["submit", "jobs", "jobs list", "jobs status", "jobs logs", "jobs stop"])
def test_submit_and_jobs_help_ends_with_an_example(verb, capsys):
    from mmray.cli.main import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*verb.split(), "--help"])
    assert e.value.code == 0
    assert "example:\n  mmray " in capsys.readouterr().out
