"""The I/O shell of key-evt-amqp: listener, relay, admin commands, event pipeline."""
