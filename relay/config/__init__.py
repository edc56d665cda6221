"""Configuration: one schema for every option of relay-exit, relay-worker and ``relay check``.

- :mod:`relay.config.schema`: the options, each with its one default, flag and TOML key;
- :mod:`relay.config.values`: the value types and their parsers (addresses, sizes, rules);
- :mod:`relay.config.loading`: a TOML file and flags into values, with one-line errors;
- :mod:`relay.config.settings`: the daemons' settings objects, attributes from the schema;
- :mod:`relay.config.secrets`: reading key, secret and password files safely;
- :mod:`relay.config.doc`: docs/CONFIG.md, generated from the schema.

It depends on nothing of the relay but :mod:`relay.proto` and :mod:`relay.errors`, so every
part of the relay, and the glidein wrapper, can use it.
"""
