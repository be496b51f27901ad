"""The ``triton`` backend: the Triton launchers under the backend contract of ``backends.torch``."""

from ..triton.attention_bwd import attention_backward
from ..triton.attention_fwd import attention_forward
from ..triton.lowrank import lowrank_backward, lowrank_forward

__all__ = ["attention_forward", "attention_backward", "lowrank_forward", "lowrank_backward"]
