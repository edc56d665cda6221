"""Operator tools built on the daemons: ``relay check`` and ``relay demo``."""
