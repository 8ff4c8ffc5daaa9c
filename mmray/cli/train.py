"""``mmray train JOB.yaml``: one training run on Ray, ending in a model export."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "train", help="train one model on Ray and export its best epoch",
                 example="mmray train jobs/quickstart.yaml --set train.epochs=3 --set model.fusion.dropout=0.2\n"
                         "  mmray train jobs/quickstart.yaml --name nightly --storage s3://my-bucket/runs",
                 run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), repeatable")
    p.add_argument("--name", help="run name (default: the job's name); an unfinished run of that name is resumed, "
                                  "a finished one is reported, not retrained")
    p.add_argument("--storage", help="where runs go: a folder or a URI such as s3://bucket/runs "
                                     "(default: the job's storage, ./runs)")


def run(args) -> int:
    from mmray.config import load_job
    from mmray.train.api import train
    from mmray.train.progress import ProgressPrinter

    config = load_job(args.job, args.overrides)  # bad config: exit 2 before anything starts
    result = train(config, name=args.name, storage=args.storage, on_event=ProgressPrinter())
    m = result.metrics
    if result.already_finished:
        print(f"run {result.run_dir} already finished; nothing was trained. Its export is {result.export_dir}\n"
              f"(to train again, choose another --name, or leave --name out for the next free {config.name}-N)")
    print()
    state = "  (resumed)" if result.resumed else "  (already finished)" if result.already_finished else ""
    print(f"run:         {result.run_dir}{state}")
    print(f"best epoch:  {m['epoch']}  val accuracy {m['val.accuracy']:.4f}" +
          (f"  test accuracy {m['test.accuracy']:.4f}  test F1 {m['test.f1']:.4f}" if "test.accuracy" in m else ""))
    print(f"export:      {result.export_dir}")
    print(f"tensorboard: {result.tensorboard_command}")
    print(f"evaluate:    mmray evaluate {result.export_dir} --data {config.data.path} --split test")
    return 0
