"""In memory: protocol cores, parsers, config; no root, no network."""
