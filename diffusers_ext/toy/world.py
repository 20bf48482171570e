"""The toy editing world: procedural scenes of coloured shapes, edit instructions with exact ground truth.

Scenes are 32x32 RGB images: a plain background and up to four shapes, each in its own cell of a 3x3 grid. An edit
changes the scene and yields the exact target image and the exact edit mask (the pixels the edit may change; the
target equals the source everywhere else). Every case is a pure function of ``(split, seed, index)``.

Families: ``recolour``, ``remove``, ``add``, ``move``, ``resize``, ``background``.

Splits. The *combination* of an edit is ``(family, colour, shape)``: the colour the instruction asks for (the new
colour of a recolour, the colour of an added object, the colour of the object removed/moved/resized) and the shape;
for background changes ``(family, old background, new background)``. A fixed rule holds out a quarter of the
combinations of every family; the ``train`` split never contains them and the ``heldout`` split contains only them.
Each colour, shape and background still appears in training for every family, so held-out cases test composition.

Example::

    from diffusers_ext.toy import world
    case = world.make_case("heldout", seed=0, index=3)
    case.instruction, case.source.shape, case.mask.sum()
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 32
GRID = 3
CELL = 10
MARGIN = 1  # cell (r, c) spans pixels [MARGIN + CELL*r, MARGIN + CELL*(r+1))
MAX_OBJECTS = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 50),
    "cyan": (40, 210, 220),
    "magenta": (210, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (120, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 2.5, "large": 4.0}  # half-extent in pixels
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
FAMILIES = ("recolour", "remove", "add", "move", "resize", "background")
#: Families used in multi-turn sequences by default: a background change touches every pixel, which would leave no
#: untouched region to measure drift on.
SEQUENCE_FAMILIES = ("recolour", "remove", "add", "move", "resize")

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {colour} {shape} {new}", "turn the {colour} {shape} {new}",
                 "change the {colour} {shape} to {new}"),
    "remove": ("remove the {colour} {shape}", "delete the {colour} {shape}"),
    "add": ("add a {new_colour} {new_shape} at the {where}", "put a {new_colour} {new_shape} at the {where}"),
    "move": ("move the {colour} {shape} to the {where}",),
    "resize": ("make the {colour} {shape} {bigger_smaller}",),
    "background": ("change the background to {new}", "make the background {new}"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int
    size: str = "large"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def find(self, colour: str, shape: str) -> int:
        for i, o in enumerate(self.objects):
            if o.colour == colour and o.shape == shape:
                return i
        raise KeyError(f"{colour} {shape}")

    @property
    def free_cells(self) -> list[int]:
        used = {o.cell for o in self.objects}
        return [c for c in range(GRID * GRID) if c not in used]

    def caption(self) -> str:
        """A deterministic description, e.g. 'a large red circle at the top left on a black background'."""
        objs = sorted(self.objects, key=lambda o: o.cell)
        parts = [f"a {o.size} {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}" for o in objs]
        body = " and ".join(parts) if parts else "nothing"
        return f"{body} on a {self.background} background"


@dataclass(frozen=True)
class Edit:
    family: str
    instruction: str
    key: tuple[str, str, str]  # the combination used for the train/held-out split
    before: Scene
    after: Scene
    target_index: int | None = None  # index of the edited object in ``before`` (None for add/background)


# ----------------------------------------------------------------------------------------------------------------
# rendering


@lru_cache(maxsize=None)
def _footprint(shape: str, cell: int, size: str) -> np.ndarray:
    r, c = divmod(cell, GRID)
    cy = MARGIN + CELL * r + CELL / 2
    cx = MARGIN + CELL * c + CELL / 2
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    dy, dx = yy - cy, xx - cx
    h = SIZES[size]
    if shape == "square":
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "circle":
        m = dx**2 + dy**2 <= (h + 0.25) ** 2
    elif shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= h + 0.5
    elif shape == "triangle":  # apex up: width grows from the top edge to the bottom edge
        m = (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2 + 0.25)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def footprint(obj: Obj) -> np.ndarray:
    """Boolean HxW mask of the pixels an object covers."""
    return _footprint(obj.shape, obj.cell, obj.size)


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 HxWx3 image."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        img[footprint(o)] = COLOURS[o.colour]
    return img


def objects_mask(scene: Scene) -> np.ndarray:
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for o in scene.objects:
        m |= footprint(o)
    return m


def edit_mask(edit: Edit) -> np.ndarray:
    """The pixels the edit may change: old and new footprints of the edited object, or the background."""
    if edit.family == "background":
        return ~objects_mask(edit.before)
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    before = set(edit.before.objects)
    after = set(edit.after.objects)
    for o in before ^ after:
        m |= footprint(o)
    return m


# ----------------------------------------------------------------------------------------------------------------
# the split rule


def combination_held_out(key: tuple[str, str, str]) -> bool:
    """The fixed rule: a quarter of every family's combinations are held out of training."""
    family, a, b = key
    f = FAMILIES.index(family)
    if family == "background":
        names = list(BACKGROUNDS)
        return (names.index(a) + 2 * names.index(b) + f) % 4 == 0 and a != b
    return (list(COLOURS).index(a) + SHAPES.index(b) + f) % 4 == 0


