"""Fleet operations: the operator's MQTT sessions (`session`), the fleet table (`view`), and
staged rollouts: the controller (`rollout`), its pure policy (`policy`), what it observed
(`observer`) and its journal (`state`)."""
