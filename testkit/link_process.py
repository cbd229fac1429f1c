"""A real process that owns an MqttLink, driven by lines on stdin (test helper).

Tests start it with `env=subprocess_env()` and SIGKILL it to prove the will
and the outbox. Commands, one per line:

    event N          publish N transition events (stored in the outbox first)
    status STATE     change the retained status state
    counters         print the link counters as one JSON line
    quit             stop cleanly

Every command answers one JSON line on stdout once it is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from agent.config import AgentConfig
from agent.link.backoff import Backoff
from agent.link.mqtt import MqttLink
from agent.link.outbox import Outbox


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--fleet", default="test")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--state", default="ACTIVE")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--protocol", default="3.1.1")
    parser.add_argument("--max-events", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")

    config = AgentConfig(device_id=args.device, fleet=args.fleet, repo_url="http://127.0.0.1:9",
                         state_dir=args.state_dir, broker_url=args.broker, mqtt_protocol=args.protocol,
                         broker_username=args.device)
    outbox = Outbox(args.state_dir / "outbox", max_events=args.max_events)
    link = MqttLink(config, outbox, keepalive_s=5, backoff=Backoff(initial_s=0.05, max_s=0.5))
    link.publish_status(state=args.state, model=args.model, version=args.version)
    link.start()
    print(json.dumps({"ready": True, "next_seq": outbox.next_seq}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "event":
            seqs = [link.publish_event("transition", from_state="A", to_state="B", trigger="t").seq
                    for _ in range(int(words[1]))]
            print(json.dumps({"seqs": seqs}), flush=True)
        elif words[0] == "status":
            link.publish_status(state=words[1])
            print(json.dumps({"state": words[1]}), flush=True)
        elif words[0] == "counters":
            print(link.counters().model_dump_json(), flush=True)
        elif words[0] == "quit":
            link.stop()
            print(json.dumps({"stopped": True}), flush=True)
            return 0
    link.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
