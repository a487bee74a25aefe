"""Steps the end-to-end tests share."""

from __future__ import annotations

import secrets

from contracts.rollouts import RolloutPromoted
from deploy.loop import EventTail, LoopClient, spec_yaml
from deploy.scenario import REFERENCE, generate


async def serve_version_1(client: LoopClient, tail: EventTail, *, cooldown_s: float = 0) -> str:
    """A fresh model trained on the reference world and promoted (the first version needs no canary)."""
    model = f"e2e-{secrets.token_hex(3)}"
    await client.put_spec(model, spec_yaml(model, dataset=f"{model}-base", cooldown_s=cooldown_s))
    await client.upload_dataset(f"{model}-base", generate(8_000, REFERENCE, seed=1), [model])
    await tail.wait_for(RolloutPromoted, lambda e: e.subject == model, deadline_s=180)
    await client.wait_served(model)
    route = await client.route(model)
    assert route is not None and route["stable_version"] == 1
    return model
