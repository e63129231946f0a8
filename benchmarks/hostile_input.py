"""How many careless and hostile inputs ran, and how many behaved, by group.

Runs the hostile-input corpus of tests/reliability/ (files named test_hostile_*.py, plus the
bad-input corpus in test_bad_input.py) in this process with pytest and counts each case once:
a case behaved when its test passed. Run by hand:

    .venv/bin/python benchmarks/hostile_input.py [-k EXPR]

A case is a parametrised test id, e.g. `test_hostile_files.py::test_generate_refuses_an_output_it_must_not_write[fifo]`.

Measured on 2 quiet CPU cores, 2026-12-02: 205 cases ran, 205 behaved, in 86 s:
bad input files 15/15, one line never a traceback 66/66, nothing deleted or overwritten 47/47,
validated before the first request 53/53, multi-byte cuts 5/5, nothing leaked 19/19.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ("test_hostile_*.py", "test_bad_input.py")
GROUPS = {
    "test_hostile_files.py": "nothing deleted or overwritten",
    "test_hostile_secrets.py": "nothing leaked",
    "test_hostile_input.py": "validated before the first request; input bombs",
    "test_hostile_cli.py": "one line, never a traceback; flags validated",
    "test_hostile_multibyte.py": "answers cut inside a multi-byte character",
    "test_bad_input.py": "bad input files (earlier corpus)",
}


class Tally:
    """A pytest plugin that counts the outcome of each test's call phase per file."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()
        self.behaved: Counter[str] = Counter()
        self.misbehaved: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        """Count a case once: its call phase, or a setup that failed."""
        if report.when == "call" or (report.when == "setup" and not report.passed):
            file = Path(report.nodeid.split("::")[0]).name
            self.ran[file] += 1
            if report.passed:
                self.behaved[file] += 1
            else:
                self.misbehaved.append(report.nodeid)


def main() -> int:
    """Run the corpus and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="only the cases whose id matches this pytest expression")
    args = parser.parse_args()
    import pytest

    os.chdir(ROOT)
    files = sorted({str(p.relative_to(ROOT)) for pattern in CORPUS for p in (ROOT / "tests" / "reliability").glob(pattern)})
    tally = Tally()
    pytest_args = ["-q", "-p", "no:cacheprovider", "--no-header", "-rN", *files] + (["-k", args.k] if args.k else [])
    pytest.main(pytest_args, plugins=[tally])
    print()
    print(f"{'group':58} {'ran':>5} {'behaved':>8}")
    for file in sorted(tally.ran):
        print(f"{GROUPS.get(file, file):58} {tally.ran[file]:5} {tally.behaved[file]:8}")
    total, good = sum(tally.ran.values()), sum(tally.behaved.values())
    print(f"{'all hostile cases':58} {total:5} {good:8}")
    for nodeid in tally.misbehaved:
        print(f"  misbehaved: {nodeid}")
    return 0 if total and total == good else 1


if __name__ == "__main__":
    sys.exit(main())
