"""Copy saved benchmark tables (benchmarks/results/NAME.md, each carrying the command
that made it) into their README blocks, for runs made without --readme.

    python benchmarks/publish.py normalize cnn_digits
"""

from __future__ import annotations

import sys

from _common import RESULTS, write_block


def main(names: list[str]) -> None:
    for name in names:
        write_block(name, (RESULTS / f"{name}.md").read_text().split("\n", 2)[2])  # without its heading


if __name__ == "__main__":
    main(sys.argv[1:])
