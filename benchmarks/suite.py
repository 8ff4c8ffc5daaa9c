"""Benchmark suite harness: mmray against the hand-written reference script on data it was not designed on.

    python benchmarks/suite/build.py --out data/suite                               # once: the datasets
    python benchmarks/suite.py --data data/suite                                    # every dataset, full scale
    python benchmarks/suite.py --data data/suite --only spoken-digits --record      # one, appended to RESULTS.md
    python benchmarks/suite.py --data /tmp/suite --smoke                            # 1 epoch, 2 trials: it works

Per dataset (``benchmarks/suite/build.py`` says what each one is), every arm as a user runs it, each in its
own process, timed from its start to its exit:

1. **reference**: ``benchmarks/suite/reference.py DATA`` (plain PyTorch, ``--ref-epochs`` epochs, 1 thread);
2. **reference + Optuna**: the same script with ``--optuna-trials`` (its wall time is the sweep's budget);
3. **mmray train**: a job written for the dataset from ``jobs/quickstart.yaml``'s defaults (its encoders for
   the dataset's modalities, ``scaling.num_workers=1`` and ``train.batch_size=64``, the job's global batch);
4. **mmray tune** of that job with no ``--space`` (the built-in space) and ``--time-budget`` equal to the
   reference study's wall time when
   ``mmray tune --help`` lists that flag, else ``--space search_spaces/quickstart.yaml --num-samples N``
   (the output says which);
5. **time to the reference**: seconds from the sweep's start to the first epoch of any trial whose
   validation accuracy reaches the reference run's best validation accuracy (same split), read from the
   trials' TensorBoard scalars; beside it, the same for the reference study.

Accuracies are the best validation epoch's and the test accuracy at that epoch (mmray: the export's
``metrics.json``). The box may be shared: the load average is printed; read numbers as indicative.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from sweep import first_hit, tensorboard_curves  # noqa: E402  (benchmarks/sweep.py: one reader of the curves)

DATASETS = ["digits-photo", "spoken-digits", "fortune-topics"]  # benchmarks/suite/build.py builds these
QUICKSTART_JOB = os.path.join(REPO, "jobs", "quickstart.yaml")
QUICKSTART_SPACE = os.path.join(REPO, "search_spaces", "quickstart.yaml")
RESULTS = os.path.join(HERE, "RESULTS.md")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], log: str) -> tuple[int, float, str]:
    """Run ``cmd`` with its output going to ``log``; return (exit status, wall seconds, output)."""
    print("  $ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO).returncode
    with open(log) as f:
        out = f.read()
    if rc != 0:
        print(f"  exit {rc}; last lines of {log}:\n" + "\n".join("    " + ln for ln in out.splitlines()[-15:]))
    return rc, time.time() - t, out


MMRAY = [sys.executable, "-m", "mmray.cli.main"]


# ----------------------------------------------------------------------------- arms
def reference(data: str, log: str, *, epochs: int, trials: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.join(HERE, "suite", "reference.py"), data, "--epochs", str(epochs)]
    if trials:
        cmd += ["--optuna-trials", str(trials)]
    rc, wall, out = run(cmd, log)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        return {"error": f"exit {rc}, see {log}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall": wall}


def write_job(data: str, name: str, out: str) -> str:
    """The job a user adapts from jobs/quickstart.yaml: its defaults, the dataset's modalities, one worker."""
    with open(os.path.join(data, "dataset.json")) as f:
        modalities = sorted(json.load(f)["modalities"])
    with open(QUICKSTART_JOB) as f:
        job = yaml.safe_load(f)
    job["name"] = name
    job["data"] = {**job["data"], "path": os.path.abspath(data), "modalities": modalities}
    job["model"]["encoders"] = {m: e for m, e in job["model"]["encoders"].items() if m in modalities}
    job["scaling"] = {**job["scaling"], "num_workers": 1}
    job["train"]["batch_size"] = 64  # the quickstart's global batch (2 workers x 32) on one worker
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"# {name}: jobs/quickstart.yaml's defaults for {data}, one worker (benchmarks/suite.py)\n")
        yaml.safe_dump(job, f, sort_keys=False)
    return path


