"""Generative attribution: a character-level transformer language model on passages
of the Python documentation that ships with Python (``pydoc_data.topics``). The
attributed target is each held-out passage's log-likelihood; LDS, time, with and
without RelatIF normalisation, for TRAK, IF and Grad-Cos with 1, 5 and 10 models,
and dattri 0.3.0's TRAK and kronfluence 1.0.1's EK-FAC on the same trained models.

    python benchmarks/sequence.py --readme
"""

from __future__ import annotations

from _common import (
    HEADER,
    NOTES,
    VARIANT_NOTE,
    VMAP_VARIANT,
    compare,
    compare_parser,
    emit,
    kronfluence_layers_variant,
    lm_net,
    markdown_table,
    pydoc_passages,
)


def main():
    p = compare_parser(__doc__, n_subsets=50)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--length", type=int, default=32)
    args = p.parse_args()

    X, y, alphabet = pydoc_passages(args.n_train + args.n_test, args.length)
    n = args.n_train
    net = lm_net(len(alphabet), args.length)
    rows, truth_seconds = compare(
        net,
        (X[:n], X[n:], y[:n], y[n:]),
        methods=["trak", "if", "grad_cos", "kfac", "ekfac"],
        sizes=args.sizes,
        proj_dim=args.proj_dim,
        n_subsets=args.n_subsets,
        n_jobs=args.n_jobs,
        variants=[VMAP_VARIANT, kronfluence_layers_variant(net)],
        kind="sequence",
    )
    n_params = sum(p.numel() for p in net.initialize().module_.parameters())
    table = markdown_table(HEADER, rows) + (
        f"\n\n{args.n_train} training and {args.n_test} held-out passages of {args.length} characters; "
        f"transformer of {n_params} parameters; ground truth: {args.n_subsets} models retrained on 50% "
        f"subsets ({truth_seconds:.0f} s), measured by the held-out passages' log-likelihood. "
        + VARIANT_NOTE
        + "bergson 2.5.1 loads its models with transformers' AutoModelForCausalLM, which this hand-written "
        "transformer is not: its rows are in the GPT-2 table. " + NOTES
    )
    emit(
        "sequence",
        "Generative attribution: a transformer language model on Python's docs",
        table,
        args.readme,
    )


if __name__ == "__main__":
    main()
