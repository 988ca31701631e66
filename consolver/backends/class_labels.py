"""Conditions of class-conditional (and unconditional) image models: prompt text -> class id.

A prompt is one of:

- ``none`` / ``unconditional`` / the empty string (any case): the unconditional condition. For a
  class-conditional model that is its null class (the class guidance subtracts); for an
  unconditional model it is the only valid prompt.
- a class id written as digits (``"207"``);
- a class name from the pipeline's ``id2label`` (``{"207": "golden retriever", ...}``; a value may
  list comma-separated synonyms, as DiT's ImageNet labels do, and each synonym names the class,
  as in ``DiTPipeline.get_label_ids``; the whole value does too) or its ``labels`` mapping
  (``{"golden retriever": 207}``, never split), both read from ``model_index.json``. Exact match
  first, then case-insensitive.

Anything else is a ``ValueError`` listing the closest and some valid names.
"""

from __future__ import annotations

import difflib
from typing import Mapping, Optional

#: Prompt spellings of the unconditional condition (compared stripped and lower-cased).
UNCONDITIONAL_PROMPTS = ("none", "unconditional", "")


def label_map(model_index: Mapping) -> dict[str, int]:
    """``{name: class id}`` from a pipeline's ``model_index.json``: every comma-separated synonym
    of ``id2label`` values and each whole value (so a name that contains a comma still names its
    class), then ``labels`` entries (which win on a clash). Names that spell the unconditional
    condition (``none``, ``unconditional``, empty) are left out: they mean the null class."""
    labels: dict[str, int] = {}
    for key, value in (model_index.get("id2label") or {}).items():
        for name in [*str(value).split(","), str(value)]:
            if name.strip().lower() not in UNCONDITIONAL_PROMPTS:
                labels.setdefault(name.strip(), int(key))
    for name, key in (model_index.get("labels") or {}).items():
        if str(name).strip().lower() not in UNCONDITIONAL_PROMPTS:
            labels[str(name).strip()] = int(key)
    return labels


def first_names(model_index: Mapping) -> list[str]:
    """One name per labelled class, in class-id order: the ``labels`` names when the index has
    them, else the first synonym of every ``id2label`` entry (the unconditional spellings left out)."""
    labels = model_index.get("labels") or {}
    if labels:
        names = sorted(labels, key=lambda n: int(labels[n]))
    else:
        id2label = model_index.get("id2label") or {}
        names = [str(id2label[k]).split(",")[0].strip() for k in sorted(id2label, key=int)]
    return [n for n in names if n.strip().lower() not in UNCONDITIONAL_PROMPTS]


class ClassConditions:
    """Maps prompts to class ids for one model.

    Args:
        num_embeddings: rows of the model's class-embedding table (DiT: ``num_classes + 1``, the
            last row the null class; UNet2DModel: ``num_class_embeds``); ``None`` for an
            unconditional model.
        null_class: the id of the unconditional branch (the guidance baseline); required when
            ``num_embeddings`` is given.
        labels: ``{name: id}`` (see :func:`label_map`).
        model: the model's name, for messages.
    """

    def __init__(self, num_embeddings: Optional[int], null_class: Optional[int], labels: Mapping[str, int],
                 model: str = "?"):
        self.num_embeddings, self.null_class, self.model = num_embeddings, null_class, model
        self.labels = dict(labels)
        self._lower: dict[str, int] = {}
        for name, key in self.labels.items():
            self._lower.setdefault(name.lower(), key)
        if self.conditional:
            if null_class is None or not 0 <= null_class < num_embeddings:
                raise ValueError(f"backend.null_class={null_class} is not a row of {model!r}'s class embedding "
                                 f"(0..{num_embeddings - 1})")
            bad = {n: k for n, k in self.labels.items() if not 0 <= k < num_embeddings or k == null_class}
            if bad:
                some = ", ".join(f"{n!r}: {k}" for n, k in list(bad.items())[:5])
                raise ValueError(f"the class labels of {model!r} name ids that are not classes (outside 0.."
                                 f"{num_embeddings - 1} or the null class {null_class}): {some}")

    @property
    def conditional(self) -> bool:
        return self.num_embeddings is not None

    def class_id(self, prompt: str) -> int:
        """The class id of ``prompt``: the null class for ``none`` (``-1`` for an unconditional
        model, whose only prompt it is). ``ValueError`` for anything else unknown."""
        if not isinstance(prompt, str):
            raise ValueError(f"a condition must be a class name, a class id or 'none', got {prompt!r}")
        text = prompt.strip()
        if text.lower() in UNCONDITIONAL_PROMPTS:
            return self.null_class if self.conditional else -1
        if not self.conditional:
            raise ValueError(f"{self.model!r} is an unconditional model: its only condition is 'none' (or "
                             f"'unconditional'), got {prompt!r}")
        if text.isdigit():
            key = int(text)
            if not 0 <= key < self.num_embeddings or key == self.null_class:
                raise ValueError(f"class id {key} is not a class of {self.model!r}: valid ids are 0.."
                                 f"{self.num_embeddings - 1} except the null class {self.null_class} (use 'none')")
            return key
        if text in self.labels:
            return self.labels[text]
        if text.lower() in self._lower:
            return self._lower[text.lower()]
        raise ValueError(self._unknown(text))

    def _unknown(self, text: str) -> str:
        if not self.labels:
            return (f"{self.model!r} has no class names (no id2label or labels in its model_index.json): write "
                    f"class ids 0..{self.num_embeddings - 1} (except the null class {self.null_class}) or 'none', "
                    f"got {text!r}")
        close = difflib.get_close_matches(text, list(self.labels), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
        some = ", ".join(repr(n) for n in list(self.labels)[:8])
        return (f"unknown class name {text!r} for {self.model!r}{hint}. Valid names include {some}, ... "
                f"({len(self.labels)} names); class ids as digits and 'none' work too")


__all__ = ["ClassConditions", "UNCONDITIONAL_PROMPTS", "first_names", "label_map"]
