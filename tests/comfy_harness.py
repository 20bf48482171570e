"""Real-ComfyUI test harness. Import its fixtures in a test module::

    from comfy_harness import comfy, comfy_server, requires_comfyui  # noqa: F401

Every test that uses them is skipped, with the reason, unless ``COMFYUI_PATH`` points to a ComfyUI checkout whose
requirements are installed in the running Python. Nothing here mocks ComfyUI: the in-process fixture loads the pack
through ``nodes.load_custom_node`` exactly as ComfyUI's startup does and runs API-format prompts through ComfyUI's
own ``PromptExecutor``; the server fixture starts ``main.py --cpu`` on a loopback port and talks HTTP to it.

Run them here with::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests -k comfy
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import pkgutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PACK_DIR_NAME = "EditSteer"


def _torchvision_loads() -> bool:
    """ComfyUI v0.3.x imports torchvision at start-up (comfy.sd); it must load in this Python."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return r.returncode == 0


def comfy_skip_reason() -> str | None:
    if not COMFYUI_PATH:
        return ("COMFYUI_PATH is not set: ComfyUI-level tests need a ComfyUI checkout "
                "(e.g. Comfy-Org/ComfyUI) with its requirements installed in this Python")
    if not (Path(COMFYUI_PATH) / "comfy" / "model_management.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no comfy/model_management.py)"
    missing = [m for m in ("einops", "torchsde", "aiohttp", "yaml", "safetensors", "av") if importlib.util.find_spec(m) is None]
    if missing:
        return f"ComfyUI's requirements are not installed in this Python (missing: {', '.join(missing)})"
    if not _torchvision_loads():
        return "torchvision does not load in this Python, and ComfyUI imports it at start-up (see README, Testing)"
    return None


requires_comfyui = pytest.mark.skipif(comfy_skip_reason() is not None, reason=comfy_skip_reason() or "")


class _HeadlessServer:
    """What ComfyUI's executor needs from its server object; records the messages it sends."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class PromptResult:
    success: bool
    outputs: dict = field(default_factory=dict)  # node id -> that node's output slots (ComfyUI's cache entries)
    ui: dict = field(default_factory=dict)  # node id -> UI outputs (saved images, text)
    messages: list = field(default_factory=list)
    error: dict | None = None

    def output(self, node_id: str, slot: int = 0):
        """The value of one output slot (unwrapped from ComfyUI's per-list-item nesting)."""
        entry = self.outputs[str(node_id)]
        entry = getattr(entry, "outputs", entry)
        value = entry[slot]
        return value[0] if isinstance(value, list) and len(value) == 1 else value


@dataclass
class ComfyEnv:
    path: Path
    base: Path  # temp base folder: models/, input/, output/, temp/
    nodes: object  # ComfyUI's nodes module
    executor: object

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_prompt(self, prompt: dict, *, validate: bool = True) -> PromptResult:
        """Validate and execute an API-format prompt in-process; returns outputs and errors."""
        import execution

        prompt_id = uuid.uuid4().hex
        if validate:
            valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
            if not valid[0]:
                return PromptResult(False, error={"validation": valid[1], "node_errors": valid[3]})
            outputs = valid[2]
        else:
            outputs = [k for k, v in prompt.items() if getattr(self.node_class(v["class_type"]), "OUTPUT_NODE", False)]
        self.executor.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": "editsteer-tests"}, outputs)
        cache = self.executor.caches.outputs
        got = {}
        for nid in prompt:
            try:
                v = cache.get(nid)
            except Exception:
                v = None
            if v is not None:
                got[nid] = v
        err = None
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                err = data
        return PromptResult(self.executor.success, got, dict(self.executor.history_result.get("outputs", {})),
                            list(self.executor.server.messages), err)


def _alias_pack_modules(link: str) -> None:
    """ComfyUI imports the pack as ``<its folder path>.comfy_nodes`` (the pack's own ``__init__`` imports the nodes
    relatively, so that they never take another pack's top-level ``comfy_nodes``). The tests import
    ``comfy_nodes.<module>``: point those names at the modules ComfyUI loaded, so that both see one copy (one
    ``CriticPatch`` class, one model cache)."""
    prefix = link.replace(".", "_x_") + ".comfy_nodes"
    assert prefix in sys.modules, f"the pack's nodes were not imported as {prefix}"
    for info in pkgutil.iter_modules(sys.modules[prefix].__path__):  # also those the nodes import lazily
        importlib.import_module(f"{prefix}.{info.name}")
    for name, module in list(sys.modules.items()):
        if name == prefix or name.startswith(prefix + "."):
            sys.modules["comfy_nodes" + name[len(prefix):]] = module


#: A pack in the common shape that clashed with EditSteer's old absolute import: its folder first on sys.path and a
#: top-level package ``comfy_nodes`` of its own. Its name sorts before EditSteer, so ComfyUI loads it first.
OTHER_PACK_NODE = "OtherPackNode"


def _other_pack(folder: Path) -> None:
    (folder / "comfy_nodes").mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(
        "import os, sys\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "from comfy_nodes import NODE_CLASS_MAPPINGS\n")
    (folder / "comfy_nodes" / "__init__.py").write_text(
        "class OtherNode:\n"
        "    @classmethod\n"
        "    def INPUT_TYPES(cls):\n"
        "        return {'required': {}}\n"
        "    RETURN_TYPES = ()\n"
        "    FUNCTION = 'run'\n"
        "    CATEGORY = 'other'\n"
        "    def run(self):\n"
        "        return ()\n"
        f"NODE_CLASS_MAPPINGS = {{'{OTHER_PACK_NODE}': OtherNode}}\n")


def _link_pack(custom_nodes: Path) -> Path:
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyEnv:
    """ComfyUI imported in-process (CPU), built-in extra nodes loaded, EditSteer loaded as a custom node."""
    reason = comfy_skip_reason()
    if reason:
        pytest.skip(reason)
    path = Path(COMFYUI_PATH).resolve()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    base = tmp_path_factory.mktemp("comfy-base")
    import folder_paths

    for sub in ("input", "output", "temp", "models/editsteer"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("editsteer", str(base / "models" / "editsteer"), is_default=True)
    import utils.extra_config  # noqa: F401  as main.py does: nodes.py puts comfy/ first on sys.path, whose utils.py
    # would otherwise shadow ComfyUI's utils package and make comfy_extras/nodes_images.py (ImageStitch...) fail
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    link = _link_pack(base / "custom_nodes")
    ok = asyncio.run(nodes.load_custom_node(str(link), set(), module_parent="custom_nodes"))
    assert ok, "ComfyUI failed to load the EditSteer pack (see the log above)"
    _alias_pack_modules(str(link))
    executor = execution.PromptExecutor(_HeadlessServer(), cache_type=False)
    return ComfyEnv(path, base, nodes, executor)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    base: Path
    log: Path
    proc: subprocess.Popen

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        """POST an API-format prompt, wait until it finished, return its /history entry."""
        body = json.dumps({"prompt": prompt, "client_id": "editsteer-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt rejected the workflow: {e.read().decode()}") from None
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited; log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s; log:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    """`python main.py --cpu` on a loopback port with EditSteer in its custom_nodes folder."""
    reason = comfy_skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy-server")
    _link_pack(base / "custom_nodes")
    _other_pack(base / "custom_nodes" / "AAA_OtherPack")
    (base / "models" / "editsteer").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = base / "server.log"
    cmd = [sys.executable, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch"]
    pp = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pp}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log, proc)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI server exited at start:\n{log.read_text()[-4000:]}")
        try:
            server.get("/system_stats")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"ComfyUI server did not start in time:\n{log.read_text()[-4000:]}")
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def load_workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / name).read_text())
