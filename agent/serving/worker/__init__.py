"""The model-worker process (`process`, run as `python -m agent.serving.worker`) and its
client in the API process (`client`); their wire is `agent.wire.worker`."""
