"""A short scripted workload that shows the router's decisions (``gpurouter demo``)."""

from __future__ import annotations

from typing import Any

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.request import ResourceHints, Shape, Task
from gpu_request_router.simulation import Simulation, SimulationReport

__all__ = ["DEMO_BACKENDS", "run_demo"]

DEMO_BACKENDS: list[dict[str, Any]] = [
    {
        "name": "sim",
        "kind": "simulated",
        "gpus": [{"type": "H100-80GB", "count": 2}, {"type": "L4-24GB", "count": 2}],
        "slots_per_gpu": 2,
    }
]


def _chat(text: str, max_tokens: int, **simulate: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }
    if simulate:
        body["simulate"] = simulate
    return body


def run_demo(settings: Settings, *, seed: int = 7) -> SimulationReport:
    """Run the demo workload on ``settings``' simulated fleet and return the report."""
    sim = Simulation(settings, seed=seed)
    alice, bob, carol = Caller("alice"), Caller("bob"), Caller("carol")
    # A burst from alice: the fleet fills up, later requests wait their turn.
    for index in range(8):
        sim.submit(
            0.1 * index,
            Submission(
                model="llama-3-8b",
                input=_chat("Summarise the quarterly report " * 40, 400),
                priority="normal",
            ),
            alice,
        )
    # bob's one request still gets an early turn (fair share between users).
    sim.submit(0.7, Submission(model="qwen2.5-7b", input=_chat("Hello", 64)), bob)
    # A high-priority request jumps the normal ones.
    sim.submit(0.8, Submission(model="llama-3-8b", input=_chat("Urgent", 32), priority="high"), bob)
    # Embeddings are small: they backfill onto the L4s.
    sim.submit(
        1.0,
        Submission(model="all-minilm-l6-v2", task=Task.EMBEDDING, input={"input": ["a", "b", "c"]}),
        carol,
    )
    # A long-context batch job taking two GPUs of one worker at once.
    sim.submit(
        1.2,
        Submission(
            model="llama-3-8b",
            shape=Shape(batch_size=16, input_tokens=6000, output_tokens=1000),
            resources=ResourceHints(gpu_count=2),
            priority="batch",
        ),
        carol,
    )
    # Its first attempt runs out of memory: the estimate grows and it is retried elsewhere.
    sim.submit(
        1.5,
        Submission(
            model="tinyllama-1.1b",
            task=Task.COMPLETION,
            input={
                "prompt": "Once upon a time",
                "max_tokens": 128,
                "simulate": {
                    "failure": "oom",
                    "fail_attempts": 1,
                    "duration_s": 2.0,
                },
            },
        ),
        bob,
    )
    # A backend error on the first attempt: retried on another GPU after a backoff.
    sim.submit(
        2.0,
        Submission(model="qwen2.5-7b", input=_chat("Flaky", 64, failure="error", fail_attempts=1)),
        carol,
    )
    # A job that hangs is expired at its deadline.
    sim.submit(
        2.5,
        Submission(model="qwen2.5-7b", input=_chat("Hang", 16, failure="hang"), timeout_s=20),
        carol,
    )
    # Far bigger than any GPU of the fleet: refused at once.
    sim.submit(
        3.0,
        Submission(
            model="llama-3-8b", shape=Shape(batch_size=128, input_tokens=4000, output_tokens=4000)
        ),
        bob,
    )
    return sim.run()
