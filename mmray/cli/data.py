"""``mmray data synth|prepare|inspect``: make the built-in dataset, bring in your own, look at a dataset directory."""
from __future__ import annotations

import shlex
import sys

from mmray.cli.main import _Parser, add_verb


def register(sub) -> None:
    p = add_verb(sub, "data", help="make and inspect dataset directories",
                 example="mmray data synth --out data/synth --rows 3000", run=None)
    verbs = p.add_subparsers(dest="data_verb", metavar="synth|prepare|inspect", parser_class=_Parser)
    verbs.required = True
    s = add_verb(verbs, "synth", help="generate the built-in image+text+audio dataset (deterministic from --seed)",
                 example="mmray data synth --out data/synth --rows 3000 --shards 4 --seed 0\n"
                         "  mmray data synth --out s3://bucket/synth224 --rows 50000 --shards 64 --image-size 224 "
                         "--image-format jpeg --audio-seconds 10 --ray", run=run_synth)
    s.add_argument("--out", required=True, metavar="DIR", help="a local folder or an object-store URI (s3://, gs://)")
    s.add_argument("--rows", type=int, default=3000, help="total rows over train/val/test (default 3000)")
    s.add_argument("--shards", type=int, default=4,
                   help="Parquet shards per split (default 4); each shard is one unit of parallel work")
    s.add_argument("--seed", type=int, default=0)
    # No defaults here: mmray.data.synth.Media holds them (unset flags keep its values).
    s.add_argument("--image-size", type=int, metavar="PX", help="image side in pixels, 16-2048 (default 64)")
    s.add_argument("--image-format", metavar="jpeg|png|webp",
                   help="image encoding (default png; jpeg and webp at quality 90)")
    s.add_argument("--audio-seconds", type=float, metavar="S", help="recording length, 0.1-60 (default 1)")
    s.add_argument("--sample-rate", type=int, metavar="HZ", help="audio sample rate, 8000-48000 (default 16000)")
    s.add_argument("--workers", type=int, default=0,
                   help="processes writing shards (default 0 = one per CPU for 1,000+ rows; 1 = this process only)")
    s.add_argument("--ray", action="store_true",
                   help="write the shards as Ray tasks: on the cluster at RAY_ADDRESS, else on a local Ray; on "
                        "several nodes --out must be a URI or a folder every node sees")
    s.add_argument("--address", metavar="ADDR", default=None, help="a Ray cluster to run on (implies --ray)")
    _register_prepare(verbs)
    i = add_verb(verbs, "inspect", help="rows per split, class balance, modality availability, sample rows",
                 example="mmray data inspect data/synth", run=run_inspect)
    i.add_argument("dir", metavar="DIR")


def run_synth(args) -> int:
    from mmray.config.errors import UserError
    from mmray.data.synth import Media, synth

    if args.rows < 10 or args.shards < 1:
        raise UserError("--rows must be >= 10 and --shards >= 1")
    given = {k: getattr(args, k) for k in ("image_size", "image_format", "audio_seconds", "sample_rate")}
    media = Media(**{k: v for k, v in given.items() if v is not None})
    info = synth(args.out, rows=args.rows, shards=args.shards, seed=args.seed, media=media, workers=args.workers,
                 ray=args.ray, address=args.address,
                 command=" ".join(shlex.quote(a) for a in ["mmray", *sys.argv[1:]]))
    rows = ", ".join(f"{k} {v.rows}" for k, v in info.splits.items())
    print(f"wrote {info.path}: {rows} rows; classes: {', '.join(info.class_names)}")
    return 0


