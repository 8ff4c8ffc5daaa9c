"""The command line: exit codes, messages, and that a bad config starts nothing."""
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

from mmray.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = str(REPO / "jobs" / "quickstart.yaml")


def test_bad_fusion_exits_2_naming_the_key_and_choices_and_never_starts_ray():
    code = (
        "import sys\nfrom mmray.cli.main import main\n"
        f"rc = main(['train', {QUICKSTART!r}, '--set', 'model.fusion.name=nope'])\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2
    assert "model.fusion.name: 'nope' is not a fusion; choose one of " in proc.stderr
    from mmray.models.fusion import FUSIONS

    assert ", ".join(FUSIONS.names()) in proc.stderr
    assert "NO_RAY" in proc.stdout


def test_missing_job_file_exits_2(capsys):
    assert main(["validate", "no/such/job.yaml"]) == 2
    assert "no/such/job.yaml: no such file" in capsys.readouterr().err


def test_validate_checks_a_space_against_the_job(tmp_path, capsys):
    assert main(["validate", QUICKSTART, "--space", str(REPO / "search_spaces" / "fusion.yaml")]) == 0
    assert "fusion.yaml: ok" in capsys.readouterr().out
    bad = tmp_path / "space.yaml"
    bad.write_text("parameters:\n  model.fusion.name: {choice: [concat, nope]}\n")
    assert main(["validate", QUICKSTART, "--space", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "parameters.model.fusion.name" in err and "nope" in err


def test_render_config_prints_every_default(capsys):
    assert main(["render-config", QUICKSTART, "--set", "train.optimizer.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.02" in out and "label_smoothing: 0.0" in out


def test_ls_lists_every_registered_component(capsys):
    from mmray.models.encoders import ENCODERS
    from mmray.models.fusion import FUSIONS

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ENCODERS.names() + FUSIONS.names():
        assert name in out


@pytest.mark.parametrize("verb", ["data synth", "data inspect", "validate", "render-config", "ls", "train",
                                  "evaluate", "predict", "export"])
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*verb.split(), "--help"])
    assert e.value.code == 0
    assert "example:\n  mmray " in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--image-format", "gif"], "--image-format: 'gif'; choose one of jpeg, png, webp"),
    (["--image-size", "4000"], "--image-size: 4000; must be from 16 to 2048"),
    (["--audio-seconds", "0"], "--audio-seconds: 0; must be from 0.1 to 60"),
    (["--sample-rate", "1000"], "--sample-rate: 1000; must be from 8000 to 48000"),
    (["--workers", "-1"], "--workers: -1; must be 0 (automatic) or more"),
    (["--image-size", "big"], "argument --image-size: invalid int value: 'big'"),
])
def test_bad_synth_flags_exit_2_naming_flag_value_and_choices_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "synth"
    try:
        code = main(["data", "synth", "--out", str(out), "--rows", "20", *flags])
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("mmray:") == 1
    assert not out.exists()


def test_synth_flags_reach_the_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--rows", "12", "--shards", "1", "--image-size", "40",
                 "--image-format", "webp", "--audio-seconds", "0.25", "--sample-rate", "8000", "--workers", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    import json

    media = json.loads((out / "dataset.json").read_text())["media"]
    assert media == {"image": {"format": "webp", "size": 40}, "audio": {"format": "wav", "sample_rate": 8000,
                                                                        "seconds": 0.25}}
