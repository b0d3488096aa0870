"""Triton kernels and their launchers, installed as ``fastmtl.kernels``.

Importing a module here imports triton (except ``_tables``: torch only, shared with the
compiled extension's launchers); ``fastmtl.backend`` does so lazily, only when the Triton
backend is selected. ``TRITON_INTERPRET=1`` must be set before that import.
"""
