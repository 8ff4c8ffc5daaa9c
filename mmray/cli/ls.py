"""``mmray ls``: the registered components, by kind, with their one-line summaries."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    add_verb(sub, "ls", help="list registered encoders and fusions", example="mmray ls", run=run)


def run(args) -> int:
    from mmray.config.schema import MODALITIES
    from mmray.models.encoders import ENCODERS
    from mmray.models.fusion import FUSIONS

    for modality in MODALITIES:
        print(f"{modality} encoders:")
        for e in ENCODERS.entries(modality):
            print(f"  {e.name:<18} {e.config.__doc__.strip().splitlines()[0] if e.config.__doc__ else e.summary}")
    print("fusions:")
    for e in FUSIONS.entries():
        print(f"  {e.name:<18} {e.config.__doc__.strip().splitlines()[0] if e.config.__doc__ else e.summary}")
    return 0
