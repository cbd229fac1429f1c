"""Test support shared by `tests/` and `bench/`: real parts, started and stopped for a test.

- `env`: this checkout and the environment of child processes; `waits.wait_until`
- `models`: tiny random-weight models and the SmolLM2 session fixtures
- `artifacts`: signed repositories, provisioned devices, a faulty HTTP server
- `brokers`: Mosquitto on a free port, recorders; `link`: a device's MQTT link
- `agents`: real `edge-agent run` daemons; `fleet`: many of them
- `arm64`: an agent on an emulated aarch64 device; `broken_models`: broken copies of a real model
- `store`, `updater`, `serving`, `rollout_standins`: helpers and named test doubles
"""