def held_out_combinations(family: str) -> list[tuple[str, str, str]]:
    if family == "background":
        keys = [(family, a, b) for a in BACKGROUNDS for b in BACKGROUNDS if a != b]
    else:
        keys = [(family, c, s) for c in COLOURS for s in SHAPES]
    return [k for k in keys if combination_held_out(k)]


def _split_ok(split: str, key) -> bool:
    if split == "train":
        return not combination_held_out(key)
    if split == "heldout":
        return combination_held_out(key)
    if split == "any":
        return True
    raise ValueError(f"unknown split {split!r}; use 'train', 'heldout' or 'any'")


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _rng(*parts) -> np.random.Generator:
    h = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def random_scene(rng: np.random.Generator, n_min: int = 1, n_max: int = 3) -> Scene:
    n = int(rng.integers(n_min, n_max + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objs = tuple(
        Obj(shape=pairs[k][1], colour=pairs[k][0], cell=int(cell), size="large" if rng.random() < 0.7 else "small")
        for k, cell in zip(chosen, cells)
    )
    return Scene(background=str(rng.choice(list(BACKGROUNDS))), objects=objs)


def _with(scene: Scene, i: int, obj: Obj | None) -> Scene:
    objs = list(scene.objects)
    if obj is None:
        objs.pop(i)
    else:
        objs[i] = obj
    return replace(scene, objects=tuple(objs))


def possible_edits(scene: Scene, family: str) -> list[dict]:
    """Every edit of ``family`` that applies to ``scene``, as dicts of the fields that define it."""
    out = []
    present = {(o.colour, o.shape) for o in scene.objects}
    if family == "background":
        out = [{"new": b} for b in BACKGROUNDS if b != scene.background]
    elif family == "add":
        if len(scene.objects) < MAX_OBJECTS:
            out = [{"colour": c, "shape": s, "cell": cell} for c in COLOURS for s in SHAPES if (c, s) not in present
                   for cell in scene.free_cells]
    else:
        for i, o in enumerate(scene.objects):
            if family == "recolour":
                out += [{"i": i, "new": c} for c in COLOURS if c != o.colour and (c, o.shape) not in present]
            elif family == "remove":
                out.append({"i": i})
            elif family == "move":
                out += [{"i": i, "cell": cell} for cell in scene.free_cells]
            elif family == "resize":
                out.append({"i": i})
    return out


def apply_edit(scene: Scene, family: str, spec: dict, template: int = 0) -> Edit:
    """Build the :class:`Edit` (instruction, key, scene after) for one entry of :func:`possible_edits`."""
    t = _TEMPLATES[family]
    tmpl = t[template % len(t)]
    if family == "background":
        after = replace(scene, background=spec["new"])
        text = tmpl.format(new=spec["new"])
        return Edit(family, text, (family, scene.background, spec["new"]), scene, after)
    if family == "add":
        obj = Obj(spec["shape"], spec["colour"], spec["cell"], "large")
        after = replace(scene, objects=scene.objects + (obj,))
        text = tmpl.format(new_colour=obj.colour, new_shape=obj.shape, where=CELL_NAMES[obj.cell])
        return Edit(family, text, (family, obj.colour, obj.shape), scene, after)
    i = spec["i"]
    o = scene.objects[i]
    if family == "recolour":
        after = _with(scene, i, replace(o, colour=spec["new"]))
        text = tmpl.format(colour=o.colour, shape=o.shape, new=spec["new"])
        key = (family, spec["new"], o.shape)
    elif family == "remove":
        after = _with(scene, i, None)
        text = tmpl.format(colour=o.colour, shape=o.shape)
        key = (family, o.colour, o.shape)
    elif family == "move":
        after = _with(scene, i, replace(o, cell=spec["cell"]))
        text = tmpl.format(colour=o.colour, shape=o.shape, where=CELL_NAMES[spec["cell"]])
        key = (family, o.colour, o.shape)
    elif family == "resize":
        new_size = "small" if o.size == "large" else "large"
        after = _with(scene, i, replace(o, size=new_size))
        text = tmpl.format(colour=o.colour, shape=o.shape, bigger_smaller="bigger" if new_size == "large" else "smaller")
        key = (family, o.colour, o.shape)
    else:
        raise ValueError(f"unknown family {family!r}")
    return Edit(family, text, key, scene, after, target_index=i)


def sample_edit(scene: Scene, rng: np.random.Generator, split: str = "any",
                families: tuple[str, ...] = FAMILIES) -> Edit | None:
    """A uniformly random family (among those with an allowed edit), then a uniformly random allowed edit."""
    order = list(families)
    rng.shuffle(order)
    for fam in order:
        allowed = []
        for spec in possible_edits(scene, fam):
            e = apply_edit(scene, fam, spec)
            if _split_ok(split, e.key):
                allowed.append(spec)
        if allowed:
            spec = allowed[int(rng.integers(len(allowed)))]
            return apply_edit(scene, fam, spec, template=int(rng.integers(len(_TEMPLATES[fam]))))
    return None


# ----------------------------------------------------------------------------------------------------------------
# cases and sequences


@dataclass
class EditCase:
    """One single-turn edit with exact ground truth. Images are uint8 HxWx3, ``mask`` is bool HxW."""

    id: str
    split: str
    instruction: str
    family: str
    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    source_caption: str
    target_caption: str
    edit: Edit = field(repr=False)

    def to_json(self) -> dict:
        return {"id": self.id, "split": self.split, "instruction": self.instruction, "family": self.family,
                "key": list(self.edit.key), "source_caption": self.source_caption,
                "target_caption": self.target_caption, "mask_pixels": int(self.mask.sum())}


def make_case(split: str = "heldout", seed: int = 0, index: int = 0, families: tuple[str, ...] = FAMILIES) -> EditCase:
    """Case ``index`` of ``split`` for ``seed``: deterministic; a different seed gives different cases.

    Families rotate with the index (so any run of ``len(families)`` consecutive cases has one of each); the scene
    is resampled until it admits an edit of that family in the split.
    """
    family = families[(index + seed) % len(families)]
    for attempt in range(10000):
        rng = _rng("case", split, seed, index, attempt)
        scene = random_scene(rng)
        edit = sample_edit(scene, rng, split, (family,))
        if edit is not None:
            break
    else:  # pragma: no cover - every random scene admits some edit of every split
        raise RuntimeError("could not sample an edit")
    src, tgt, mask = render(edit.before), render(edit.after), edit_mask(edit)
    return EditCase(id=f"{split[0]}{seed}-{index:05d}", split=split, instruction=edit.instruction,
                    family=edit.family, source=src, target=tgt, mask=mask,
                    source_caption=edit.before.caption(), target_caption=edit.after.caption(), edit=edit)


def make_cases(n: int, split: str = "heldout", seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[EditCase]:
    return [make_case(split, seed, i, families) for i in range(n)]


@dataclass
class EditSequence:
    """A multi-turn edit: ``images[0]`` is the source, ``images[t]`` the exact target after turn ``t`` (1-based);
    ``masks[t-1]`` and ``instructions[t-1]`` belong to turn ``t``. ``untouched`` marks the pixels that no turn of
    the whole sequence may change (fixed over turns, so the drift curve is measured on one region)."""

    id: str
    split: str
    scenes: list[Scene]
    edits: list[Edit]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    untouched: np.ndarray

    @property
    def instructions(self) -> list[str]:
        return [e.instruction for e in self.edits]

    @property
    def turns(self) -> int:
        return len(self.edits)

    @property
    def source(self) -> np.ndarray:
        return self.images[0]

    def to_json(self) -> dict:
        return {"id": self.id, "split": self.split, "turns": self.turns, "instructions": self.instructions,
                "families": [e.family for e in self.edits], "keys": [list(e.key) for e in self.edits],
                "untouched_pixels": int(self.untouched.sum())}


def make_sequence(split: str = "heldout", seed: int = 0, index: int = 0, turns: int = 12,
                  families: tuple[str, ...] = SEQUENCE_FAMILIES) -> EditSequence:
    """A ``turns``-long chain of edits. In the held-out split every turn's combination is held out of training."""
    if not 1 <= turns <= 64:
        raise ValueError(f"turns must be in [1, 64], got {turns}")
    for attempt in range(1000):
        rng = _rng("seq", split, seed, index, attempt)
        scene = random_scene(rng, 2, 3)
        scenes, edits = [scene], []
        for _ in range(turns):
            e = sample_edit(scenes[-1], rng, split, families)
            if e is None:
                break
            edits.append(e)
            scenes.append(e.after)
        if len(edits) == turns:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not sample a sequence")
    masks = [edit_mask(e) for e in edits]
    touched = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for m in masks:
        touched |= m
    return EditSequence(id=f"{split[0]}{seed}-seq{index:05d}", split=split, scenes=scenes, edits=edits,
                        images=[render(s) for s in scenes], masks=masks, untouched=~touched)


def vocabulary() -> list[str]:
    """Every word that appears in instructions and captions (for building tokenizers)."""
    words: set[str] = set()
    for fam in _TEMPLATES.values():
        for t in fam:
            words.update(w for w in t.split() if not w.startswith("{"))
    words.update(COLOURS)
    words.update(BACKGROUNDS)
    words.update(SHAPES)
    words.update(SIZES)
    for n in CELL_NAMES:
        words.update(n.split())
    words.update(["bigger", "smaller", "a", "at", "the", "and", "on", "background", "nothing"])
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------------
# conversions


def to_tensor(img: np.ndarray):
    """uint8 HxWx3 (or NxHxWx3) -> float tensor in [-1, 1], (N)x3xHxW."""
    import torch

    t = torch.tensor(img, dtype=torch.float32).div(127.5).sub(1.0)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def from_tensor(t) -> np.ndarray:
    """Float tensor in [-1, 1], (N)x3xHxW -> uint8 (N)xHxWx3 (rounded, clipped)."""
    x = t.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    x = x.permute(1, 2, 0) if x.ndim == 3 else x.permute(0, 2, 3, 1)
    return x.numpy()


def to_pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(img, np.uint8))


def from_pil(img, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image as uint8 HxWx3 of the world's size (resized with nearest neighbour when needed)."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img, np.uint8).copy()
