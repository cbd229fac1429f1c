"""Updates: the pure core and the shells that act on it.

Core (pure: values in, values out; no clock, file or socket):
- `statemachine`: `step(state, event) -> (state, actions)` over every state x event pair
- `decision`: the one channel decision (offer, cohort, downgrade, fit)
- `compat`: a manifest's requirements against a hardware report

Shells (I/O):
- `updater`: the driver (journal, publish, act); `journal`: `state.json`; `probation`
- `source`: the TUF checker and verified downloader; `trust` (tuf.ngclient); `download`
- `job`: the network half of an update in a child process, one per pass
- `activation`: load + canary through the serving layer
- `requests`: the update thread's inbox (checks coalesce; probation holds them)
"""
