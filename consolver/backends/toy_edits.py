"""The toy editing world's edits: a source scene plus an instruction gives an edited scene.

Instructions (objects are named by shape; a source scene's shapes are distinct)::

    make the <shape> <color>            recolor, e.g. "make the circle blue"
    move the <shape> to the <position>  move, e.g. "move the square to the left"
    turn the <shape> into a <shape>     reshape, e.g. "turn the circle into a triangle"

An edit's key is ``"<source prompt> | <instruction>"``. Split: an edit is held out iff its source
or its edited scene contains a held-out (color, shape) pair (``toy_scenes.HELDOUT_PAIRS``);
:func:`edit_list` enumerates each split in a fixed order, independent of any seed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from consolver.backends import toy_scenes
from consolver.backends.toy_scenes import COLORS, POSITIONS, SHAPES, Scene, SceneObject

_CATALOGUE_SEED = 20261124
MAX_SOURCE_OBJECTS = 2
INSTRUCTION_FORMS = ("make the <shape> <color>", "move the <shape> to the <position>", "turn the <shape> into a <shape>")
_RECOLOR = re.compile(r"^make the (\w+) (\w+)$")
_MOVE = re.compile(r"^move the (\w+) to the (\w+)$")
_RESHAPE = re.compile(r"^turn the (\w+) into an? (\w+)$")


class Edit(NamedTuple):
    source: Scene
    instruction: str
    target: Scene

    @property
    def key(self) -> str:
        return edit_key(toy_scenes.scene_prompt(self.source), self.instruction)


def edit_key(source_prompt: str, instruction: str) -> str:
    return f"{source_prompt} | {normalize(instruction)}"


def normalize(instruction: str) -> str:
    return " ".join(instruction.lower().strip().rstrip(".").split())


def _check(kind: str, word: str, valid, instruction: str) -> None:
    if word not in valid:
        raise ValueError(f"unknown {kind} {word!r} in toy edit instruction {instruction!r}; "
                         f"vocabulary: {toy_scenes.vocabulary()}")


def parse_instruction(instruction: str) -> tuple[str, str, str]:
    """``(op, shape, value)`` with op ``recolor`` | ``move`` | ``reshape``; ``ValueError`` for an
    instruction that does not parse (listing the forms) or an unknown word (listing the vocabulary)."""
    text = normalize(instruction)
    for regex, op, kind, valid in ((_RECOLOR, "recolor", "color", COLORS), (_MOVE, "move", "position", POSITIONS),
                                   (_RESHAPE, "reshape", "shape", SHAPES)):
        match = regex.match(text)
        if match:
            shape, value = match.groups()
            _check("shape", shape, SHAPES, instruction)
            _check(kind, value, valid, instruction)
            return op, shape, value
    raise ValueError(f"cannot parse toy edit instruction {instruction!r}; forms: {'; '.join(INSTRUCTION_FORMS)}")


def apply_instruction(source: Scene, instruction: str) -> Scene:
    """The edited scene. ``ValueError`` for an instruction that does not parse (listing the forms),
    names a shape the scene lacks, or moves an object onto another one."""
    op, shape, value = parse_instruction(instruction)
    objects = list(source)
    hits = [i for i, o in enumerate(objects) if o.shape == shape]
    if len(hits) != 1:
        raise ValueError(f"toy edit instruction {instruction!r} needs exactly one {shape} in the reference scene "
                         f"{toy_scenes.scene_prompt(source)!r}, found {len(hits)}")
    i, obj = hits[0], objects[hits[0]]
    if op == "recolor":
        objects[i] = obj._replace(color=value)
    elif op == "move":
        if any(o.position == value for j, o in enumerate(objects) if j != i):
            raise ValueError(f"toy edit instruction {instruction!r} moves the {shape} onto another object")
        objects[i] = obj._replace(position=value)
    else:
        objects[i] = obj._replace(shape=value)
    return toy_scenes.canonical_scene(objects)


def edit_split(edit: Edit) -> str:
    return "heldout" if "heldout" in (toy_scenes.scene_split(edit.source), toy_scenes.scene_split(edit.target)) else "train"


def random_edit(rng: np.random.Generator) -> Edit:
    """A random edit of a random 1..MAX_SOURCE_OBJECTS-object scene with distinct shapes that changes it."""
    colors, positions = list(COLORS), list(POSITIONS)
    while True:
        n = int(rng.integers(1, MAX_SOURCE_OBJECTS + 1))
        shapes = rng.choice(len(SHAPES), size=n, replace=False)
        where = rng.choice(len(positions), size=n, replace=False)
        source = toy_scenes.canonical_scene([SceneObject(colors[rng.integers(len(colors))], SHAPES[s], positions[p])
                                             for s, p in zip(shapes, where)])
        obj = source[int(rng.integers(len(source)))]
        op = int(rng.integers(3))
        if op == 0:
            instruction = f"make the {obj.shape} {colors[rng.integers(len(colors))]}"
        elif op == 1:
            instruction = f"move the {obj.shape} to the {positions[rng.integers(len(positions))]}"
        else:
            instruction = f"turn the {obj.shape} into a {SHAPES[rng.integers(len(SHAPES))]}"
        try:
            target = apply_instruction(source, instruction)
        except ValueError:
            continue
        if target != source:
            return Edit(source, instruction, target)


def edit_list(split: str, n: int) -> list[Edit]:
    """The first ``n`` distinct edits of ``split`` in a fixed order (prefix-stable)."""
    toy_scenes._check_split(split)
    rng = np.random.default_rng([_CATALOGUE_SEED, toy_scenes.SPLITS.index(split)])
    seen: dict[str, Edit] = {}
    while len(seen) < n:
        edit = random_edit(rng)
        if edit_split(edit) == split:
            seen.setdefault(edit.key, edit)
    return list(seen.values())


__all__ = ["Edit", "INSTRUCTION_FORMS", "apply_instruction", "parse_instruction", "edit_key", "edit_list", "edit_split", "normalize",
           "random_edit"]
