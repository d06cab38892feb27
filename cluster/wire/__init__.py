"""The wire protocol: framing, messages and the msgpack codec. No I/O here."""
