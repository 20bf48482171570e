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


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(path[: m.start()] + alt + path[m.end():])]


def test_result_files_the_readme_names_exist():
    """Every ``docs/results/...`` or ``workflows/...`` path the README cites (globs and ``{a,b}`` expanded) is in the
    checkout, so a number in the README always points at the JSON that holds it."""
    text = (REPO_ROOT / "README.md").read_text()
    cited = sorted(set(re.findall(r"`((?:docs/results|workflows)/[^`\s]*)`", text)))
    assert len(cited) >= 10
    missing = [p for c in cited for p in _expand_braces(c) if not list(REPO_ROOT.glob(p.rstrip("/")))]
    assert not missing, f"README cites files that are not in the checkout: {missing}"
