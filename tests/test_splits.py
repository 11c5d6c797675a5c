import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from gissl.data import split_indices, stratified_split_indices
from gissl.errors import DataError


def _sklearn_reference(n, seed=42):
    # SSL4GIE split_ids (docs/ssl4gie-study.md §2.1): two train_test_split calls with the same test count
    idx = np.arange(n)
    test_size = int(round(0.1 * n))
    train, test = train_test_split(idx, test_size=test_size, random_state=seed)
    train, val = train_test_split(train, test_size=test_size, random_state=seed)
    return train, val, test


@pytest.mark.parametrize("n", list(range(6, 60)) + [101, 250, 612, 1000, 1001, 4000])
def test_split_equals_sklearn(n):
    ours = split_indices(n)
    for a, b in zip(ours, _sklearn_reference(n)):
        assert a.dtype == np.int64
        np.testing.assert_array_equal(a, b)


def test_split_sizes_and_disjoint():
    tr, va, te = split_indices(1000)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)
    assert len(split_indices(612)[2]) == 61
    allidx = np.concatenate([tr, va, te])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(1000))
    # another seed gives another split, still equal to sklearn's
    for a, b in zip(split_indices(300, seed=7), _sklearn_reference(300, seed=7)):
        np.testing.assert_array_equal(a, b)


def test_split_too_small():
    with pytest.raises(DataError, match="at least 6"):
        split_indices(5)


def test_stratified_keeps_rare_classes_in_val_and_test():
    labels = np.array([0] * 100 + [1] * 9 + [2] * 3 + [3] * 2)
    tr, va, te = stratified_split_indices(labels)
    assert len(set(tr) | set(va) | set(te)) == len(labels)
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    for c in (0, 1, 2):
        assert (labels[va] == c).any() and (labels[te] == c).any()
    assert (labels[te] == 0).sum() == 10
    assert (labels[tr] == 3).sum() == 2  # too rare to split: all in train
    again = stratified_split_indices(labels)
    for a, b in zip((tr, va, te), again):
        np.testing.assert_array_equal(a, b)
