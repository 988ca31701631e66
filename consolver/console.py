"""What the command-line tools print: progress, results and warnings to act on, nothing else.

:func:`setup_console` (called first by every tool, and cheap to import: no torch) routes
``logging`` so that this package's and the tool's own INFO lines show as plain progress lines,
other libraries' INFO chatter (Lightning's accelerator banner, matplotlib's font cache, ...)
is dropped, and everyone's warnings and errors still show. User-facing warnings raised with
``warnings.warn`` print as one ``warning: ...`` line (no source line echoed), and notices of
other libraries that a user cannot act on (deprecations inside torch/torchrl/Lightning) are
filtered by message. ``--verbose`` on a tool shows everything.
"""

from __future__ import annotations

import logging
import sys
import warnings

#: Other libraries' warnings that say nothing a consolver user can act on (matched by message).
QUIET_WARNINGS = (
    r".*_pytree.*",  # torch/tensordict internal deprecations
    r".*treespec.*LeafSpec.*",
    r".*val_dataloader.*validation_step.*",  # the validation loop is off by design
    r".*does not have many workers.*",  # toy shards load in the main process on purpose
    r".*`srun` command is available.*",
    r".*litlogger.*",
)


class _ConsoleFilter(logging.Filter):
    """Pass this package's and the tool's records at INFO and above, others' at WARNING and above."""

    def __init__(self, names):
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == n or record.name.startswith(n + ".") for n in self.names)


class _ConsoleHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, so log lines never break a progress bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    out = file if file is not None else sys.stderr
    kind = "" if category is UserWarning else f" ({category.__name__})"
    try:
        from tqdm import tqdm

        tqdm.write(f"warning: {message}{kind}", file=out)
    except OSError:
        pass


def setup_console(tool: str, verbose: bool = False) -> logging.Logger:
    """Configure logging and warnings for a command-line tool; returns the tool's logger.

    Args:
        tool: the tool's logger name (e.g. ``"fit"``); its INFO lines show like this package's.
        verbose: show every library's INFO lines and every warning, in the long format.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):  # ours from an earlier call (a tool's main() called twice)
        if isinstance(handler, _ConsoleHandler):
            root.removeHandler(handler)
    handler = _ConsoleHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.INFO)
    else:
        handler.setFormatter(_ConsoleFormatter())
        handler.addFilter(_ConsoleFilter(("consolver", tool)))
        root.setLevel(logging.INFO)
        warnings.showwarning = _show_warning
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    root.addHandler(handler)
    logging.getLogger("consolver").setLevel(logging.INFO)
    return logging.getLogger(tool)


def rate_text(count: int, seconds: float, unit: str = "sample") -> str:
    """A throughput a person can read at any speed: ``"37.2 samples/s"`` when fast, ``"4.61 s/sample"``
    when slower than one per second (never ``"0.0 samples/s"``); ``"no samples"`` for ``count = 0``."""
    if count <= 0:
        return f"no {unit}s"
    rate = count / max(seconds, 1e-9)
    if rate >= 1:
        return f"{rate:.3g} {unit}s/s" if rate < 100 else f"{rate:.0f} {unit}s/s"
    return f"{seconds / count:.3g} s/{unit}"


#: Libraries that put their own console handler on their logger at import (Lightning prints every
#: INFO line twice with it, torchrl writes to stdout): their records go through ours instead.
OWN_HANDLERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "torchrl")


def quiet_libraries() -> None:
    """Import Lightning and torchrl (the caller needs them next anyway) and route their loggers
    through the console handler of :func:`setup_console`, whose filter then drops their INFO lines."""
    import lightning  # noqa: F401 - its import adds the handler removed here
    import torchrl  # noqa: F401

    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True


__all__ = ["QUIET_WARNINGS", "quiet_libraries", "rate_text", "setup_console"]
