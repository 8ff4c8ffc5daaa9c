"""How a failure reads: one `mmray:` line naming the cause (unwrapped from Ray's wrappers), exit 1 at run
time and 2 for bad input; the full traceback only with --verbose, before or after the verb."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmray.cli.main import main, root_error
from mmray.config.errors import UserError
from mmray.data.decode import BadRecordError

QUICKSTART = str(Path(__file__).resolve().parents[3] / "jobs" / "quickstart.yaml")


def ray_wrapped(cause: Exception) -> Exception:
    """``cause`` as it reaches the driver from a Ray Data task inside a Ray Train worker."""
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import WorkerGroupError

    try:
        raise cause
    except Exception as e:
        copy = RayTaskError("map_batches(Decode)", "Traceback (most recent call last):\n  ...", e).as_instanceof_cause()
    udf = UserCodeException("UDF failed to process a data block.")
    udf.__cause__ = copy
    group = WorkerGroupError("[Rank 0]\nTraceback ...\n" * 20, {0: udf, 1: udf})
    try:
        raise RuntimeError(f"training failed: {group}") from group
    except RuntimeError as e:
        return e


@pytest.fixture()
def failing_train(monkeypatch):
    import mmray.train.api

    def arm(error: Exception):
        def train(*_, **__):
            raise error
        monkeypatch.setattr(mmray.train.api, "train", train)

    return arm


def test_root_error_finds_the_mmray_error_as_raised_not_rays_copy():
    bad = BadRecordError("r7", "image", "cannot identify image file")
    found = root_error(ray_wrapped(bad))
    assert found is bad and type(found) is BadRecordError


def test_a_bad_record_under_fail_is_one_line_naming_record_column_and_reason(failing_train, capsys):
    failing_train(ray_wrapped(BadRecordError("r7", "image", "cannot identify image file")))
    assert main(["train", QUICKSTART]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == ("mmray: bad record 'r7': column 'image': cannot identify image file "
                        "(set data.on_bad_record: skip to count and skip such records)")
    assert lines[1].startswith("mmray: run again with --verbose for the full traceback")
    assert len(lines) == 2 and "Traceback" not in err and "WorkerGroupError" not in err


@pytest.mark.parametrize("argv", [["--verbose", "train", QUICKSTART], ["train", QUICKSTART, "--verbose"],
                                  ["-v", "train", QUICKSTART]])
def test_verbose_before_or_after_the_verb_shows_the_full_traceback(failing_train, capsys, argv):
    failing_train(ray_wrapped(BadRecordError("r7", "image", "cannot identify image file")))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "WorkerGroupError" in err
    assert err.strip().splitlines()[-1].startswith("mmray: bad record 'r7'")


def test_bad_input_found_inside_a_run_still_exits_2_with_its_message(failing_train, capsys):
    failing_train(ray_wrapped(UserError("model.encoders.text.path: /x: not found")))
    assert main(["train", QUICKSTART]) == 2
    assert capsys.readouterr().err == "mmray: model.encoders.text.path: /x: not found\n"


def test_any_other_failure_names_the_innermost_exception(failing_train, capsys):
    failing_train(ray_wrapped(ValueError("boom")))
    assert main(["train", QUICKSTART]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmray: ValueError: boom\n") and "Traceback" not in err


def test_bad_input_with_verbose_adds_the_traceback(capsys):
    assert main(["validate", "no/such/job.yaml", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("mmray: no/such/job.yaml: no such file")
    assert main(["validate", "no/such/job.yaml"]) == 2
    assert capsys.readouterr().err == "mmray: no/such/job.yaml: no such file\n"


def test_ray_process_output_keeps_its_lines_but_not_tracebacks():
    from mmray.runtime import TracebackFilter

    printed: list[list[str]] = []
    f = TracebackFilter(lambda data: printed.append(data["lines"]))
    f({"pid": 1, "lines": ["skipping bad record 'r1': column 'image': cannot decode image",
                           "Error in training function:", "Traceback (most recent call last):",
                           '  File "decode.py", line 223, in _bad', "    raise BadRecordError(...)"]})
    f({"pid": 2, "lines": ["epoch 1 done"]})  # another process, while pid 1 is inside its traceback
    f({"pid": 1, "lines": ["           ^^^^^^", "mmray.data.decode.BadRecordError: bad record 'r7'", "",
                           "During handling of the above exception, another exception occurred:", "",
                           "Traceback (most recent call last):", '  File "x.py", line 1', "RuntimeError: x",
                           "Failed to apply UDF transform after 1/1 attempts", "after the failure"]})
    assert printed == [["skipping bad record 'r1': column 'image': cannot decode image"], ["epoch 1 done"],
                       ["after the failure"]]


def test_verbose_lets_ray_tracebacks_through(monkeypatch):
    import mmray.runtime

    seen = []
    monkeypatch.setattr(mmray.runtime, "set_verbose", lambda flag: seen.append(flag))
    main(["--verbose", "ls"])
    main(["ls"])
    assert seen == [True, False]
