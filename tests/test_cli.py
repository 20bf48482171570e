"""The command line's clear error paths and `weights list/verify` (run as a real subprocess)."""

import json
import os
import subprocess
import sys

import torch

from conftest import REPO_ROOT
from diffusers_ext.weights import entry_from_folder, save_safetensors, write_entry


def _run(*args, env=None, cwd=None):
    e = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "diffusers_ext", *args], capture_output=True, text=True, env=e,
                          cwd=cwd or REPO_ROOT, timeout=300)


def _manifest(tmp_path):
    src = tmp_path / "weights" / "demo-critic"
    save_safetensors({"w": torch.ones(4)}, src / "demo.safetensors")
    art = entry_from_folder(src, id="demo-critic", description="demo", kind="safetensors", base_model="flux-kontext",
                            license="apache-2.0", status="unpublished", repo_id="editsteer/demo-critic",
                            produced_by="editsteer train critic")
    mdir = tmp_path / "manifest"
    write_entry(art, mdir)
    return mdir, src


def test_weights_list_and_verify(tmp_path):
    mdir, src = _manifest(tmp_path)
    env = {"EDITSTEER_MANIFEST_DIR": str(mdir), "EDITSTEER_WEIGHTS_DIR": str(tmp_path / "weights")}
    r = _run("weights", "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["id"] == "demo-critic" and rows[0]["status"] == "unpublished"
    assert rows[0]["found"] == "EDITSTEER_WEIGHTS_DIR"
    r = _run("weights", "verify", "demo-critic", env=env)
    assert r.returncode == 0 and "ok" in r.stdout
    f = src / "demo.safetensors"
    data = bytearray(f.read_bytes())
    data[-2] ^= 1
    f.write_bytes(bytes(data))
    r = _run("weights", "verify", env=env)
    assert r.returncode == 1 and "sha256 mismatch" in r.stdout
    assert "Traceback" not in r.stderr


def test_missing_weights_offline_is_a_clear_error(tmp_path):
    mdir, _ = _manifest(tmp_path)
    r = _run("weights", "verify", "demo-critic", env={"EDITSTEER_MANIFEST_DIR": str(mdir)})
    assert r.returncode == 1 and "no local copy found" in r.stdout
    r = _run("weights", "verify", "no-such-id", env={"EDITSTEER_MANIFEST_DIR": str(mdir)})
    assert r.returncode == 2 and "unknown weight artifact 'no-such-id'" in r.stderr and "Traceback" not in r.stderr


def test_publish_dry_run_plans_the_upload(tmp_path):
    mdir, _ = _manifest(tmp_path)
    env = {"EDITSTEER_MANIFEST_DIR": str(mdir), "EDITSTEER_WEIGHTS_DIR": str(tmp_path / "weights")}
    r = _run("weights", "publish", "demo-critic", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "would publish demo-critic -> editsteer/demo-critic" in r.stdout


def test_edit_with_missing_image_is_a_clear_error(tmp_path):
    r = _run("edit", "--image", str(tmp_path / "nope.png"), "--instruction", "make it red", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_options_without_a_subcommand_go_to_edit():
    from diffusers_ext.cli import with_default_subcommand

    assert with_default_subcommand([]) == ["edit"]
    assert with_default_subcommand(["--debug"]) == ["--debug", "edit"]
    assert with_default_subcommand(["--seed", "3"]) == ["edit", "--seed", "3"]
    assert with_default_subcommand(["--debug", "--out", "x"]) == ["--debug", "edit", "--out", "x"]
    for argv in (["bench", "base"], ["--help"], ["--version"], ["bnech"]):
        assert with_default_subcommand(argv) == argv
    r = _run("--image", "/no/such.png", "--instruction", "make it red")  # was: "invalid choice: '/no/such.png'"
    assert r.returncode == 2 and r.stderr.startswith("error:") and "such.png" in r.stderr, r.stderr


def test_help_and_version():
    r = _run("--help")
    assert r.returncode == 0 and "weights" in r.stdout and "bench" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and "editsteer" in r.stdout
