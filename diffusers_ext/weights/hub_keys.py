"""Write checkpoints in the Hub's key layout, whichever transformers version saved them.

transformers 5.6 dropped ``CLIPTextModel``'s ``text_model`` wrapper. It still loads the Hub's ``text_model.*`` keys
(through its checkpoint conversion mapping), but its ``save_pretrained`` now writes them without the prefix, and
transformers 5.0-5.5 load such a file as a randomly initialised encoder (every weight MISSING, a load report, no
error). The real checkpoints (``openai/clip-vit-large-patch14``, the ``text_encoder`` of FLUX.1 Kontext) carry the
prefix, so the pack's toy and tiny checkpoints are written with it too: then every transformers the pack supports
loads them, and the tests read the same key layout a user downloads.

Example::

    pipe.save_pretrained(folder)
    hub_key_layout(folder)  # text_encoder/model.safetensors: embeddings.* -> text_model.embeddings.*
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: transformers architectures whose Hub checkpoints prefix every key (the prefix their old wrapper module had).
HUB_KEY_PREFIXES = {"CLIPTextModel": "text_model."}


def _prefix_for(component: Path) -> str | None:
    cfg = component / "config.json"
    if not cfg.is_file():
        return None
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        return None
    return next((HUB_KEY_PREFIXES[a] for a in archs if a in HUB_KEY_PREFIXES), None)


def hub_key_layout(folder: str | os.PathLike) -> list[Path]:
    """Rewrite in place the weights of every component in ``folder`` (the folder itself or its subfolders) whose
    ``config.json`` names an architecture of :data:`HUB_KEY_PREFIXES` and whose keys lack that prefix. Tensors and
    file metadata are kept; a shard index's ``weight_map`` is renamed with its shards. Returns the files rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(folder)
    rewritten: list[Path] = []
    for component in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        prefix = _prefix_for(component)
        if prefix is None:
            continue
        for path in sorted(component.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                metadata = f.metadata()
                keys = list(f.keys())
                if all(k.startswith(prefix) for k in keys):
                    continue
                tensors = {k if k.startswith(prefix) else prefix + k: f.get_tensor(k) for k in keys}
            save_file(tensors, path, metadata=metadata)
            rewritten.append(path)
        for index in component.glob("*.safetensors.index.json"):
            data = json.loads(index.read_text())
            weight_map = data.get("weight_map", {})
            if any(not k.startswith(prefix) for k in weight_map):
                data["weight_map"] = {k if k.startswith(prefix) else prefix + k: v for k, v in weight_map.items()}
                index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                rewritten.append(index)
    return rewritten
