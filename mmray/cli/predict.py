"""``mmray predict MODEL_DIR --data DIR --out FILE``: predictions of an export for every row of a split."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "predict", help="write predictions of a model export for a dataset split (JSONL or CSV)",
                 example="mmray predict runs/quickstart/export --data data/synth --out preds.jsonl", run=run)
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, metavar="FILE", help="*.jsonl or *.csv")


def run(args) -> int:
    from mmray.export.evaluate import predict_dataset

    n = predict_dataset(args.model_dir, args.data, args.split, args.out)
    print(f"wrote {n} predictions to {args.out}")
    return 0
