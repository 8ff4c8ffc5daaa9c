"""``mmray export MODEL_DIR --quantize int8|fp16|bf16 [--out DIR]``: a compressed copy of a model export."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "export",
                 help="write a compressed copy of a model export: int8 linear layers, or fp16/bf16 weights "
                      "(no Ray needed)",
                 example="mmray export runs/quickstart/export --quantize int8   # -> runs/quickstart/export-int8",
                 run=run)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model export folder (a run's export/ or a sweep's best/)")
    p.add_argument("--quantize", required=True, metavar="MODE",
                   help="int8 (dynamic quantisation of the linear layers), fp16 or bf16 (half-precision weights)")
    p.add_argument("--out", metavar="DIR", help="the new export folder (default: MODEL_DIR-MODE next to MODEL_DIR)")


def run(args) -> int:
    from mmray.export.quantize import quantize_export

    res = quantize_export(args.model_dir, args.quantize, out=args.out)
    before, after = res["source_weights_bytes"], res["weights_bytes"]
    what = (f"{res['linear_layers']} linear layers on int8 kernels, {res['int8_weights']} more weight tensors "
            "stored in int8" if res["mode"] == "int8" else f"weights in {res['mode']}")
    print(f"wrote {res['out']} ({what})")
    print(f"model.safetensors: {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB ({after / before:.2f}x)")
    print(f"compare it with the original: mmray evaluate {res['out']} --data DATASET_DIR")
    return 0
