"""Storage helpers on a local folder and on a real S3 API (moto on loopback); the start-up checks."""
from __future__ import annotations

import os
import shutil

import pytest
from storage_fixtures import read_only_dir, s3_bucket  # noqa: F401  (fixtures)

from mmray import storage
from mmray.config.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + f"/{request.node.name.split('[')[0]}"


def test_paths_join_and_split_the_same_way_for_folders_and_uris():
    assert storage.join("s3://b/runs", "x", "export") == "s3://b/runs/x/export"
    assert storage.split("s3://b/runs/x/") == ("s3://b/runs", "x")
    assert storage.split("/a/b") == ("/a", "b")
    assert storage.normalize("file:///tmp/x") == "/tmp/x" and not storage.is_uri("file:///tmp/x")
    assert storage.normalize("runs") == os.path.abspath("runs")


def test_write_read_list_remove(root):
    storage.write_text(storage.join(root, "a", "one.txt"), "hello")
    storage.write_bytes(storage.join(root, "a", "two.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a", "one.txt")) == "hello"
    assert storage.listdir(storage.join(root, "a")) == ["one.txt", "two.bin"]
    assert storage.is_dir(storage.join(root, "a")) and storage.is_file(storage.join(root, "a", "one.txt"))
    assert storage.listdir(storage.join(root, "missing")) == [] and not storage.exists(storage.join(root, "missing"))
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "one.txt"))


def test_upload_then_download_round_trips_a_folder(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(3000))
    (src / "sub" / "t.txt").write_text("x")
    storage.upload(str(src), storage.join(root, "copy"))
    with storage.local_copy(storage.join(root, "copy")) as local:
        assert (open(os.path.join(local, "w.bin"), "rb").read() == (src / "w.bin").read_bytes())
        assert open(os.path.join(local, "sub", "t.txt")).read() == "x"


def test_a_tree_downloads_without_the_contents_of_left_out_folders(root, tmp_path):
    src = tmp_path / "exp"
    (src / "trial_a" / "checkpoint_000001").mkdir(parents=True)
    (src / "trial_a" / "checkpoint_000001" / "model.safetensors").write_bytes(os.urandom(5000))
    (src / "trial_a" / "result.json").write_text("{}")
    (src / "checkpoint_manager_snapshot.json").write_text("[]")  # a file, not a folder: copied
    storage.upload(str(src), storage.join(root, "exp"))
    local = storage.download_tree(storage.join(root, "exp"), str(tmp_path / "copy"),
                                  leave_out=lambda name: name.startswith("checkpoint_"))
    assert open(os.path.join(local, "trial_a", "result.json")).read() == "{}"
    assert os.path.isfile(os.path.join(local, "checkpoint_manager_snapshot.json"))
    assert os.listdir(os.path.join(local, "trial_a", "checkpoint_000001")) == []  # named, empty
    with pytest.raises(UserError, match="no such folder"):
        storage.download_tree(storage.join(root, "nope"), str(tmp_path / "x"), leave_out=lambda n: False)


def test_staged_dir_uploads_what_changed_at_each_sync(root):
    staged = storage.StagedDir(storage.join(root, "run"))
    with open(staged.path("tensorboard", "events"), "w") as f:
        f.write("epoch 1\n")
    staged.sync()
    assert storage.read_text(storage.join(root, "run", "tensorboard", "events")) == "epoch 1\n"
    with open(staged.path("tensorboard", "events"), "a") as f:
        f.write("epoch 2\n")
    staged.close()
    assert storage.read_text(storage.join(root, "run", "tensorboard", "events")) == "epoch 1\nepoch 2\n"
    assert staged.remote == storage.is_uri(root) and (not staged.remote or not os.path.exists(staged.local))


def test_local_output_lands_at_the_uri(root):
    target = storage.join(root, "preds", "out.jsonl")
    with storage.local_output(target) as local:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        open(local, "w").write("{}\n")
    assert storage.read_text(target) == "{}\n"


def test_writable_storage_passes_the_check(root):
    storage.check_writable(root, min_free_bytes=1)
    assert storage.listdir(root) == []  # the probe is gone


def test_missing_bucket_fails_at_start_naming_the_flag(s3_bucket):
    with pytest.raises(UserError, match=r"--storage: cannot write to s3://no-such-bucket-mmray/runs"):
        storage.check_writable("s3://no-such-bucket-mmray/runs", min_free_bytes=1)


def test_read_only_storage_fails_at_start(read_only_dir):
    with pytest.raises(UserError, match=r"--storage: cannot write to .*/ro/runs.*choose a writable location"):
        storage.check_writable(os.path.join(read_only_dir, "runs"))


def test_a_nearly_full_disk_fails_at_start(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match=r"storage: .* has only .* GiB free \(at least .* GiB needed"):
        storage.check_writable(str(tmp_path), what="storage", min_free_bytes=free + (1 << 40))
