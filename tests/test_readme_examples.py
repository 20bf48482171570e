"""The README's Python examples run as written (offline, on the bundled toy models), so the docs cannot drift from
the code. Examples that need a GPU and real checkpoints (they say `.to("cuda")`) are left out."""

import re

import pytest
from conftest import REPO_ROOT


def _examples() -> list[tuple[int, str]]:
    text = (REPO_ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


EXAMPLES = _examples()


@pytest.mark.parametrize("line,code", EXAMPLES, ids=[f"README.md:{n}" for n, _ in EXAMPLES])
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    if '.to("cuda")' in code:
        pytest.skip("needs a GPU and the real checkpoints")
    monkeypatch.chdir(tmp_path)  # examples write files (edited.png, runs/my_session, ...)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_most_examples_run_here():
    assert len(EXAMPLES) >= 7 and sum('.to("cuda")' not in c for _, c in EXAMPLES) >= 7
