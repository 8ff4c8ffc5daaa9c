"""``mmray train JOB.yaml``: one training run on Ray, ending in a model export."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "train", help="train one model on Ray and export its best epoch",
                 example="mmray train jobs/quickstart.yaml --set train.epochs=3 --set model.fusion.dropout=0.2",
                 run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), repeatable")
    p.add_argument("--name", help="run name (default: the job's name; an unfinished run of that name is resumed)")
    p.add_argument("--storage", help="where runs go (default: the job's storage, ./runs)")


def run(args) -> int:
    from mmray.config import load_job
    from mmray.train.api import train
    from mmray.train.progress import ProgressPrinter

    config = load_job(args.job, args.overrides)  # bad config: exit 2 before anything starts
    result = train(config, name=args.name, storage=args.storage, on_event=ProgressPrinter())
    m = result.metrics
    print()
    print(f"run:         {result.run_dir}{'  (resumed)' if result.resumed else ''}")
    print(f"best epoch:  {m['epoch']}  val accuracy {m['val.accuracy']:.4f}" +
          (f"  test accuracy {m['test.accuracy']:.4f}  test F1 {m['test.f1']:.4f}" if "test.accuracy" in m else ""))
    print(f"export:      {result.export_dir}")
    print(f"tensorboard: {result.tensorboard_command}")
    print(f"evaluate:    mmray evaluate {result.export_dir} --data {config.data.path} --split test")
    return 0
