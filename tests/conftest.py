"""Suite-wide setup: everything the tests write stays inside pytest's temporary folder.

The synthetic datasets (``$GISSL_CACHE``) and torch.compile's kernel cache would otherwise land
in ``~/.cache/gissl`` and ``/tmp/torchinductor_<user>``; pytest removes its folders of passed
tests at the end (``tmp_path_retention_policy`` in pyproject.toml).
"""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _writes_stay_in_tmp(tmp_path_factory):
    names = {"GISSL_CACHE": "gissl-cache", "TORCHINDUCTOR_CACHE_DIR": "inductor-cache"}
    saved = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
