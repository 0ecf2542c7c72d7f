"""``python -m surrogate_md.train``: train a trajectory model from a YAML config.

Examples::

    python -m surrogate_md.train --config examples/configs/egno_alanine_dipeptide.yaml \\
        --set data.path=ala.h5 --set train.epochs=50 --out runs/ala-egno
    python -m surrogate_md.train --resume runs/ala-egno          # continue a killed run
    torchrun --nproc_per_node 4 -m surrogate_md.train --config ... --out ...   # multi-GPU
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from surrogate_md.errors import SurrogateMDError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m surrogate_md.train",
        description="Train an SE(3)-equivariant trajectory model on canonical dataset files. "
                    "Writes config.yaml, train.log, metrics.jsonl, loss.png, last.pt and best.pt "
                    "to the run directory.")
    p.add_argument("--config", type=Path, help="YAML run config (sections data, model, train, "
                   "runtime); optional with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a config value (parsed as YAML), e.g. data.path=ala.h5 or "
                        "train.epochs=10; model.OPTION=null drops a model option (to switch "
                        "model.name); repeatable")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="overrides runtime.device")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, return the exit code (2 on a user error, message on stderr)."""
    args = build_parser().parse_args(argv)
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run's train.log still gets INFO
        handler.setLevel(logging.WARNING if args.quiet or rank else logging.INFO)
    from surrogate_md.train.loop import train

    try:
        if args.resume is not None:
            out = args.resume
            if args.out is not None and args.out.absolute() != out.absolute():
                raise SurrogateMDError("--out and --resume name different run directories; "
                                       "give only --resume RUN_DIR")
            config = args.config if args.config is not None else out / "config.yaml"
            best = train(config, out, resume=True, device=args.device,
                         overrides=args.overrides)
        else:
            if args.config is None:
                raise SurrogateMDError("--config FILE.yaml is required (or --resume RUN_DIR)")
            out = args.out if args.out is not None else Path("runs") / args.config.stem
            best = train(args.config, out, overwrite=args.overwrite, device=args.device,
                         overrides=args.overrides)
    except SurrogateMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("best model: %s", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
