"""LDS, identical-class rate and time of sktda's TRAK, IF and Grad-Cos with 1, 5 and 10
models on a CNN over digits as (n, 1, 8, 8) images, with and without RelatIF
normalisation; dattri 0.3.0's TRAK and kronfluence 1.0.1's EK-FAC on the same
trained models (when installed, see benchmarks/_peers.py).

    python benchmarks/cnn_digits.py --readme
"""

from __future__ import annotations

from _common import (
    HEADER,
    NOTES,
    VARIANT_NOTE,
    VMAP_VARIANT,
    cnn_net,
    compare,
    compare_parser,
    digits_data,
    emit,
    markdown_table,
)


def main():
    p = compare_parser(__doc__)
    args = p.parse_args()

    X_train, X_test, y_train, y_test = digits_data()
    data = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8), y_train, y_test
    net = cnn_net()
    rows, truth_seconds = compare(
        net,
        data,
        methods=["trak", "if", "grad_cos", "kfac", "ekfac"],
        sizes=args.sizes,
        proj_dim=args.proj_dim,
        n_subsets=args.n_subsets,
        n_jobs=args.n_jobs,
        variants=[VMAP_VARIANT],
    )
    n_params = sum(p.numel() for p in net.initialize().module_.parameters())
    table = markdown_table(HEADER, rows) + (
        f"\n\nCNN of {n_params} parameters; ground truth: {args.n_subsets} CNNs retrained on 50% subsets "
        f"({truth_seconds:.0f} s). " + VARIANT_NOTE + NOTES
    )
    emit("cnn_digits", "LDS on digit images with a CNN (1000 train / 200 test)", table, args.readme)


if __name__ == "__main__":
    main()
