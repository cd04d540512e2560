"""Refresh README.md's headline table from the saved benchmark results
(benchmarks/results/NAME.md, each carrying the command that made it), for runs made
without --readme. The documentation reads the saved results directly.

    python benchmarks/publish.py
"""

from __future__ import annotations

from _common import write_headline

if __name__ == "__main__":
    write_headline()
