"""A format function named by import path in tests/test_format_registry.py (plugin_formats:qa_pairs)."""


def qa_pairs(row):
    return {"prompt": row["q"], "completion": row["a"]}
