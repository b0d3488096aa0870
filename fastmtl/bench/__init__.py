"""The ``fastmtl-bench`` command: every op against its reference and the bytes-moved floor."""
