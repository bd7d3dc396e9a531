"""``datagen onpolicy FILE``: run (or resume) the rounds, one line per step, a table at the end."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("onpolicy", help="on-policy distillation rounds: the student samples, the teacher scores "
                                        "its tokens, the student learns the reverse KL")
    r.add_argument("onpolicy_file", help="on-policy file (YAML); see examples/support_tickets_onpolicy.yaml. "
                                         "Run it again to resume")
    r.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    r.set_defaults(func=cmd_onpolicy)


def cmd_onpolicy(args: argparse.Namespace) -> int:
    from datagen.errors import EXIT_INTERRUPTED
    from datagen.onpolicy import load, run
    from datagen.onpolicy.rounds import RoundInterrupted

    cfg = load(args.onpolicy_file)
    err = Console(stderr=True, quiet=args.quiet)
    try:
        rounds = run(cfg, say=lambda line: err.print(line, highlight=False, soft_wrap=True))
    except RoundInterrupted as exc:
        Console(stderr=True).print(str(exc), style="yellow", highlight=False)
        return EXIT_INTERRUPTED
    Console().print(table(rounds))
    return 0


def table(rounds: list[dict]) -> Table:
    t = Table(title="on-policy rounds: teacher-KL of each student on its own samples")
    for col in ("round", "rows", "KL before", "KL after", "steps", "sample s", "score s", "train s"):
        t.add_column(col, justify="right")
    for e in rounds:
        s = e["seconds"]
        t.add_row(str(e["round"]), str(e["rows"].get("accepted", 0)), f"{e['teacher_kl_before']:.4f}",
                  f"{e['teacher_kl_after']:.4f}", str(e["train_steps"]), f"{s['sample']:.0f}", f"{s['score']:.0f}",
                  f"{s['train']:.0f}")
    return t
