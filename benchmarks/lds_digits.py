"""LDS, identical-class rate and wall time of every sktda method with 1, 5 and 10
independent models on digits (with and without RelatIF normalisation), and dattri
0.3.0's TRAK and kronfluence 1.0.1's EK-FAC on the same trained models.

    python benchmarks/lds_digits.py --readme

The peers are benchmark extras (see benchmarks/_peers.py); without them their rows
are skipped. dattri's TRAK inverts ``Phi^T Phi + regularization * I``; with more
projected dimensions than training samples it needs a regularization, and we give
it the best of a grid, chosen on the same ground truth (the same is true of
sktda's default damping, chosen once on this benchmark).
"""

from __future__ import annotations

from _common import (
    HEADER,
    NOTES,
    VARIANT_NOTE,
    VMAP_VARIANT,
    compare,
    compare_parser,
    digits_data,
    digits_net,
    emit,
    markdown_table,
)


def main():
    p = compare_parser(__doc__)
    args = p.parse_args()

    rows, truth_seconds = compare(
        digits_net(),
        digits_data(),
        methods=["trak", "if", "tracin", "grad_dot", "grad_cos", "kfac", "ekfac"],
        sizes=args.sizes,
        proj_dim=args.proj_dim,
        n_subsets=args.n_subsets,
        n_jobs=args.n_jobs,
        variants=[VMAP_VARIANT],
    )
    table = markdown_table(HEADER, rows) + (
        f"\n\nGround truth: {args.n_subsets} models retrained on 50% subsets ({truth_seconds:.0f} s). "
        + VARIANT_NOTE
        + NOTES
    )
    emit("lds_digits", "LDS on digits (1000 train / 200 test, MLP 64-128-10)", table, args.readme)


if __name__ == "__main__":
    main()
