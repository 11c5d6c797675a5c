"""Train/val/test splits: SSL4GIE's random split (exactly) and a stratified alternative."""

import numpy as np

from gissl.errors import DataError


def _sklearn_shuffle_split(n, n_test, seed):
    """Same result as ``sklearn.model_selection.train_test_split(arange(n), test_size=n_test,
    random_state=seed)``: ShuffleSplit draws one ``RandomState(seed).permutation(n)``; its first
    ``n_test`` entries are the test part, the rest (in permutation order) the train part."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def split_indices(n, seed=42):
    """SSL4GIE's split of ``n`` samples (reference ``split_ids``, docs/ssl4gie-study.md §2.1).

    ``test_size = int(round(0.1 * n))``; ``train_test_split`` with ``random_state=seed`` gives
    (train, test); the train part is split again with the same test count and seed into
    (train, val). Returns ``(train, val, test)`` int64 index arrays in sklearn's shuffled order
    (note: the reference function returns them as ``(train, test, val)``).
    Kvasir-SEG (n=1000): 800/100/100; CVC-ClinicDB (n=612): 490/61/61.
    """
    n = int(n)
    # Same float expression as the reference so banker's rounding matches (e.g. n=25 -> 2).
    n_test = int(round(0.1 * n))
    if n_test < 1 or n - 2 * n_test < 1:
        raise DataError(f"a train/val/test split needs at least 6 samples (10% each for val and test), "
                        f"got {n}; add images to the dataset folder")
    idx = np.arange(n)
    train, test = _sklearn_shuffle_split(n, n_test, seed)
    train2, val = _sklearn_shuffle_split(len(train), n_test, seed)
    return idx[train[train2]].astype(np.int64), idx[train[val]].astype(np.int64), test.astype(np.int64)


def stratified_split_indices(labels, seed=42):
    """Per-class 80/10/10 split (``--split stratified``): the reference's unstratified split can
    leave rare HyperKvasir classes (ileum: 9 images, hemorrhoids: 6) out of val/test.

    For each class with ``n_c`` samples, val and test get ``max(1, round(0.1 * n_c))`` samples each
    when ``n_c >= 3`` (a class of 1-2 images stays in train). Deterministic in ``seed``.
    labels: (N,) ints. Returns ``(train, val, test)`` sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError("stratified split needs a non-empty 1-D list of labels")
    rng = np.random.RandomState(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = max(1, int(round(0.1 * len(idx)))) if len(idx) >= 3 else 0
        parts[2].append(idx[:k])
        parts[1].append(idx[k:2 * k])
        parts[0].append(idx[2 * k:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
