"""Captions of the MLN toy: the toy world's full scene description, or a partial one that names some objects only.

A real edit prompt (PIE-Bench's source and target prompts) describes the subject of the edit, not every pixel, so
regenerating from the target prompt redraws what the prompt leaves open; that is the loss of background MLN is
measured against. The toy world's full caption (:meth:`~diffusers_ext.toy.world.Scene.caption`) names every object
with its size and cell: a toy Switti trained well enough to make edits regenerates the whole scene from it, and
regeneration becomes an oracle. So the toy Switti also learns partial captions (:func:`partial_caption`), and the
toy bench can caption an edit by its subject only (:func:`focus_captions`: the edited object and the background).

Example::

    from diffusers_ext.toy import world as W
    case = W.make_case("heldout", seed=0, index=0)
    focus_captions(case.edit)
    # ('a large magenta diamond at the center on a white background',
    #  'a large green diamond at the center on a white background')
"""

from __future__ import annotations

from ..toy import world as W

#: Caption modes of the toy bench (``editsteer bench mln|regen --captions``).
CAPTION_MODES = ("focus", "full")


def caption(background: str, objects=()) -> str:
    """The toy world's caption of ``objects`` on ``background``; with no object, just ``'a <colour> background'``
    (a partial caption leaves the objects open; the world's own ``'nothing on ...'`` means an empty scene)."""
    if not objects:
        return f"a {background} background"
    return W.Scene(background, tuple(objects)).caption()


def partial_caption(scene: W.Scene, rng, p_full: float = 0.5, p_keep: float = 0.5) -> str:
    """The full caption with probability ``p_full``; otherwise a caption of a random subset of the objects (each
    kept with probability ``p_keep``), in the world's order and wording."""
    if rng.random() < p_full:
        return scene.caption()
    return caption(scene.background, [o for o in scene.objects if rng.random() < p_keep])


def focus_captions(edit: W.Edit) -> tuple[str, str]:
    """``(source, target)`` captions that name only what the edit is about: the edited object before and after
    (nothing for the side where it does not exist: the source of an add, the target of a remove) and the
    background; other objects are left out, as a real edit prompt leaves most of the image out."""
    before, after = edit.before, edit.after
    if edit.family == "background":
        return caption(before.background), caption(after.background)
    if edit.family == "add":
        return caption(before.background), caption(after.background, after.objects[-1:])
    i = edit.target_index  # recolour, move, resize keep the object at index i; remove drops it
    new = [] if edit.family == "remove" else [after.objects[i]]
    return caption(before.background, [before.objects[i]]), caption(after.background, new)


def case_captions(case, mode: str = "focus") -> tuple[str, str]:
    """The ``(source, target)`` captions of a toy :class:`~diffusers_ext.toy.world.EditCase` in ``mode``."""
    if mode == "full":
        return case.source_caption, case.target_caption
    if mode == "focus":
        return focus_captions(case.edit)
    raise ValueError(f"caption mode {mode!r}: expected one of {CAPTION_MODES}")
