"""kNN, top-k and the linear probe against independent references: a brute-force loop, a
hand count, and scikit-learn's LogisticRegression on the same features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

from simclr_core.evaluate import fit_logistic_regression, topk_accuracy
from simclr_core.knn import knn_accuracy, knn_predict


def _brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature) -> list[int]:
    """Wu et al.'s weighted vote, one query at a time, in plain Python."""
    predictions = []
    for query in queries.tolist():
        q_norm = math.sqrt(sum(v * v for v in query))
        neighbours = []
        for row, label in zip(bank.tolist(), bank_labels.tolist()):
            similarity = sum(a * b for a, b in zip(query, row)) / (q_norm * math.sqrt(sum(v * v for v in row)))
            neighbours.append((similarity, label))
        neighbours.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for similarity, label in neighbours[:k]:
            votes[label] += math.exp(similarity / temperature)
        predictions.append(max(range(num_classes), key=votes.__getitem__))
    return predictions


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (5, 0.1), (20, 0.5), (500, 0.1)])  # 500 > the bank: all of it
def test_knn_equals_a_brute_force_weighted_vote(k, temperature):
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(120, 8, generator=generator)
    bank_labels = torch.randint(0, 4, (120,), generator=generator)
    queries = torch.randn(37, 8, generator=generator)
    expected = _brute_force_knn(bank, bank_labels, queries, 4, k, temperature)
    assert knn_predict(bank, bank_labels, queries, 4, k=k, temperature=temperature, chunk=10).tolist() == expected
    # the bank read in chunks smaller than k, and than the bank: the running top-k is the whole bank's
    assert knn_predict(bank, bank_labels, queries, 4, k=k, temperature=temperature, chunk=10, bank_chunk=7).tolist() == expected
    query_labels = torch.tensor(expected)
    query_labels[:5] = (query_labels[:5] + 1) % 4  # five wrong on purpose
    assert knn_accuracy(bank, bank_labels, queries, query_labels, 4, k=k, temperature=temperature) == pytest.approx(32 / 37)


def test_topk_accuracy_equals_a_hand_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 7, (50,), generator=generator)
    for k in (1, 2, 5, 7, 10):
        hits = 0
        for row, label in zip(logits.tolist(), labels.tolist()):
            ranked = sorted(range(len(row)), key=lambda column: -row[column])
            hits += label in ranked[:k]
        assert topk_accuracy(logits, labels, k) == pytest.approx(hits / 50), k
    assert topk_accuracy(logits, labels, 7) == 1.0


@pytest.mark.parametrize("l2", [1e-1, 1e-2])
def test_linear_probe_equals_scikit_learns_logistic_regression(l2):
    """Ours minimises mean cross-entropy + (l2 / 2)||W||^2 on standardised features, bias not
    penalised; scikit-learn's lbfgs minimises C * sum of cross-entropies + ||W||^2 / 2, the
    intercept not penalised: the same problem with C = 1 / (N * l2)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 1.5
    labels = rng.integers(0, 3, 240)
    features = centres[labels] + rng.normal(size=(240, 6))
    ours = fit_logistic_regression(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), 3, l2, max_iter=500)
    standardized = ours.standardize(torch.tensor(features, dtype=torch.float32)).double().numpy()
    reference = SklearnLogisticRegression(C=1 / (len(labels) * l2), tol=1e-10, max_iter=10000).fit(standardized, labels)
    with torch.no_grad():
        our_probabilities = torch.softmax(ours(torch.tensor(features, dtype=torch.float32)), dim=1).double().numpy()
    np.testing.assert_allclose(our_probabilities, reference.predict_proba(standardized), atol=2e-4)
    # softmax weights are defined up to a per-feature constant: compare them centred over classes
    ours_w = ours.linear.weight.detach().double().numpy()
    np.testing.assert_allclose(ours_w - ours_w.mean(0), reference.coef_ - reference.coef_.mean(0), atol=2e-3)
