"""`mmray data prepare`: a messy folder goes in, every fault is accounted for, no good row is lost."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prepare_media import DUPLICATE_OF, FAULTS, make_folder, write_manifest

from mmray.cli.main import build_parser, main
from mmray.config.errors import UserError
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.inspect import inspect_dataset
from mmray.data.manifest import ColumnMap
from mmray.data.prepare import prepare

COLUMNS = ColumnMap(media={"image": "img", "text": "caption", "audio": "sound"}, label="y")
CLI_COLUMNS = ["--image-col", "img", "--text-col", "caption", "--audio-col", "sound", "--label-col", "y"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mine"))
    made = make_folder(root)
    made["root"] = root
    made["manifests"] = {form: write_manifest(root, made["rows"], form) for form in ("csv", "jsonl", "parquet")}
    return made


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    """Each manifest form prepared once; Parquet through the worker pool, the others in-process."""
    out = {}
    for form, manifest in folder["manifests"].items():
        dest = str(tmp_path_factory.mktemp(form) / "ds")
        out[form] = prepare(manifest, dest, columns=COLUMNS, workers=2 if form == "parquet" else 1)
    return out


def _rows(info) -> dict[str, dict]:
    rows = {}
    for split in info.splits:
        for f in info.split_files(split):
            for r in pq.read_table(f).to_pylist():
                rows[r["id"]] = {**r, "_split": split}
    return rows


def _decisions(info) -> list[dict]:
    with open(os.path.join(info.path, "rejected.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("form", ["csv", "jsonl", "parquet"])
def test_every_fault_is_recorded_and_counts_add_up(folder, prepared, form):
    report = prepared[form]
    info = report.info
    decisions = _decisions(info)
    by_id: dict[str, list[dict]] = {}
    for d in decisions:
        assert set(d) == {"row", "id", "column", "reason", "detail", "outcome"}
        by_id.setdefault(d["id"], []).append(d)
    for rid, (field, reason, outcome) in FAULTS.items():
        assert any(d["reason"] == f"{field}: {reason}" and d["outcome"] == outcome for d in by_id[rid]), (rid, by_id.get(rid))
    dup = [d for d in by_id[DUPLICATE_OF] if d["reason"] == "id: duplicate id"]
    assert len(dup) == 1 and dup[0]["outcome"] == "rejected" and dup[0]["row"] == len(folder["rows"])
    assert next(d for d in by_id["f-missing-img"])["column"] == "img"
    # a row number points at the manifest row
    assert next(d for d in by_id["f-bad-label"])["row"] == 1 + [r["id"] for r in folder["rows"]].index("f-bad-label")

    n_faulty_rejected = sum(o == "rejected" for _, _, o in FAULTS.values()) + 1  # + the duplicate
    n_partly = sum(o == "missing" for _, _, o in FAULTS.values())
    assert report.rows_in == len(folder["rows"])
    assert report.rejected == n_faulty_rejected and report.partly_missing == n_partly
    assert report.kept + report.rejected == report.rows_in
    assert sum(report.rejected_by_reason.values()) == report.rejected
    assert sum(s.rows for s in info.splits.values()) == report.kept
    stored = read_dataset_info(info.path).rejected
    assert stored["rows"] == report.rejected and stored["rows_in"] == report.rows_in
    assert stored["by_reason"]["label: label is not an integer"] == 1
    assert stored["missing_by_reason"]["image: cannot decode image"] == 4


@pytest.mark.parametrize("form", ["csv", "jsonl", "parquet"])
def test_no_good_row_is_lost_and_bytes_are_the_files_own(folder, prepared, form):
    info = prepared[form].info
    rows = _rows(info)
    assert info.modalities == ("audio", "image", "text")
    assert info.class_names == tuple(str(i) for i in range(6))
    for rid, want in folder["good"].items():
        got = rows[rid]
        assert got["label"] == want["label"] and got["text"] == want["text"]
        assert got["audio"] == want["audio"]  # WAV and FLAC stored as the file's bytes
        if want["image_format"] == "bmp":  # not a stored format: re-encoded to PNG, same pixels
            assert got["image"][:4] == b"\x89PNG"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(got["image"]))),
                                  np.asarray(Image.open(io.BytesIO(want["image"]))))
        else:
            assert got["image"] == want["image"]
    partly = {rid: f for rid, (f, _, o) in FAULTS.items() if o == "missing"}
    for rid, modality in partly.items():
        assert rows[rid][modality] is None
        assert all(rows[rid][m] is not None for m in ("audio", "image", "text") if m != modality)
    for rid in (r for r, (_, _, o) in FAULTS.items() if o == "rejected"):
        assert rid not in rows
    assert len(rows) == len(folder["good"]) + len(partly)


def test_all_three_forms_and_pool_or_not_give_the_same_dataset(prepared):
    ref = _rows(prepared["csv"].info)
    for form in ("jsonl", "parquet"):
        assert _rows(prepared[form].info) == ref
        assert [(d["row"], d["reason"]) for d in _decisions(prepared[form].info)] == \
               [(d["row"], d["reason"]) for d in _decisions(prepared["csv"].info)]


def test_summary_and_inspect_show_the_counts(prepared):
    report = prepared["csv"]
    text = report.summary()
    assert f"rows in          {report.rows_in:>9,}" in text
    assert "image: cannot decode image" in text and "label: label is not an integer" in text
    shown = inspect_dataset(report.info.path)
    assert f"rejected rows: {report.rejected}" in shown
    assert "row: no usable modality" in shown and "text: empty text" in shown
    assert "sample rows:" in shown and "g-0" in shown


def test_string_labels_tasks_and_split_column(tmp_path):
    root = str(tmp_path)
    made = make_folder(root, good_rows=12)
    rows = [r for r in made["rows"] if r["id"].startswith("g-")][:12]
    for i, r in enumerate(rows):
        r["kind"] = ["owl", "cat", "bee"][i % 3]
        r["colour"] = ["red", "blue"][i % 2]
        r["part"] = ["train", "train", "val", "TEST"][i % 4]
    rows[5]["part"] = "holdout"
    manifest = write_manifest(root, rows, "jsonl")
    report = prepare(manifest, str(tmp_path / "ds"), workers=1, columns=ColumnMap(
        media={"image": "img", "audio": "sound"}, label="kind", split="part", tasks={"colour": "colour"}))
    info = report.info
    assert info.class_names == ("bee", "cat", "owl") and info.tasks["label_colour"] == ("blue", "red")
    assert info.modalities == ("audio", "image")
    assert report.rejected_by_reason == {"split: unknown split": 1}
    got = _rows(info)
    assert {r["_split"] for r in got.values()} == {"train", "val", "test"}
    for r in rows:
        if r["id"] in got:
            assert info.class_names[got[r["id"]]["label"]] == r["kind"]
            assert info.tasks["label_colour"][got[r["id"]]["label_colour"]] == r["colour"]
    assert "text" not in pq.read_schema(info.split_files("train")[0]).names
    assert info.tokenizer is None


# ------------------------------------------------------------------------------ CLI
def test_cli_prepares_and_prints_the_summary(folder, tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert main(["data", "prepare", folder["manifests"]["csv"], "--out", out, *CLI_COLUMNS, "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "rows in" in printed.out and "rejected rows by reason:" in printed.out
    assert "mmray prepare rows=" in printed.err  # not a terminal: parseable progress lines
    created = read_dataset_info(out).created
    assert created["source"] == folder["manifests"]["csv"] and created["columns"]["image"] == "img"


def test_strict_exits_2_naming_the_first_rows_and_writes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["data", "prepare", folder["manifests"]["csv"], "--out", str(out), *CLI_COLUMNS, "--strict",
               "--workers", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    first_fault = 1 + [r["id"] for r in folder["rows"]].index(next(iter(FAULTS)))
    assert "--strict" in err and f"row {first_fault} id 'f-trunc-png' column 'img': cannot decode image" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_strict_passes_a_clean_manifest(folder, tmp_path):
    clean = [r for r in folder["rows"] if r["id"].startswith("g-")][:10]
    manifest = write_manifest(str(tmp_path), clean, "csv")
    os.symlink(os.path.join(folder["root"], "media"), tmp_path / "media")
    assert main(["data", "prepare", manifest, "--out", str(tmp_path / "ds"), *CLI_COLUMNS, "--strict"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--image-col", "picture"], "--image-col: column 'picture' is not in the manifest"),
    (["--label-col", "nope"], "--label-col: column 'nope' is not in the manifest"),
    (["--task-col", "colour"], "--task-col: 'colour'; write NAME=COL"),
    (["--split-fractions", "0.5,0.5"], "--split-fractions: '0.5,0.5'"),
])
def test_bad_flags_exit_2_and_name_the_flag(folder, tmp_path, capsys, args, message):
    out = tmp_path / "ds"
    assert main(["data", "prepare", folder["manifests"]["csv"], "--out", str(out), *CLI_COLUMNS, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_a_folder_that_is_not_a_dataset(folder, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["data", "prepare", folder["manifests"]["csv"], "--out", str(tmp_path), *CLI_COLUMNS]) == 2
    assert "not a dataset directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_prepare_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["data", "prepare", "--help"])
    assert e.value.code == 0
    assert "example:\n  mmray data prepare " in capsys.readouterr().out


@pytest.mark.slow
def test_training_on_a_prepared_folder_learns(tmp_path):
    """The prepared dataset meets the same contract as synth: the shared loop trains on it unchanged.

    Labels are the pitch names ("high"/"low", string labels), which the audio tells: a short run must
    clear chance (1/2) by a wide margin.
    """
    from helpers import small_job

    from mmray.data.synth import PITCHES
    from mmray.train.local import train_local

    made = make_folder(str(tmp_path), good_rows=200, seed=5)
    for r in made["rows"]:  # in a column of names, "cat" would be a class of its own: leave it out
        r["y"] = PITCHES[r["y"] % 2] if isinstance(r["y"], int) else ""
    manifest = write_manifest(str(tmp_path), made["rows"], "parquet")
    report = prepare(manifest, str(tmp_path / "ds"), columns=COLUMNS, workers=2)
    assert report.info.class_names == ("high", "low") and report.info.splits["val"].rows >= 15
    config = small_job(report.info.path, epochs=3, workers=1, batch_size=16)
    state, _ = train_local(config, str(tmp_path / "run"))
    assert state.best_value > 0.75, state.history


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from mmray.data.prepare import PrepareProgress

    tty, log = io.StringIO(), io.StringIO()
    bar, lines = PrepareProgress(tty, tty=True), PrepareProgress(log, tty=False, every_s=0.0)
    for done in (64, 128, 200):
        bar(done, 200, done - 3, 3)
        lines(done, 200, done - 3, 3)
    assert "prepare" in tty.getvalue() and "200/200" in tty.getvalue() and "\r" in tty.getvalue()
    assert log.getvalue().splitlines()[-1].startswith("mmray prepare rows=200/200 kept=197 rejected=3 rows_per_s=")
    assert "\r" not in log.getvalue()


def test_text_only_jsonl_with_a_broken_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": f"t{i}", "text": f"note {i}", "label": i % 2}) for i in range(6)]
    lines.insert(2, "{oops")
    path.write_text("\n".join(lines) + "\n")
    report = prepare(str(path), str(tmp_path / "ds"), workers=1)
    assert (report.rows_in, report.kept, report.rejected) == (7, 6, 1)
    assert report.rejected_by_reason == {"row: unreadable row": 1}
    assert _decisions(report.info)[0]["row"] == 3 and report.info.modalities == ("text",)
    assert os.path.isfile(os.path.join(report.info.path, "tokenizer", "tokenizer.json"))
    again = prepare(str(path), str(tmp_path / "ds"), workers=1)  # an earlier dataset is replaced whole
    assert again.replaced and "replaced the old dataset" in again.summary()
    assert sorted(os.listdir(tmp_path)) == ["ds", "m.jsonl"]


# ------------------------------------------------------------------------------ the chunked (Ray) path
def in_process(fn, jobs, workers):
    """Runs the chunked path's tasks here, each job and result through pickle as Ray sends them."""
    import pickle

    for job in jobs:
        yield pickle.loads(pickle.dumps(fn(*pickle.loads(pickle.dumps(job)))))


