"""The fleet link: the device's one MQTT connection (`mqtt`) with its reconnect backoff,
the on-disk store-and-forward outbox, and telemetry samples."""
