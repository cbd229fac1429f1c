"""The wire formats every side agrees on, and nothing else of the project.

The device defines what it accepts, so these live in `agent/`; they are the only part of
`agent/` that `builder/` imports, and they import nothing of the project but each other.

- `base`: the strict base model of our own formats (`extra="forbid"`, `schema_version`)
- `manifest`, `paths`, `hashing`: the model manifest, its path rule and its digest
- `channel`: the signed channel file and the rollout cohort rule
- `canary`: what a device's canary is judged by (the leads rule), on both sides
- `mqtt`: every MQTT payload and topic name
- `openai`: the local API's request and response shapes
- `worker`: the JSON lines between the API process and the model worker (stdlib dataclasses)
- `broker`: how a broker is addressed (URL, credentials, TLS)
- `durable`: how every file of ours reaches disk (atomic, fsynced)
- `errors`: the one exception tree and the exit codes
- `cli`: the command-line conventions both CLIs keep (`--json`, exit codes, help)
"""
