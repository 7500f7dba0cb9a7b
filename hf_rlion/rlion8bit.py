"""RLion with 8-bit blockwise-quantised momentum (not implemented yet: see the 8-bit issue)."""

from __future__ import annotations


class RLion8bit:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("RLion8bit is not implemented yet in this version of hf_rlion; use optim='rlion'")


class PagedRLion8bit(RLion8bit):
    pass


def keep_embeddings_in_32bit(model) -> None:
    """Ask for 32-bit state on nn.Embedding weights, as Trainer does for bitsandbytes' 8-bit optimizers."""
