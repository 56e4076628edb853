"""The I/O shell of key-evt-amqp: listener, relays, admin commands, event pipeline (map: docs/architecture.md)."""