def _register_prepare(verbs) -> None:
    p = add_verb(
        verbs, "prepare",
        help="turn a CSV/JSONL/Parquet manifest of your own image, audio and text files into a dataset directory; "
             "every file is decoded once, and every rejected row or missing modality is listed in DIR/rejected.jsonl",
        example="mmray data prepare photos/manifest.csv --out data/mine --image-col path --text-col caption "
                "--label-col species",
        run=run_prepare)
    p.add_argument("manifest", metavar="MANIFEST", help="a .csv, .jsonl or .parquet file, one row per sample; "
                   "media paths are relative to its folder (or absolute)")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset directory to write")
    for flag, what in (("id", "unique ids (default: 'id'; without one, rows are named row-<number>)"),
                       ("image", "image file paths (default: 'image')"),
                       ("text", "the texts/captions themselves (default: 'text')"),
                       ("audio", "audio file paths (default: 'audio')"),
                       ("label", "labels: integers 0..N-1 or class names (default: 'label')"),
                       ("split", "train/val/test per row (default: 'split' if present, else a hash of the id)")):
        p.add_argument(f"--{flag}-col", metavar="COL", default=None, help=what)
    p.add_argument("--task-col", metavar="NAME=COL", action="append", default=[],
                   help="an extra label column for multi-task jobs, written as label_NAME (repeatable)")
    p.add_argument("--label-type", choices=("auto", "int", "str"), default="auto",
                   help="auto: integer labels when at least half the cells are integers (the rest are rejected), "
                        "else class names (default auto)")
    p.add_argument("--split-fractions", metavar="TRAIN,VAL,TEST", default="0.8,0.1,0.1",
                   help="fractions of the hash split when there is no split column (default 0.8,0.1,0.1)")
    p.add_argument("--strict", action="store_true",
                   help="any rejected row or missing modality is an error (exit 2) naming the first rows; "
                        "nothing is written")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding media (default 0 = automatic: one per CPU, at most 8, for 2,000+ rows "
                        "on 4+ CPUs; 1 = all in this process); on Ray, the most tasks at once (0 = one per CPU)")
    p.add_argument("--shard-mb", type=int, default=256, help="start a new shard after this many MB (default 256)")
    p.add_argument("--ray", choices=("auto", "on", "off"), default="auto",
                   help="on: Ray tasks decode and write the shards, one task per 4,096 rows, joining RAY_ADDRESS "
                        "(or starting a local Ray); off: this machine only; auto (default): on Ray for 20,000+ "
                        "rows when a cluster is given (RAY_ADDRESS set, as on a cluster node or in a Ray job), "
                        "else off. On a cluster of several machines --out must be a folder they all share")


def _fractions(text: str) -> tuple[float, float]:
    from mmray.config.errors import UserError

    try:
        train, val, test = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--split-fractions: {text!r}; give three numbers TRAIN,VAL,TEST such as 0.8,0.1,0.1") from None
    if min(train, val, test) < 0 or abs(train + val + test - 1.0) > 1e-6 or train <= 0:
        raise UserError(f"--split-fractions: {text!r}; three non-negative fractions that sum to 1, train above 0")
    return val, test


def _task_cols(items: list[str]) -> dict[str, str]:
    from mmray.config.errors import UserError

    tasks = {}
    for item in items:
        name, sep, col = item.partition("=")
        if not sep or not name.strip() or not col.strip():
            raise UserError(f"--task-col: {item!r}; write NAME=COL, e.g. --task-col colour=colour_label")
        if name.strip() in tasks:
            raise UserError(f"--task-col: task {name.strip()!r} given twice")
        tasks[name.strip()] = col.strip()
    return tasks


def run_prepare(args) -> int:
    from mmray.data.manifest import ColumnMap
    from mmray.data.prepare import PrepareProgress, prepare

    val, test = _fractions(args.split_fractions)
    columns = ColumnMap(id=args.id_col, label=args.label_col, split=args.split_col, tasks=_task_cols(args.task_col),
                        media={"image": args.image_col, "text": args.text_col, "audio": args.audio_col})
    report = prepare(args.manifest, args.out, columns=columns, label_type=args.label_type, val_fraction=val,
                     test_fraction=test, strict=args.strict, workers=args.workers, shard_mb=args.shard_mb, ray=args.ray,
                     command=" ".join(shlex.quote(a) for a in ["mmray", *sys.argv[1:]]),
                     progress=PrepareProgress())
    print(report.summary())
    return 0


def run_inspect(args) -> int:
    from mmray.data.inspect import inspect_dataset

    print(inspect_dataset(args.dir))
    return 0
