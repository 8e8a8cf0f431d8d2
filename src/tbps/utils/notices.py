"""Keep the libraries' tips, progress bars and notices out of what a person reads.

``tbps`` commands and the benchmark scripts call :func:`quiet_library_notices` once at start.
What it hides says nothing about the run: Lightning's accelerator inventory and advertising tip,
a progress bar for loading a checkpoint's tensors, Lightning's own use of a deprecated torch API,
and its note that modules are in eval mode at the start of training (frozen backbone stages are
kept in eval mode on purpose, so their batch-norm statistics stay the pretrained ones). Warnings
about the user's data, settings or numerics are left alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Messages (regular expressions matched at the start) of warnings that are library noise.
LIBRARY_NOTICES = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r".*does not have many workers which may be a bottleneck",  # num_workers is the user's setting, checked by tbps
)


def quiet_library_notices() -> None:
    """Hide the notices above; idempotent."""
    for pattern in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's rank-zero info lines ("GPU available: ...", "💡 Tip: ...", "Loading
    # `train_dataloader` ..."); its warnings go through the warnings module and still show.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' "Loading weights: 100%|...|" bar: read when transformers is first imported
    # (not imported here: a command that does not need it should not pay for it), or switched off
    # if it already was.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
