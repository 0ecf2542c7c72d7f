"""``python -m surrogate_md.evaluate CHECKPOINT --data FILE.h5 --out DIR``.

Scores the checkpoint on the test split cut exactly as in training (or ``--split all`` for
another file of the same system), with the constant and linear floors alongside, rolls it out and
checks the physical validity of the rollout frames. Writes report.md, metrics.json and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from surrogate_md.errors import SurrogateMDError


def build_parser() -> argparse.ArgumentParser:
    from surrogate_md.evaluate.core import PROTOCOLS, SPLITS
    from surrogate_md.noise import DEFAULT_MAX_COMPONENTS

    p = argparse.ArgumentParser(prog="python -m surrogate_md.evaluate",
                                description="Evaluate a trained surrogate against reference MD.")
    p.add_argument("checkpoint", type=Path, help="best.pt or last.pt of a training run")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="dataset file(s) of the system the model was trained on")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory for report.md, metrics.json and the plots")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="windows to score: test, val or train are cut as in training and need "
                        "the training files in the training order; all: the windows of all three "
                        "splits, from any files, or every window of files too short for the "
                        "training split (default: test)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="s2t",
                   help="s2t: the trained output grid; s2s: only the end of the jump")
    p.add_argument("--rollout-jumps", type=int, default=10,
                   help="jumps per rollout, 0 for none (default 10)")
    p.add_argument("--n-rollouts", type=int, default=4, help="rollout start points (default 4)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows")
    p.add_argument("--transfer", action="store_true",
                   help="the data hold another system or atom order (e.g. the same protein from "
                        "other force-field files): select the nodes afresh, score one-jump errors")
    p.add_argument("--noise-out", type=Path, default=None, metavar="FILE.npz",
                   help="also fit a jump-noise model (the residuals at the end of the jump, "
                        "their leading principal components) on the scored windows and save it "
                        "here, for stochastic jumps (predict --jump-noise); use --split val or "
                        "train")
    p.add_argument("--noise-components", type=int, default=None, metavar="K",
                   help=f"with --noise-out: keep the leading K principal components (default "
                        f"{DEFAULT_MAX_COMPONENTS}; fewer, collective ones strain a protein's "
                        "bonds less, so its stochastic jumps relax faster)")
    p.add_argument("--noise-revert", action="store_true",
                   help="with --noise-out: also fit a pull back along each component, so that "
                        "long stochastic runs keep the fitted MD's spread instead of drifting "
                        "away like a random walk (keep more components with it: what lies "
                        "outside them is not pulled back; 60 for an AdK backbone)")
    p.add_argument("--noise-size", action="store_true",
                   help="with --noise-out: also fit a size model, so that the drawn ends keep "
                        "the radius of gyration of the reference MD at the jump's lag instead of "
                        "the model's mean prediction shrinking the molecule jump after jump")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate, return the exit code (2 on a user error, message on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run's train.log still gets INFO
        handler.setLevel(logging.WARNING if args.quiet else logging.INFO)
    from surrogate_md.evaluate.core import evaluate

    try:
        evaluate(args.checkpoint, [str(p) for p in args.data], args.out, split=args.split,
                 protocol=args.protocol, rollout_jumps=args.rollout_jumps,
                 n_rollouts=args.n_rollouts, batch_size=args.batch_size, device=args.device,
                 max_windows=args.max_windows, overwrite=args.overwrite,
                 transfer=args.transfer, noise_out=args.noise_out,
                 noise_components=args.noise_components, noise_revert=args.noise_revert,
                 noise_size=args.noise_size)
    except SurrogateMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("report: %s", args.out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
