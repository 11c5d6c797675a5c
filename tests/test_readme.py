"""The README's claims point at tests that exist: every ``tests/<file>.py::<test>`` it names is a
test function in that file, and every ``tests/<file>.py`` it names is there (so a renamed or
deleted test cannot leave a claim standing without its evidence)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_test_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    missing = []
    for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text):
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name and not re.search(rf"^def {name}\(", file.read_text(), flags=re.M):
            missing.append(f"{path}::{name}")
    assert not missing, sorted(set(missing))
