import os
import pickle

import pytest
import torch

from gissl.checkpoint import load_file, rng_state, save_atomic, set_rng_state
from gissl.errors import CheckpointError


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "sub" / "ck.pth"
    save_atomic({"w": torch.ones(2), "epoch": 3}, path)
    assert load_file(path)["epoch"] == 3
    assert [p for p in os.listdir(path.parent) if p.startswith(".tmp")] == []


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "ck.pth"
    save_atomic({"v": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"v": lambda: 0}, path)  # unpicklable: the write fails midway
    assert load_file(path)["v"] == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_code_carrying_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(CheckpointError):
        load_file(tmp_path / "raw.pkl")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not a checkpoint at all", "truncated or is not")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_file(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "nope.pth")


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np
    state = rng_state()
    save_atomic({"rng": state}, tmp_path / "r.pth")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_file(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
