"""Which prompts a config knows: the toy worlds' configured sets, else the config's prompt file.

On the toy backends the configured prompt set is part of the model: the unconditional mixture
that guidance pushes away from holds exactly those prompts, so a prompt outside it previews
poorly with every solver. :func:`prompt_listing` says what the set is (``tools/preview.py
--list-prompts``); :func:`warn_unconfigured` warns when a preview asks for another prompt.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

from consolver.config import TOY_BACKENDS, ConfigError

#: How many configured prompts a warning names.
NAMED_IN_WARNING = 3


def toy_prompt_sets(cfg) -> Dict[str, List[str]]:
    """``{"train": [...], "heldout": [...]}``: the configured prompts of a toy config's backend, in
    bank order, computed from ``backend.toy.num_train_prompts`` / ``num_heldout_prompts`` without
    rendering anything. ``toy``: canonical prompts; ``toy_edit``: edit keys
    ``"<source prompt> | <instruction>"``."""
    toy = cfg.backend.toy
    if cfg.backend.name == "toy_edit":
        from consolver.backends.toy_edit import configured_edits

        return {"train": [e.key for e in configured_edits(toy.num_train_prompts, 0)],
                "heldout": [e.key for e in configured_edits(0, toy.num_heldout_prompts)]}
    from consolver.backends.toy import configured_prompts

    train = configured_prompts(toy.num_train_prompts, 0, prompt_offset=toy.prompt_offset)
    heldout = [p for p in configured_prompts(0, toy.num_heldout_prompts, prompt_offset=toy.prompt_offset)
               if p not in train]
    return {"train": train, "heldout": heldout}


def prompt_listing(cfg) -> Dict[str, Any]:
    """What ``--list-prompts`` prints for a config.

    Returns ``{"backend": name}`` plus, for toy backends, ``"train"`` and ``"heldout"`` (lists of
    prompts); for any backend with ``data.prompts`` set, ``"file"`` (its path) and ``"prompts"``
    (its texts, or ``"error"`` when it cannot be read); otherwise ``"message"``, saying that the
    backend takes any prompt and which config key would name a prompt file.
    """
    listing: Dict[str, Any] = {"backend": cfg.backend.name}
    if cfg.backend.name in TOY_BACKENDS:
        listing.update(toy_prompt_sets(cfg))
    if cfg.data.prompts:
        from consolver.data.prompts import load_prompts

        listing["file"] = str(cfg.data.prompts)
        try:
            listing["prompts"] = [r.text for r in load_prompts(cfg.data)]
        except (ConfigError, OSError) as err:
            listing["error"] = str(err)
    elif cfg.backend.name not in TOY_BACKENDS:
        listing["message"] = (f"backend {cfg.backend.name!r} has no prompt list of its own and the config sets no "
                              f"prompt file (data.prompts): any prompt works")
    return listing


def listing_lines(listing: Dict[str, Any]) -> List[str]:
    """Human-readable lines of a :func:`prompt_listing`."""
    lines: List[str] = []
    name = listing["backend"]
    for split, what in (("train", "configured prompts (train split)"),
                        ("heldout", "held-out prompts (configured too; they test generalisation)")):
        if split in listing:
            lines.append(f"{name}: {len(listing[split])} {what}:")
            lines.extend(f"  {p}" for p in listing[split])
    if "file" in listing:
        if "error" in listing:
            lines.append(f"prompt file {listing['file']} (data.prompts) cannot be read: {listing['error']}")
        else:
            lines.append(f"prompt file {listing['file']} (data.prompts): {len(listing['prompts'])} prompts:")
            lines.extend(f"  {p}" for p in listing["prompts"])
    if "message" in listing:
        lines.append(listing["message"])
    return lines



def warn_unconfigured(backend, prompts: Sequence[str], config: Optional[str] = None) -> List[str]:
    """``warnings.warn`` (a ``UserWarning``) when a ``toy`` backend is asked for prompts outside its
    configured set: they are not in the unconditional mixture, so every solver's previews of
    them are poor. The warning names some configured prompts and the ``--list-prompts`` command.
    Returns the offending prompts (canonical); other backends: ``[]``.
    """
    if getattr(backend, "name", None) != "toy":
        return []
    from consolver.backends.toy_scenes import canonical_prompt

    configured = backend.prompts()
    outside = [p for p in dict.fromkeys(canonical_prompt(q) for q in prompts) if p not in configured]
    if outside:
        examples = "; ".join(repr(p) for p in configured[:NAMED_IN_WARNING])
        command = "python tools/preview.py --list-prompts" + (f" --config {config}" if config else "")
        warnings.warn(f"toy prompt(s) {', '.join(repr(p) for p in outside)} are outside the configured set of "
                      f"{len(configured)} prompts, so previews of them are poor with every solver (guidance pushes "
                      f"away from a mixture that does not hold them). Configured prompts include {examples}; "
                      f"list them all with: {command}", UserWarning, stacklevel=2)
    return outside