def _ordered_rows(info) -> dict[str, list[dict]]:
    return {s: [r for f in info.split_files(s) for r in pq.read_table(f).to_pylist()] for s in info.splits}


def assert_same_dataset(a, b):
    """Same kept rows in the same order (every byte), same decisions, same counts, same tokenizer."""
    assert _ordered_rows(a.info) == _ordered_rows(b.info)
    with open(os.path.join(a.info.path, "rejected.jsonl"), "rb") as fa, \
         open(os.path.join(b.info.path, "rejected.jsonl"), "rb") as fb:
        assert fa.read() == fb.read()
    ja, jb = (json.load(open(os.path.join(r.info.path, "dataset.json"))) for r in (a, b))
    for doc in (ja, jb):
        doc.pop("created")
        for split in doc["splits"].values():
            split.pop("files")
    assert ja == jb
    assert (a.rows_in, a.kept, a.rejected, a.partly_missing, a.rejected_by_reason, a.missing_by_reason) == \
           (b.rows_in, b.kept, b.rejected, b.partly_missing, b.rejected_by_reason, b.missing_by_reason)
    if a.info.tokenizer:
        assert open(a.info.tokenizer_path, "rb").read() == open(b.info.tokenizer_path, "rb").read()


def test_chunked_path_gives_the_serial_dataset(folder, prepared, tmp_path):
    serial = prepared["csv"]
    chunked = prepare(folder["manifests"]["csv"], str(tmp_path / "ds"), columns=COLUMNS, chunk_rows=7,
                      run_chunks=in_process)
    assert_same_dataset(serial, chunked)
    n_chunks = -(-serial.rows_in // 7)
    assert chunked.ray_tasks == n_chunks and f"on Ray: {n_chunks} tasks" in chunked.summary()
    # each task wrote its own shards, straight into the dataset directory
    files = chunked.info.splits["train"].files
    assert len(files) > 1 and files[0] == "train/part-000000.parquet"
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_chunked_strict_names_the_same_rows_and_writes_nothing(folder, tmp_path):
    with pytest.raises(UserError) as serial:
        prepare(folder["manifests"]["csv"], str(tmp_path / "a"), columns=COLUMNS, strict=True, workers=1)
    with pytest.raises(UserError) as chunked:
        prepare(folder["manifests"]["csv"], str(tmp_path / "b"), columns=COLUMNS, strict=True, chunk_rows=5,
                run_chunks=in_process)
    # the same first rows; a run stops after the chunk where the first problem is, so chunks of 5 show fewer
    shown, want = str(chunked.value).splitlines(), str(serial.value).splitlines()
    assert len(shown) > 2 and shown == want[:len(shown)]
    assert os.listdir(tmp_path) == []


def test_chunked_path_stops_a_run_whose_shards_are_on_another_machine(folder, tmp_path):
    def elsewhere(fn, jobs, workers):  # a task on another node writes to that node's own disk
        for job in jobs:
            other = str(tmp_path / "other-node")
            yield fn(*job[:3], other, *job[4:])

    out = tmp_path / "ds"
    with pytest.raises(UserError, match="--out: shard train/part-000000.parquet was written by a Ray task on "
                                        "another machine.*a folder every machine shares"):
        prepare(folder["manifests"]["csv"], str(out), columns=COLUMNS, chunk_rows=50, run_chunks=elsewhere)
    assert not out.exists()


def test_ray_flag_auto_stays_off_without_a_cluster(monkeypatch):
    import sys

    from mmray.data.prepare import AUTO_RAY_ROWS, _use_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert not _use_ray("auto", 10 * AUTO_RAY_ROWS)  # a local Ray is never started just to prepare
    assert "ray" not in sys.modules
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _use_ray("auto", AUTO_RAY_ROWS) and not _use_ray("auto", AUTO_RAY_ROWS - 1)
    assert not _use_ray("off", 10 * AUTO_RAY_ROWS) and _use_ray("on", 1)


def test_bad_ray_flag_exits_2_and_names_the_choices(folder, tmp_path, capsys):
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", folder["manifests"]["csv"], "--out", str(out), *CLI_COLUMNS, "--ray", "yes"])
    assert e.value.code == 2
    assert "--ray: invalid choice: 'yes' (choose from 'auto', 'on', 'off')" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserError, match=r"--ray: 'yes'; choose one of auto, on, off"):
        prepare(folder["manifests"]["csv"], str(out), columns=COLUMNS, ray="yes")
    assert not out.exists()
