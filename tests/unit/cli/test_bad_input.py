"""Bad input to `mmray train`/`tune`/`validate`: exit 2, one message naming the key/file/row, Ray never
started and nothing written. Each test stops before Ray: `fit` and `run_sweep` are replaced by a tripwire."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import HANG_S, fails, job_file, written

from mmray.cli.main import main

REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("no_ray")


@pytest.fixture()
def job(data_dir, tmp_path) -> Path:
    return job_file(data_dir, tmp_path, workers=1)


# ------------------------------------------------------------------ files that are not YAML text
@pytest.mark.parametrize("verb", ["train", "validate", "tune"])
def test_a_binary_job_file_is_not_a_yaml_text_file(verb, tmp_path, capsys):
    binary = tmp_path / "job.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    extra = ["--space", str(REPO / "search_spaces" / "quick.yaml")] if verb == "tune" else []
    err = fails(capsys, verb, str(binary), *extra)
    assert f"{binary}: not a YAML text file" in err and "UnicodeDecodeError" not in err
    assert written(tmp_path) == []


def test_a_binary_space_file_is_not_a_yaml_text_file(job, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"parameters:\n  \xff\xfe\x00")
    err = fails(capsys, "tune", str(job), "--space", str(space))
    assert f"{space}: not a YAML text file" in err
    assert written(tmp_path) == []


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", ".inf"])
def test_non_finite_learning_rate_exits_2_naming_the_key(job, tmp_path, capsys, value):
    err = fails(capsys, "train", str(job), "--set", f"train.optimizer.lr={value}")
    assert "train.optimizer.lr:" in err and "finite numbers only" in err
    assert written(tmp_path) == []


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", "", "/abs"])
def test_a_run_name_is_one_path_component(job, tmp_path, capsys, name):
    err = fails(capsys, "train", str(job), "--name", name)
    assert f"--name: {name!r} is not a run name: a run or sweep name is one path component" in err
    assert written(tmp_path) == [] and not (tmp_path / "elsewhere").exists()


def test_a_sweep_name_is_one_path_component(job, tmp_path, capsys):
    err = fails(capsys, "tune", str(job), "--space", str(REPO / "search_spaces" / "quick.yaml"), "--name", "../x")
    assert "--name: '../x' is not a run name" in err
    assert written(tmp_path) == [] and not (tmp_path / "x").exists()


def test_the_jobs_name_key_is_one_path_component_too(job, tmp_path, capsys):
    err = fails(capsys, "train", str(job), "--set", "name=../up")
    assert "name: '../up' is not a run name" in err
    assert written(tmp_path) == []


def test_setting_the_jobs_name_keeps_the_job(job, tmp_path, capsys):
    assert main(["render-config", str(job), "--set", "name=tiny2"]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert rendered["name"] == "tiny2"
    assert rendered["train"]["optimizer"]["lr"] == 3e-3 and rendered["model"]["fusion"]["hidden_dim"] == 128


# ------------------------------------------------------------------ files the model reads
@pytest.mark.parametrize("verb", ["train", "tune", "validate"])
def test_missing_resnet_weights_exit_2_before_ray_naming_key_and_path(job, tmp_path, capsys, verb):
    weights = tmp_path / "no-such.pth"
    extra = ["--space", str(REPO / "search_spaces" / "quick.yaml")] if verb == "tune" else []
    err = fails(capsys, verb, str(job), *extra,
                "--set", "model.encoders.image={name: resnet18, weights: %s}" % weights)
    assert f"model.encoders.image.weights: {weights}: not found" in err
    assert written(tmp_path) == []


@pytest.mark.parametrize("modality,name", [("text", "hf_text"), ("audio", "hf_audio")])
def test_missing_hf_model_folder_exits_2_before_ray(job, tmp_path, capsys, modality, name):
    folder = tmp_path / "models" / "absent"
    err = fails(capsys, "train", str(job), "--set", f"model.encoders.{modality}={{name: {name}, path: {folder}}}")
    assert f"model.encoders.{modality}.path: {folder}: not found" in err
    assert "repo id" not in err.lower() and "repo_id" not in err
    assert written(tmp_path) == []


def test_a_relative_missing_hf_folder_says_not_found_not_a_repo_id_error(job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, "validate", str(job), "--set", "model.encoders.text={name: hf_text, path: models/absent}")
    assert "model.encoders.text.path: 'models/absent' not found locally" in err
    assert "repo id" not in err.lower()


def test_tokenizer_not_available_locally_exits_2_without_any_network_attempt(job, tmp_path):
    """HF_HUB_OFFLINE unset and an empty cache: the load is local-only, so no socket is ever opened."""
    code = (
        "import socket, sys\n"
        "attempts = []\n"
        "def refuse(*a, **k):\n"
        "    attempts.append(a[:2])\n"
        "    raise OSError('network refused by the test')\n"
        "socket.getaddrinfo = refuse\n"
        "socket.socket.connect = lambda self, *a: refuse(*a)\n"
        "socket.create_connection = refuse\n"
        "from mmray.cli.main import main\n"
        f"rc = main(['validate', {str(job)!r}, '--set', 'data.text.tokenizer=bert-base-uncased'])\n"
        "print('ATTEMPTS', len(attempts))\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MMRAY_HF_DOWNLOAD")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert "data.text.tokenizer: 'bert-base-uncased' not found locally" in proc.stderr
    assert "MMRAY_HF_DOWNLOAD=1" in proc.stderr
    assert "ATTEMPTS 0" in proc.stdout


# ------------------------------------------------------------------ sweep spaces
def test_a_run_time_only_space_key_is_refused_before_anything_is_written(job, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("num_samples: 2\nparameters:\n  scaling.num_workers: {choice: [1, 2]}\n")
    err = fails(capsys, "tune", str(job), "--space", str(space))
    assert "parameters.scaling.num_workers: trial resources come from the job's scaling section" in err
    assert written(tmp_path) == []
    assert main(["validate", str(job), "--space", str(space)]) == 2


# ------------------------------------------------------------------ damaged datasets
def _copy(data_dir: str, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    return out


def _job_on(job: Path, data: Path) -> Path:
    raw = yaml.safe_load(job.read_text())
    raw["data"]["path"] = str(data)
    job.write_text(yaml.safe_dump(raw))
    return job


def test_a_shard_with_string_labels_exits_2_naming_shard_and_column(job, data_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _copy(data_dir, tmp_path)
    shard = data / "train" / "part-00000.parquet"
    table = pq.read_table(shard)
    labels = pa.array([f"class-{v}" for v in table.column("label").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), shard)
    err = fails(capsys, "train", str(_job_on(job, data)))
    assert f"{shard}: column 'label' is string, expected int64" in err
    assert written(tmp_path) == []


def test_a_truncated_shard_exits_2_naming_it(job, data_dir, tmp_path, capsys):
    data = _copy(data_dir, tmp_path)
    shard = data / "val" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-64])
    err = fails(capsys, "train", str(_job_on(job, data)))
    assert f"{shard}: not a readable Parquet shard, truncated or damaged" in err
    assert written(tmp_path) == []


def test_a_missing_shard_exits_2_naming_it(job, data_dir, tmp_path, capsys):
    data = _copy(data_dir, tmp_path)
    shard = data / "train" / "part-00000.parquet"
    shard.unlink()
    err = fails(capsys, "train", str(_job_on(job, data)))
    assert f"{shard}: shard missing" in err
    assert written(tmp_path) == []


@pytest.mark.parametrize("split", ["val", "train"])
def test_an_empty_split_exits_2_saying_how_to_make_one(job, data_dir, tmp_path, capsys, split):
    import pyarrow.parquet as pq

    data = _copy(data_dir, tmp_path)
    for shard in (data / split).glob("*.parquet"):
        pq.write_table(pq.read_table(shard).slice(0, 0), shard)  # footers intact, 0 rows; dataset.json unchanged
    err = fails(capsys, "train", str(_job_on(job, data)))
    assert f"{split} split has 0 rows" in err and "mmray data prepare" in err
    assert written(tmp_path) == []


@pytest.mark.parametrize("value", ["soon", "5 minutes", "0s", "-3m", "1d"])
def test_a_bad_time_budget_exits_2_naming_the_flag_before_anything_is_written(job, tmp_path, capsys, value):
    err = fails(capsys, "tune", str(job), f"--time-budget={value}")
    assert err.startswith("mmray: --time-budget: ") and repr(value) in err
    assert written(tmp_path) == []


# ------------------------------------------------------------------ --finalists-cv where folds cannot run
@pytest.mark.parametrize("args,message", [
    (["--finalists-cv", "1"], "--finalists-cv: k-fold cross-validation needs at least 2 folds, got 1 (0 = off"),
    (["--finalists-cv", "-2"], "--finalists-cv: must be 0 (off) or at least 2 folds, got -2"),
    (["--finalists", "0", "--finalists-cv", "2"], "--finalists-cv: there are no finalists to cross-validate: "
                                                  "--finalists is 0; give --finalists 2 or more"),
    (["--finalists", "1", "--finalists-cv", "2"], "--finalists-cv: there are no finalists to cross-validate: "
                                                  "--finalists is 1"),
    (["--finalists-cv", "500"], "--finalists-cv: 500 folds need at least 500 rows of every class in train+val, "
                                "but class "),
    (["--finalists-cv", "2", "--set", "scaling.num_workers=2"],
     "--finalists-cv: cross-validation folds train as in-process trials (one worker, no GPU), but this job's "
     "trials run on a TorchTrainer (scaling.num_workers 2"),
    (["--finalists-cv", "2", "--set", 'data.decode_cache="off"'],
     "--finalists-cv: the folds are read from the decoded-input cache (a fold is a row subset of it, never "
     "decoded again), which this job cannot use: data.decode_cache is off"),
])
def test_cross_validation_that_cannot_run_exits_2_naming_the_flag_before_anything_is_written(job, tmp_path, capsys,
                                                                                              args, message):
    err = fails(capsys, "tune", str(job), *args)
    assert err.startswith("mmray: " + message), err
    assert written(tmp_path) == []


def test_cross_validation_asked_for_in_a_space_file_names_its_key(job, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"finalists": 2, "finalists_cv": 1,
                                     "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}))
    err = fails(capsys, "tune", str(job), "--space", str(space))
    assert "finalists_cv: k-fold cross-validation needs at least 2 folds, got 1" in err
    space.write_text(yaml.safe_dump({"finalists": 2, "finalists_cv": 500,
                                     "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}))
    err = fails(capsys, "tune", str(job), "--space", str(space))
    assert err.startswith("mmray: finalists_cv: 500 folds need at least 500 rows of every class"), err
    assert written(tmp_path) == []


def test_resume_takes_no_finalists_cv(job, tmp_path, capsys):
    err = fails(capsys, "tune", "--resume", str(tmp_path / "runs" / "x"), "--finalists-cv", "2")
    assert "--resume takes only EXPERIMENT_DIR" in err
