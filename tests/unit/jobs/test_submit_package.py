"""What `mmray submit` sends: the command, checked here first, and a working dir without the heavy folders."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from mmray.cli.main import main
from mmray.config.errors import UserError
from mmray.jobs.submit import prepare as prepare_job

REPO = Path(__file__).resolve().parents[3]


def prepare(args, **kw):
    """What `mmray submit` does: the CLI's own parser reads the verb's arguments."""
    from mmray.cli.main import build_parser

    return prepare_job(args, parse=build_parser().parse_args, **kw)


def _project(root: Path) -> Path:
    for rel in ("jobs/quickstart.yaml", "search_spaces/quick.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text((REPO / rel).read_text())
    for rel in (".venv/lib/big.so", "data/synth/train/part-00000.parquet", "runs/old/checkpoint/model.pt",
                ".git/config", "mmray/data/pipeline.py", "mmray/__pycache__/x.pyc", "notes/readme.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


def _uploaded(spec) -> set[str]:
    """Exactly what Ray would zip and upload: its own packager run over the staged folder."""
    from ray._private.runtime_env.packaging import create_package

    from mmray.jobs.package import stage

    staged = stage(spec.package)
    try:
        zip_path = Path(staged + ".zip")
        create_package(staged, zip_path, include_gitignore=True)
        return {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    finally:
        __import__("shutil").rmtree(staged)
        Path(staged + ".zip").unlink(missing_ok=True)


def test_the_package_holds_job_and_code_files_but_no_venv_data_runs_or_git(tmp_path):
    root = _project(tmp_path / "proj")
    spec = prepare(["train", "jobs/quickstart.yaml", "--set", "data.path=/shared/synth", "--storage", "/shared/runs"],
                   working_dir=str(root))
    assert spec.entrypoint.startswith("mmray train jobs/quickstart.yaml --set data.path=/shared/synth")
    assert "working_dir" not in spec.runtime_env and spec.warnings == []
    names = _uploaded(spec)
    assert names == {rel for rel, _ in spec.package.files}
    assert {"jobs/quickstart.yaml", "search_spaces/quick.yaml", "mmray/data/pipeline.py", "notes/readme.md"} <= names
    assert not [n for n in names if n.startswith((".venv/", "data/", "runs/", ".git/")) or n.endswith(".pyc")]


SECRET_FILES = (".ray/auth_token", ".env", ".env.local", "id_rsa", "keys/id_ed25519.pub", ".netrc",
                "secrets/credentials.json", ".aws/credentials", ".ssh/config", "tls/server.pem", "tls/server.key",
                "sub/.aws/config", "private/notes.txt", "big.bin")


def test_secrets_and_gitignored_files_are_never_packaged_and_the_summary_says_so(tmp_path, capsys, monkeypatch):
    root = _project(tmp_path / "proj")
    for rel in SECRET_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("s3cr3t")
    (root / ".gitignore").write_text("private/\n*.bin\n")
    (root / "link.yaml").symlink_to(root / ".ray" / "auth_token")
    spec = prepare(["train", "jobs/quickstart.yaml", "--set", "data.path=/shared/synth", "--storage", "/shared/runs"],
                   working_dir=str(root))
    names = _uploaded(spec)
    assert names == {".gitignore", "jobs/quickstart.yaml", "search_spaces/quick.yaml", "mmray/data/pipeline.py",
                     "notes/readme.md"}
    summary = spec.package.summary()
    assert summary.startswith("5 files, ") and str(root) in summary
    assert "left out: 12 that may hold secrets, 2 ignored by .gitignore/.rayignore" in summary


def test_an_oversized_package_is_refused_with_its_size_and_how_to_leave_files_out(tmp_path, monkeypatch, capsys):
    from mmray.jobs import package

    root = _project(tmp_path / "proj")
    (root / "model.bin").write_bytes(b"\0" * 3 * 2**20)
    monkeypatch.setattr(package, "MAX_PACKAGE_BYTES", 2**20)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing there: must not be reached
    monkeypatch.chdir(root)
    assert main(["submit", "--", "train", "jobs/quickstart.yaml", "--set", "data.path=/shared/synth",
                 "--storage", "/shared/runs"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("mmray: the job package from") and "no Ray cluster" not in message
    assert "is 3.0 MiB" in message and "over the 1.0 MiB limit" in message and "model.bin (3.0 MiB)" in message
    assert ".rayignore" in message


class _Client:
    def __init__(self):
        self.sent = None

    def submit_job(self, **body):
        self.sent = body
        return "raysubmit_1"


def test_the_token_never_goes_into_the_job_spec(tmp_path):
    from mmray.jobs.address import Token
    from mmray.jobs.client import Cluster
    from mmray.jobs.submit import submit

    root = _project(tmp_path / "proj")
    cluster = Cluster(_Client(), "http://127.0.0.1:8265", Token("tok-123", "RAY_AUTH_TOKEN"), address_given=False)
    spec = prepare(["train", "jobs/quickstart.yaml", "--set", "data.path=/shared/synth", "--storage", "/shared/runs"],
                   working_dir=str(root))
    assert submit(cluster, spec) == "raysubmit_1"
    assert "tok-123" not in __import__("json").dumps(cluster.client.sent)
    assert not Path(cluster.client.sent["runtime_env"]["working_dir"]).exists()  # the staged copy is gone
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN would be stored in the job spec"):
        prepare(["train", "jobs/quickstart.yaml"], working_dir=str(root), env={"RAY_AUTH_TOKEN": "tok-123"})
    leaky = prepare(["train", "jobs/quickstart.yaml", "--name", "tok-123", "--set", "data.path=/shared/synth",
                     "--storage", "/shared/runs"], working_dir=str(root))
    with pytest.raises(UserError, match="auth token appears in the job spec"):
        submit(Cluster(_Client(), "u", Token("tok-123", "x"), address_given=False), leaky)


def test_a_token_over_plain_http_off_this_machine_is_warned_about_with_how_to_tunnel():
    from mmray.jobs.address import plain_http_warning

    assert plain_http_warning("http://127.0.0.1:8265") is None and plain_http_warning("https://10.0.0.5") is None
    message = plain_http_warning("http://10.0.0.5:8265")
    assert "plain HTTP" in message and "ray dashboard" in message and "kubectl port-forward" in message


def test_arguments_are_quoted_for_the_cluster_shell(tmp_path):
    root = _project(tmp_path)
    spec = prepare(["tune", "jobs/quickstart.yaml", "--space", "search_spaces/quick.yaml", "--set",
                    "data.path=/shared/my data", "--storage", "s3://b/runs;x", "--name", "a-b"], working_dir=str(root))
    assert "'data.path=/shared/my data'" in spec.entrypoint and "'s3://b/runs;x'" in spec.entrypoint
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
    (["tune", "jobs/quickstart.yaml", "--time-budget", "soon"], "--time-budget: expected a duration"),
    (["tune", "jobs/quickstart.yaml", "--finalists-cv", "1"], "--finalists-cv: k-fold cross-validation needs at "
                                                              "least 2 folds, got 1"),
    (["tune", "jobs/quickstart.yaml", "--finalists", "0", "--finalists-cv", "3"],
     "--finalists-cv: there are no finalists to cross-validate: --finalists is 0"),
    (["train", "jobs/quickstart.yaml", "--name", "../elsewhere"], "--name: '../elsewhere' is not a run name"),
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
