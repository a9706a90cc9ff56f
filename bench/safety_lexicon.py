"""The prompt word list on its two benchmarks (tests/data/safety): how many evasions it blocks and
how many ordinary prompts it flags, per technique, with the misses and false alarms listed.

    python bench/safety_lexicon.py              # this checkout
    PYTHONPATH=/path/to/old/src python bench/safety_lexicon.py   # another version, for a before/after
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from viscpm.safety import LexiconChecker

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "safety"


def read_rows(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line.strip() and not line.startswith("#")]


def measure(checker: LexiconChecker, evasions_file: str, ordinary_file: str) -> None:
    evasions = read_rows(evasions_file)
    ordinary = [row[0] for row in read_rows(ordinary_file)]
    blocked, total = Counter(), Counter()
    missed = []
    for technique, term, prompt in evasions:
        total[technique] += 1
        if checker(prompt).flagged:
            blocked[technique] += 1
        else:
            missed.append((technique, term, prompt))
    flagged = [(prompt, checker(prompt).reason) for prompt in ordinary if checker(prompt).flagged]
    print(f"{evasions_file}: evasions blocked {sum(blocked.values())} / {len(evasions)}")
    for technique in total:
        print(f"  {technique:<28} {blocked[technique]:>3} / {total[technique]}")
    print(f"{ordinary_file}: ordinary prompts flagged {len(flagged)} / {len(ordinary)}")
    for technique, term, prompt in missed:
        print(f"  missed ({technique}, {term}): {prompt!r}")
    for prompt, reason in flagged:
        print(f"  false alarm: {prompt!r}: {reason}")


def main() -> int:
    import viscpm

    print(f"viscpm from {Path(viscpm.__file__).parent}")
    checker = LexiconChecker.default()
    measure(checker, "evasions.tsv", "ordinary.txt")
    measure(checker, "evasions_heldout.tsv", "ordinary_heldout.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
