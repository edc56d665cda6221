"""hpc-relay's bench: the relay next to the chain it replaces, measured side by side.

See ``python -m bench --help`` and docs/PERFORMANCE.md.
"""
