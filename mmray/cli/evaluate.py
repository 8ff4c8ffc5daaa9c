"""``mmray evaluate MODEL_DIR --data DIR``: metrics and a confusion matrix of an export on a split."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "evaluate", help="evaluate a model export on a dataset split (no Ray needed)",
                 example="mmray evaluate runs/quickstart/export --data data/synth --split test", run=run)
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory")
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="skip the table of accuracy with each modality removed / alone (one extra pass per row)")


def run(args) -> int:
    from mmray.export.evaluate import evaluate, format_evaluation

    result = evaluate(args.model_dir, args.data, split=args.split, diagnostics=args.diagnostics)
    print(format_evaluation(result))
    from mmray.export.codec import read_quantization
    from mmray.export.compare import compare_with_source, format_comparison

    if read_quantization(args.model_dir) is not None:  # a compressed copy: show it next to its original
        print(format_comparison(compare_with_source(args.model_dir, args.data, split=args.split)))
    return 0
