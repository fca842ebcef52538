"""The recovery lab of issue 11 §1 (docs/recovery-lab.md): pretrain a tiny Llama on the bundled books, convert it to
a Block Transformer, uptrain it with budgets of 1%, 3% and 10% of its pretraining tokens N by several methods, and
compare with the same Block Transformer trained from scratch for N tokens.

    python bench/recovery_lab.py --out runs/lab            # full: ~5.7M parameters, about an hour of pretraining
    python bench/recovery_lab.py --quick --out runs/lab-q  # the whole lab in under ten minutes on 2 cores

Re-running the same command resumes: finished stages are skipped. Writes OUT/lab.json, OUT/methods.md, OUT/fig5a.png.
"""
from __future__ import annotations

import argparse
import sys


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lab", help="lab folder (resumed when it holds a lab with the same options)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller model and N: the whole lab in < 10 min")
    size.add_argument("--micro", action="store_true", help="a seconds-long run for tests")
    p.add_argument("--tokens", type=int, help="N, the pretraining tokens (default: the preset's)")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--budgets", help="comma-separated shares of N (default: 0.01,0.03,0.1)")
    p.add_argument("--seeds", type=int, help="seeds at the smallest budget (default 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores not already busy)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from blockformer.errors import BlockformerError
    from blockformer.lab import preset, run_lab
    a = parse(argv)
    try:
        if a.threads is not None and a.threads < 1:
            raise BlockformerError(f"--threads must be >= 1 (got {a.threads})")
        budgets = tuple(float(x) for x in a.budgets.split(",")) if a.budgets else None
        methods = tuple(x.strip() for x in a.methods.split(",") if x.strip()) if a.methods else None
        cfg = preset("micro" if a.micro else "quick" if a.quick else "full", a.out, tokens=a.tokens,
                     methods=methods, budgets=budgets, seeds=a.seeds, threads=a.threads)
        run_lab(cfg)
    except ValueError as e:
        print(f"error: --budgets must be comma-separated numbers ({e})", file=sys.stderr)
        return 2
    except BlockformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
