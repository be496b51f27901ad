"""The ``triton`` backend: the Triton launchers under the backend contract of ``composite``."""

from .triton.attention_bwd import attention_backward
from .triton.attention_fwd import attention_forward

__all__ = ["attention_forward", "attention_backward"]
