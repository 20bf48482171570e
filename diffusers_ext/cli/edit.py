"""``editsteer edit``: the main job. Edits an image with an instruction and writes what a person can look at.

With no arguments it runs offline on the bundled toy editor: a held-out toy-world scene, its instruction, and the
edited result next to the source (and the exact target) in ``editsteer_out/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "edit an image with an instruction (default: a sample scene on the bundled toy editor, offline)"
DEFAULT_MODEL = "toy-kontext-editor"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="input image (default: a held-out toy-world scene)")
    p.add_argument("--instruction", "-p", help="edit instruction (default: the sample scene's instruction)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"weights manifest id or a local pipeline folder (default: {DEFAULT_MODEL})")
    p.add_argument("--out", default="editsteer_out", help="output folder (default: editsteer_out)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; also picks the sample scene")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def describe_models() -> str:
    from ..errors import WeightsError
    from ..weights import load_manifest, resolve

    lines = ["Available models (weights_manifest/):"]
    arts = load_manifest()
    if not arts:
        lines.append("  (none)")
    for art in arts.values():
        try:
            found = resolve(art, allow_download=False)
            where = f"found ({found.source}: {found.path})"
        except WeightsError:
            where = "not found locally"
        lines.append(f"  {art.id:<28} {art.base_model:<16} {art.status:<11} {where}")
    return "\n".join(lines)


def run(args) -> int:
    from ..errors import EditSteerError, WeightsError

    if args.image:  # check the inputs before loading anything
        if not Path(args.image).is_file():
            raise EditSteerError(f"--image {args.image} does not exist")
        if not args.instruction:
            raise EditSteerError("--image needs an --instruction, e.g. --instruction \"make the red circle blue\"")
    if args.steps is not None and args.steps < 1:
        raise EditSteerError("--steps must be at least 1")

    import importlib

    try:
        editor = importlib.import_module("diffusers_ext.toy.editor")
    except ModuleNotFoundError as e:
        if e.name and "diffusers_ext.toy.editor".startswith(e.name):
            print(describe_models(), file=sys.stderr)
            raise EditSteerError("the toy editor is not part of this build yet; nothing to run the edit with") from None
        raise
    try:
        pipe, found = editor.load_toy_editor(args.model, device=args.device)
    except WeightsError:
        print(describe_models(), file=sys.stderr)
        raise
    print(f"model: {args.model} ({found})")

    from ..toy import world as W

    case = None
    if args.image:
        from PIL import Image

        image = W.from_pil(Image.open(args.image))
        instruction = args.instruction
    else:
        case = W.make_case("heldout", seed=args.seed, index=0)
        image = case.source
        instruction = args.instruction or case.instruction
    result = editor.toy_edit(pipe, image, instruction, steps=args.steps, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..bench.harness import write_grid

    W.to_pil(image).save(out / "source.png")
    W.to_pil(result.image).save(out / "output.png")
    row = [image, result.image] + ([case.target] if case is not None and not args.instruction else [])
    write_grid(out / "side_by_side.png", [row], scale=8)
    info = {"model": args.model, "instruction": instruction, "seed": args.seed, "nfe": result.nfe,
            "columns": ["source", "output"] + (["exact target"] if len(row) == 3 else [])}
    if case is not None and not args.instruction:
        from ..toy import metrics as M

        info["metrics"] = M.case_metrics(result.image, case.target, case.mask, case.source)
    (out / "edit.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f'instruction: "{instruction}"')
    print(f"wrote {out / 'side_by_side.png'} ({' | '.join(info['columns'])}), {out / 'output.png'}")
    return 0
