"""The package imports without ComfyUI; the repo root can be loaded as a ComfyUI custom node only inside ComfyUI."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _py(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_library_imports_without_comfyui():
    code = (
        "import importlib, sys\n"
        "import diffusers_ext\n"
        "for m in ('weights', 'toy', 'bench', 'tiny', 'cli'):\n"
        "    importlib.import_module('diffusers_ext.' + m)\n"
        "import diffusers_ext.cli as c; c.build_parser()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'comfy_nodes')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = _py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_star_import_and_lazy_submodules():
    """Every name in ``diffusers_ext.__all__`` exists (``from diffusers_ext import *`` works); unknown names are an
    AttributeError, as ``hasattr`` expects."""
    r = _py("from diffusers_ext import *\nimport diffusers_ext\nassert not hasattr(diffusers_ext, 'nope')\n"
            "assert all(hasattr(diffusers_ext, n) for n in diffusers_ext.__all__)\nprint('ok')\n")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_repo_root_init_is_inert_without_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('editsteer_root', {str(REPO_ROOT / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not hasattr(m, 'comfy_entrypoint')\n"
        "print('ok')\n"
    )
    r = _py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_comfy_nodes_import_fails_clearly_without_comfyui():
    r = _py("import comfy_nodes")
    assert r.returncode != 0 and "comfy_api" in r.stderr


def test_dependencies_never_pull_a_cuda_torch():
    import tomllib

    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"] + [d for extra in meta.get("optional-dependencies", {}).values() for d in extra]
    names = [d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower() for d in deps]
    for banned in ("torchvision", "torchaudio", "kornia", "spandrel"):
        assert banned not in names
    torch_req = [d for d in deps if d.lower().startswith("torch")]
    assert torch_req and all("+cu" not in d for d in torch_req)
    # the version this machine installs (2.13.0, CPU) satisfies the pin, so pip never replaces it
    from packaging.requirements import Requirement

    assert "2.13.0" in Requirement(torch_req[0]).specifier


def test_requirements_txt_is_pyproject_without_torch():
    """ComfyUI-Manager and the Comfy Registry install requirements.txt, not pyproject.toml's dependencies."""
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert reqs == [d for d in deps if not d.lower().startswith("torch")]


def test_floor_constraints_pin_every_lower_bound():
    """tests/constraints-floor.txt pins each dependency at pyproject's lower bound (torch in a comment: its PyPI
    builds are CUDA builds), so running the suite on it tests the versions the pack claims to support."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    deps = [Requirement(d) for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
            ["dependencies"]]
    pins = {}
    for line in (REPO_ROOT / "tests" / "constraints-floor.txt").read_text().splitlines():
        text = line.removeprefix("# ").strip() if line.startswith("# torch==") else line.split("#")[0].strip()
        if text:
            req = Requirement(text)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    floors = {}
    for req in deps:
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req}: one '>=' lower bound expected"
        floors[canonicalize_name(req.name)] = lower[0]
    assert pins == floors


def test_ci_finds_both_readme_commands():
    """``.ci/run`` runs the README's test command, then the floor one; both markers must precede a bash block, and
    the floor command must install from the constraints file."""
    import re

    text = (REPO_ROOT / "README.md").read_text()
    commands = {}
    for marker in ("<!-- test-command -->", "<!-- floor-test-command -->"):
        m = re.search(re.escape(marker) + r"\n```bash\n(.+)\n```", text)
        assert m, f"README.md: no bash block right after {marker}"
        commands[marker] = m.group(1)
        assert marker in (REPO_ROOT / ".ci" / "run").read_text()
    assert "-c tests/constraints-floor.txt" in commands["<!-- floor-test-command -->"]
    assert all("torch==2.13.0" in c and "-m pytest" in c for c in commands.values())


def test_requires_python_is_what_the_lowest_diffusers_needs():
    """The pack's metadata admits no Python its lowest diffusers cannot install on (3.10 against diffusers 0.42's
    ``>=3.11``): pip then says "Package 'editsteer' requires a different Python", not only that no diffusers fits."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (floor,) = [s for r in map(Requirement, project["dependencies"]) if r.name == "diffusers" for s in r.specifier]
    installed = Version(importlib.metadata.version("diffusers"))
    if installed.release[:2] != Version(floor.version).release[:2]:
        pytest.skip(f"installed diffusers {installed} is not the {floor.version} series")
    theirs = SpecifierSet(importlib.metadata.metadata("diffusers")["Requires-Python"])
    ours = SpecifierSet(project["requires-python"])
    for minor in range(8, 16):
        python = Version(f"3.{minor}")
        assert python not in ours or python in theirs, f"requires-python admits {python}; diffusers needs {theirs}"


def _setuptools_config() -> dict:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_ships_in_the_wheel():
    """pyproject lists packages explicitly (the mapped weights_manifest package is invisible to packages.find):
    a new subpackage missing from the list would be silently left out of wheels."""
    cfg = _setuptools_config()
    listed = set(cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO_ROOT).parts)
        for top in ("diffusers_ext", "comfy_nodes")
        for p in (REPO_ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts and "assets" not in p.parts
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    mapped = cfg["package-dir"]
    for pkg in listed - on_disk:
        assert pkg in mapped and (REPO_ROOT / mapped[pkg]).is_dir(), f"{pkg} is listed but has no folder"


def test_wheel_carries_the_manifest_and_the_bundled_weights():
    """The package data globs match every manifest entry and every bundled weights file of the checkout."""
    import fnmatch

    cfg = _setuptools_config()
    data = cfg["package-data"]
    manifest_dir = REPO_ROOT / cfg["package-dir"]["diffusers_ext.weights_manifest"]
    entries = sorted(p.name for p in manifest_dir.glob("*.json"))
    assert entries and all(any(fnmatch.fnmatch(e, g) for g in data["diffusers_ext.weights_manifest"]) for e in entries)
    assets = [p.relative_to(REPO_ROOT / "diffusers_ext").as_posix()
              for p in (REPO_ROOT / "diffusers_ext" / "assets").rglob("*") if p.is_file()]
    assert assets and all(any(fnmatch.fnmatch(a, g) for g in data["diffusers_ext"]) for a in assets)
