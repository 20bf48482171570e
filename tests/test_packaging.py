"""The package imports without ComfyUI; the repo root can be loaded as a ComfyUI custom node only inside ComfyUI."""

import os
import subprocess
import sys

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