def _export_metrics(export_dir: str) -> dict[str, Any]:
    path = os.path.join(export_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _flat(metrics: dict[str, Any], key: str) -> float | None:
    """``val.accuracy`` from a metrics.json that is flat (``{"val.accuracy": ..}``) or nested (``{"val": {..}}``)."""
    if key in metrics:
        return metrics[key]
    split, name = key.split(".", 1)
    v = metrics.get(split, {})
    return v.get(name) if isinstance(v, dict) else None


def mmray_train(job: str, storage: str, name: str, log: str, overrides: list[str]) -> dict[str, Any]:
    cmd = [*MMRAY, "train", job, "--storage", storage, "--name", name]
    for o in overrides:
        cmd += ["--set", o]
    rc, wall, _ = run(cmd, log)
    found = glob.glob(os.path.join(storage, name, "**", "export", "metrics.json"), recursive=True)
    m = _export_metrics(os.path.dirname(found[0])) if found else {}
    if rc != 0 or not m:
        return {"error": f"exit {rc}, see {log}", "wall": wall}
    return {"val_accuracy": _flat(m, "val.accuracy"), "test_accuracy": _flat(m, "test.accuracy"),
            "epoch": m.get("epoch"), "wall": wall}


def has_time_budget() -> bool:
    out = subprocess.run([*MMRAY, "tune", "--help"], capture_output=True, text=True, env=_env(), cwd=REPO).stdout
    return "--time-budget" in out


def mmray_tune(job: str, storage: str, name: str, log: str, overrides: list[str], *, budget_s: float | None,
               num_samples: int | None, budget_note: str = "") -> dict[str, Any]:
    cmd = [*MMRAY, "tune", job, "--storage", storage, "--name", name]
    if budget_s is not None:
        cmd += ["--time-budget", f"{max(1, round(budget_s))}s"]
        how = f"--time-budget {max(1, round(budget_s))}s ({budget_note}), built-in space"
        if num_samples:  # whichever comes first
            cmd += ["--num-samples", str(num_samples)]
            how += f", at most {num_samples} trials"
    else:
        cmd += ["--space", QUICKSTART_SPACE]
        if num_samples:
            cmd += ["--num-samples", str(num_samples)]
        how = (f"--space search_spaces/quickstart.yaml --num-samples {num_samples or 'from the space'} "
               "(mmray tune has no --time-budget yet)")
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    rc, wall, _ = run(cmd, log)
    exp = os.path.join(storage, name)
    board = os.path.join(exp, "leaderboard.csv")
    if rc != 0 or not os.path.isfile(board):
        return {"error": f"exit {rc}, see {log}", "wall": wall, "how": how}
    with open(board) as f:
        rows = list(csv.DictReader(f))
    if not rows or not rows[0].get("val.accuracy"):
        return {"error": f"no trial finished an epoch ({len(rows)} trials), see {log}", "wall": wall, "how": how}
    best = _export_metrics(os.path.join(exp, "best"))
    return {"val_accuracy": _flat(best, "val.accuracy") if best else float(rows[0]["val.accuracy"]),
            "test_accuracy": _flat(best, "test.accuracy") if best else None, "trials": len(rows),
            "wall": wall, "how": how, "curves": tensorboard_curves(exp, t0)}


# ----------------------------------------------------------------------------- one dataset
def bench(name: str, data: str, work: str, args: argparse.Namespace, budget_flag: bool) -> dict[str, Any]:
    print(f"\n== {name} ({data})", flush=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(data, "dataset.json")) as f:
        rows = "/".join(str(v["rows"]) for v in json.load(f)["splits"].values())
    r: dict[str, Any] = {"dataset": name, "rows": rows}

    def arm(key: str, value: dict[str, Any]) -> None:  # kept as each arm ends: a stopped run still has them
        r[key] = value
        print(f"  {key}: {_line(value)}", flush=True)
        with open(os.path.join(work, f"{name}.json"), "w") as f:
            json.dump(r, f, indent=2)

    arm("reference", reference(data, f"{logs}/{name}-reference.log", epochs=args.ref_epochs, trials=0))
    arm("study", reference(data, f"{logs}/{name}-study.log", epochs=args.ref_epochs, trials=args.ref_trials))
    job = write_job(data, f"suite-{name}", work)
    overrides = [f"train.epochs={args.mmray_epochs}"] if args.mmray_epochs else []
    arm("train", mmray_train(job, os.path.join(work, "runs"), f"{name}-job", f"{logs}/{name}-train.log", overrides))
    budget = max(r["study"].get("wall", 0.0), args.min_budget) if budget_flag else None
    note = ("the reference study's wall time" if budget is None or budget > args.min_budget
            else f"--min-budget {args.min_budget:.0f}s, above the reference study's wall time")
    arm("tune", mmray_tune(job, os.path.join(work, "runs"), f"{name}-sweep", f"{logs}/{name}-tune.log", overrides,
                           budget_s=budget, num_samples=args.num_samples, budget_note=note))
    target = r["reference"].get("val_accuracy")
    if target is not None:
        r["target"] = target
        r["tune_to_target"] = first_hit(r["tune"].get("curves", []), target)
        # the script's curve starts after its imports; from its process start, as the sweep's is
        lag = r["study"].get("wall", 0.0) - r["study"].get("seconds", 0.0)
        r["study_to_target"] = first_hit([[(t + lag, a) for t, a in r["study"].get("curve", [])]], target)
    print(table([r]), flush=True)
    return r


# ----------------------------------------------------------------------------- output
def _acc(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def _s(x: Any) -> str:
    return f"{x:.0f} s" if isinstance(x, (int, float)) else "not reached"


def _line(x: dict[str, Any]) -> str:
    if "error" in x:
        return x["error"]
    return f"val {_acc(x.get('val_accuracy'))}  test {_acc(x.get('test_accuracy'))}  wall {_s(x.get('wall'))}"


def _params(p: Any) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in p.items()) if isinstance(p, dict) else "-"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| dataset | arm | val acc | test acc | wall | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        ref, study, tr, tu = r["reference"], r["study"], r["train"], r["tune"]
        arms = [
            ("reference script", ref, f"{ref.get('epochs')} epoch(s), {ref.get('threads')} thread"),
            ("reference + Optuna", study, f"{study.get('trials')} trials x {study.get('epochs')} epoch(s); "
                                          f"best {_params(study.get('params'))}"),
            ("mmray train (quickstart defaults)", tr, f"best epoch {tr.get('epoch')}"),
            ("mmray tune", tu, f"{tu.get('trials')} trials; {tu.get('how')}"),
        ]
        for i, (arm, x, note) in enumerate(arms):
            if "error" in x:
                note = x["error"]
            where = f"{r['dataset']} ({r.get('rows')} rows)" if i == 0 else ""
            lines.append(f"| {where} | {arm} | {_acc(x.get('val_accuracy'))} | "
                         f"{_acc(x.get('test_accuracy'))} | {_s(x.get('wall'))} | {note} |")
        if "target" in r:
            lines.append(f"| | time to reference val acc {r['target']:.3f} | | | | mmray tune "
                         f"{_s(r['tune_to_target'])}; reference study {_s(r['study_to_target'])} |")
    return "\n".join(lines)


def record(results: list[dict[str, Any]], argv: list[str], load: tuple[float, float]) -> None:
    shared = (" The box was shared with other heavy jobs (load above the core count): the numbers are indicative."
              if max(load) > (os.cpu_count() or 1) else "")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## Benchmark suite ({when})\n\n"
            f"**Command:** `python benchmarks/suite.py {' '.join(argv)}`  \n"
            f"**Machine:** {os.cpu_count()} CPU cores; load average {load[0]:.1f} at the start, {load[1]:.1f} at "
            f"the end.{shared}\n\n"
            f"{table(results)}\n")
    with open(RESULTS, "a") as f:
        f.write(text)
    print(f"appended to {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder benchmarks/suite/build.py --out wrote")
    ap.add_argument("--only", action="append", choices=DATASETS, help="run only this dataset (repeatable)")
    ap.add_argument("--ref-epochs", type=int, default=20, help="reference script epochs (default 20)")
    ap.add_argument("--ref-trials", type=int, default=16, help="reference Optuna study trials (default 16)")
    ap.add_argument("--mmray-epochs", type=int, help="override train.epochs of the mmray job and sweep "
                                                     "(default: the quickstart job's)")
    ap.add_argument("--num-samples", type=int, help="sweep trials (with --time-budget: at most this many; "
                                                    "without: default the space's num_samples)")
    ap.add_argument("--min-budget", type=float, default=0.0,
                    help="seconds: the sweep's --time-budget is at least this (default 0)")
    ap.add_argument("--smoke", action="store_true",
                    help="1 epoch everywhere, 2 reference trials, 2 sweep trials, a budget of at least 180 s")
    ap.add_argument("--work", help="folder for jobs, runs and logs (default: a new temporary folder)")
    ap.add_argument("--record", action="store_true", help=f"append the table to {os.path.relpath(RESULTS, REPO)}")
    ap.add_argument("--json", help="also write the raw results (curves included) here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.ref_epochs, args.ref_trials, args.mmray_epochs, args.num_samples = 1, 2, 1, 2
        args.min_budget = max(args.min_budget, 180.0)  # a study of seconds leaves no time to start a trial
    names = args.only or DATASETS
    missing = [n for n in names if not os.path.isfile(os.path.join(args.data, n, "dataset.json"))]
    if missing:
        print(f"suite: no dataset directory {', '.join(os.path.join(args.data, n) for n in missing)}; build it with "
              f"python benchmarks/suite/build.py --out {args.data}", file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="mmray-suite-")
    budget_flag = has_time_budget()
    load0 = os.getloadavg()[0]
    print(f"work folder {work}; {os.cpu_count()} CPUs, load average {load0:.1f}; mmray tune "
          f"{'has --time-budget' if budget_flag else 'has no --time-budget yet: the sweep runs --num-samples'}")
    results = [bench(n, os.path.join(args.data, n), work, args, budget_flag) for n in names]
    print("\n" + table(results))
    load1 = os.getloadavg()[0]
    print(f"\nload average at the end: {load1:.1f} ({os.cpu_count()} cores: above that means the box was shared)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.record:
        record(results, argv, (load0, load1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
