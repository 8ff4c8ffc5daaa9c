"""``mmray data synth|inspect``: make the built-in dataset, look at a dataset directory."""
from __future__ import annotations

import shlex
import sys

from mmray.cli.main import _Parser, add_verb


def register(sub) -> None:
    p = add_verb(sub, "data", help="make and inspect dataset directories",
                 example="mmray data synth --out data/synth --rows 3000", run=None)
    verbs = p.add_subparsers(dest="data_verb", metavar="synth|inspect", parser_class=_Parser)
    verbs.required = True
    s = add_verb(verbs, "synth", help="generate the built-in image+text+audio dataset (deterministic from --seed)",
                 example="mmray data synth --out data/synth --rows 3000 --shards 4 --seed 0", run=run_synth)
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--rows", type=int, default=3000, help="total rows over train/val/test (default 3000)")
    s.add_argument("--shards", type=int, default=4, help="Parquet shards per split (default 4)")
    s.add_argument("--seed", type=int, default=0)
    i = add_verb(verbs, "inspect", help="rows per split, class balance, modality availability, sample rows",
                 example="mmray data inspect data/synth", run=run_inspect)
    i.add_argument("dir", metavar="DIR")


def run_synth(args) -> int:
    from mmray.config.errors import UserError
    from mmray.data.synth import synth

    if args.rows < 10 or args.shards < 1:
        raise UserError("--rows must be >= 10 and --shards >= 1")
    info = synth(args.out, rows=args.rows, shards=args.shards, seed=args.seed,
                 command=" ".join(shlex.quote(a) for a in ["mmray", *sys.argv[1:]]))
    rows = ", ".join(f"{k} {v.rows}" for k, v in info.splits.items())
    print(f"wrote {info.path}: {rows} rows; classes: {', '.join(info.class_names)}")
    return 0


def run_inspect(args) -> int:
    from mmray.data.inspect import inspect_dataset

    print(inspect_dataset(args.dir))
    return 0
