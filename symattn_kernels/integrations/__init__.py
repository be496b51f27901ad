"""Integrations with model libraries. Each lives in its own module and imports its library only
there: ``symattn_kernels.integrations.hf`` needs ``transformers`` (``pip install symattn_kernels[hf]``)."""
