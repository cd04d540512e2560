"""The OutlierGradientDetector's defaults, chosen on four model families by AUROC,
test accuracy after filtering, and wall time, each against cleanlab 2.9 on the
same net: every combination of layers (the output layer exact, or all layers
projected to 1024), score (L2 gradient norm, or an isolation forest) and
checkpoints (the final model, or 2, 4 or 8 along training).

    python benchmarks/detector_defaults.py --readme

- ``MLP``: digits, 1200 training samples, the MLP 64-128-10 trained 80 epochs
  (the detection benchmark's setting), 597 clean test digits;
- ``CNN``: the same digits as 8x8 images, the two-block CNN trained 40 epochs;
- ``BERT``: a transformers BERT classifier (2 layers, hidden size 64) on 600 padded
  passages of three topics of the Python documentation (the huggingface
  benchmark's setting), 300 clean test passages;
- ``LoRA``: a peft LoRA fine-tune of a pretrained character transformer on 660
  passages of three topics (the finetune_detection benchmark's setting), 330 clean
  test passages.

30% of the training labels are flipped. Each detector removes that many samples
(``contamination=0.3``); cleanlab (self-confidence on 5-fold cross-validated
probabilities of the same recipe, ``find_label_issues``) decides its own count.
'accuracy': the same recipe, seeded alike, retrained on what is kept and scored on
the clean test set. 'seconds': the detection's wall time, training included
(cleanlab: its five cross-validation fits and its ranking).

The rule for the default: at or above cleanlab's accuracy after filtering, within
0.005 AUROC of the best setting, and at most half cleanlab's wall time, on every
family.

    python benchmarks/detector_defaults.py --auto --readme

measures ``contamination="auto"`` (Otsu's threshold) instead: with the default
detector, on the same four settings with 0%, 10%, 20% and 30% of the labels
flipped, the fraction flagged, and the precision and recall of the flags against
the flipped labels.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from _common import cnn_net, digits_net, emit, markdown_table, parser, pydoc_topic_passages
from detection import detector_row, recipe_self_confidence_row
from finetune import pretrain
from finetune_detection import classifier, lora_net
from huggingface import bert_net, padded_topic_passages

from sktda import OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split

NOISE = 0.3
CHECKPOINTS = (2, 4, 8)  # the final model alone trails by 0.1 AUROC on the MLP and the CNN
CONFIGS = {
    f"{layers}, {score}, {f'{checkpoints} checkpoints' if checkpoints else 'final model'}": dict(
        layers=layers,
        detector=score,
        n_checkpoints=checkpoints,
        proj_dim=1024 if layers == "all" else None,
    )
    for layers, score, checkpoints in itertools.product(["last", "all"], ["l2", "iforest"], CHECKPOINTS)
}


def settings():
    """``{name: (net factory, X, y, X_test, y_test, pretrained)}``, each built once."""
    X, X_test, y, y_test = load_digits_split(n_train=1200, n_test=597, random_state=0)
    out = {
        "MLP": (lambda: digits_net(max_epochs=80), X, y, X_test, y_test, False),
        "CNN": (
            lambda: cnn_net(max_epochs=40),
            X.reshape(-1, 1, 8, 8),
            y,
            X_test.reshape(-1, 1, 8, 8),
            y_test,
            False,
        ),
    }
    X_text, y_text, vocab = padded_topic_passages(300, 48)
    n = len(y_text) * 2 // 3
    out["BERT"] = (lambda: bert_net(vocab, 48, 20), X_text[:n], y_text[:n], X_text[n:], y_text[n:], False)
    X_topics, y_topics, alphabet = pydoc_topic_passages(330, 64)
    n = len(y_topics) * 2 // 3
    base = classifier(pretrain(len(alphabet), 64, 2000, 8), 3, 64)
    out["LoRA"] = (
        lambda: lora_net(base, 20, 2e-3),
        X_topics[:n],
        y_topics[:n],
        X_topics[n:],
        y_topics[n:],
        True,
    )
    return out


def _accuracy(make, X, y, X_test, y_test) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = make().fit(X, y)
    return float((net.predict(X_test) == y_test).mean())


AUTO_NOISE = (0.0, 0.1, 0.2, 0.3)


def auto_contamination(chosen, readme):
    rows = []
    for name, (make, X, y, _, _, pretrained) in settings().items():
        if name not in chosen:
            continue
        for noise in AUTO_NOISE:
            y_noisy, flipped = flip_labels(y, noise, random_state=0) if noise else (y, np.zeros(len(y), bool))
            det = OutlierGradientDetector(make(), contamination="auto", pretrained=pretrained, random_state=0)
            flagged = det.fit(X, y_noisy).labels_ == -1
            precision = flipped[flagged].mean() if flagged.any() else float("nan")
            recall = flagged[flipped].mean() if noise else float("nan")
            rows.append([name, f"{noise:.0%}", flagged.mean(), precision, recall])
            print(rows[-1], flush=True)
    table = markdown_table(["setting", "labels flipped", "flagged", "precision", "recall"], rows) + (
        "\n\nThe default detector with contamination='auto' (Otsu's threshold on the training scores): "
        "the fraction of the training set flagged, and the precision and recall of the flags against "
        "the flipped labels."
    )
    emit("detector_auto", "contamination='auto' across model families and noise rates", table, readme)


def main():
    p = parser(__doc__)
    p.add_argument("--settings", nargs="+", default=["MLP", "CNN", "BERT", "LoRA"])
    p.add_argument("--auto", action="store_true", help="measure contamination='auto' instead")
    args = p.parse_args()
    torch.backends.mha.set_fastpath_enabled(False)  # the LoRA recipe's predictions see its adapters
    if args.auto:
        auto_contamination(args.settings, args.readme)
        return
    results, cleanlab, unfiltered = {}, {}, {}
    for name, (make, X, y, X_test, y_test, pretrained) in settings().items():
        if name not in args.settings:
            continue
        y_noisy, flipped = flip_labels(y, NOISE, random_state=0)

        def kept_accuracy(keep, make=make, X=X, y_noisy=y_noisy, X_test=X_test, y_test=y_test):
            return _accuracy(make, X[keep], y_noisy[keep], X_test, y_test)

        OutlierGradientDetector(make(), pretrained=pretrained).fit(X[:64], y_noisy[:64])  # warm-up
        unfiltered[name] = _accuracy(make, X, y_noisy, X_test, y_test)
        clean_row = recipe_self_confidence_row(make, X, y_noisy, flipped, kept_accuracy)
        if clean_row is not None:
            cleanlab[name] = clean_row[1:]
        for config, params in CONFIGS.items():
            det = OutlierGradientDetector(
                make(), contamination=NOISE, pretrained=pretrained, random_state=0, **params
            )
            results[config, name] = detector_row(det, X, y_noisy, flipped, kept_accuracy)
            print(config, name, np.round(results[config, name], 3), flush=True)
    names = [s for s in args.settings if any(key[1] == s for key in results)]
    best = {s: max(results[c, s][0] for c in CONFIGS) for s in names}

    def verdict(config) -> list:
        """The worst AUROC gap to the best, the smallest accuracy margin over
        cleanlab and the largest time ratio to cleanlab, over the families."""
        gap = max(best[s] - results[config, s][0] for s in names)
        if not cleanlab:
            return [gap, "", "", ""]
        margin = min(results[config, s][4] - cleanlab[s][4] for s in names)
        ratio = max(results[config, s][2] / cleanlab[s][2] for s in names)
        meets = gap <= 0.005 and margin >= 0 and ratio <= 0.5
        return [gap, margin, ratio, "yes" if meets else ""]

    rows = [[config, *verdict(config)] for config in CONFIGS]
    rows.sort(key=lambda row: (row[-1] != "yes", row[1]))
    summary = markdown_table(
        [
            "layers, score, checkpoints",
            "worst AUROC gap",
            "worst accuracy vs cleanlab",
            "worst time vs cleanlab",
            "meets the rule",
        ],
        rows,
    )
    detail = []
    for s in names:
        detail.append([s, "no filtering", "", "", 0, unfiltered[s]])
        if s in cleanlab:
            auroc, _, seconds, removed, accuracy = cleanlab[s]
            detail.append([s, "cleanlab 2.9 self-confidence", auroc, seconds, removed, accuracy])
        for config in CONFIGS:
            auroc, _, seconds, removed, accuracy = results[config, s]
            detail.append([s, config, auroc, seconds, removed, accuracy])
    table = (
        summary
        + f"\n\n{NOISE:.0%} of the training labels flipped. 'worst AUROC gap': the largest distance, over "
        "the families, to the best setting's AUROC; 'worst accuracy vs cleanlab': the smallest difference "
        "of test accuracy after filtering and retraining; 'worst time vs cleanlab': the largest ratio of wall "
        "times (training included). The rule: a gap of at most 0.005, accuracy at or above cleanlab's, at most "
        "half its time, on every family. Rows: those that meet it first, then by AUROC gap.\n\n"
        + markdown_table(["family", "detector", "AUROC", "wall s", "removed", "test accuracy"], detail)
        + "\n\n'all' projects every layer's gradient to 1024 features; checkpoints are evenly spread over "
        "training, scores averaged."
    )
    emit("detector_defaults", "Detector defaults across model families", table, args.readme)


if __name__ == "__main__":
    main()
