"""The OpenAI door's newer parts, driven by the official `openai` client against a live router.

``stream_options.include_usage``, the final ``finish_reason`` chunk of a stream, the model object,
an unknown model as ``NotFoundError``, and the Responses API (``responses.create``), whole and
streamed. One router (simulated fleet) serves the whole module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

MESSAGES: Any = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def client(module_server: LiveServer) -> openai.OpenAI:
    """The official client, as alice, without retries (a failure shows at once)."""
    key = module_server.headers("alice")["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=f"{module_server.url}/v1", api_key=key, max_retries=0)


def test_a_model_is_retrieved_as_openai_describes_it(client: openai.OpenAI) -> None:
    """``models.retrieve`` gives OpenAI's model object; an unknown id raises NotFoundError."""
    model = client.models.retrieve("qwen2.5-7b")
    assert (model.id, model.object) == ("qwen2.5-7b", "model")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-9")
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.chat.completions.create(model="gpt-9", messages=MESSAGES),
        lambda c: c.completions.create(model="gpt-9", prompt="x"),
        lambda c: c.embeddings.create(model="gpt-9", input="x"),
        lambda c: c.responses.create(model="gpt-9", input="x"),
    ],
    ids=["chat", "completions", "embeddings", "responses"],
)
def test_an_unknown_model_is_not_found_on_every_route(client: openai.OpenAI, call: Any) -> None:
    """An unknown model is 404 ``model_not_found`` in OpenAI's shape, as OpenAI answers it."""
    with pytest.raises(openai.NotFoundError) as unknown:
        call(client)
    body = unknown.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"  # type: ignore[index]
    assert "gpt-9" in body["message"]  # type: ignore[index]


def test_a_streamed_chat_ends_with_its_finish_reason(client: openai.OpenAI) -> None:
    """Words, then one chunk with ``finish_reason`` and no content; no usage unless asked."""
    limited = list(
        client.chat.completions.create(
            model="llama-3-8b", messages=MESSAGES, max_tokens=5, stream=True
        )
    )
    assert [c.choices[0].finish_reason for c in limited] == [None] * 5 + ["length"]
    assert not limited[-1].choices[0].delta.content
    assert all(chunk.usage is None for chunk in limited)
    free = list(client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, stream=True))
    assert free[-1].choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in free[:-1]] == [None] * (len(free) - 1)


def test_include_usage_sends_a_usage_chunk_before_done(client: openai.OpenAI) -> None:
    """With ``include_usage`` the last chunk has the usage and no choices, as OpenAI streams."""
    chunks = list(
        client.chat.completions.create(
            model="llama-3-8b",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4 and last.usage.prompt_tokens > 0
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert len(text.split()) == 4


def test_include_usage_on_a_text_completion(client: openai.OpenAI) -> None:
    """Text completions stream the same way: a finish chunk, then the usage chunk."""
    chunks = list(
        client.completions.create(
            model="tinyllama-1.1b",
            prompt="Once upon",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 3 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_responses_text_in_text_out(client: openai.OpenAI, module_server: LiveServer) -> None:
    """``responses.create`` with a string answers a response whose ``output_text`` is the text.

    It ran as a chat completion through the router: the stored request is alice's chat call.
    """
    response = client.responses.create(model="llama-3-8b", input="Say something")
    assert response.object == "response" and response.status == "completed"
    assert response.output_text and response.output[0].type == "message"
    assert response.usage is not None
    assert response.usage.output_tokens == len(response.output_text.split())
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    stored = module_server.client("alice").get(f"/v1/requests/{response.id.removeprefix('resp_')}")
    assert stored.status_code == 200, stored.text
    assert (stored.json()["task"], stored.json()["status"]) == ("chat", "succeeded")


def test_responses_with_messages_instructions_and_a_limit(client: openai.OpenAI) -> None:
    """A list of input messages and instructions are accepted; the limit cuts the output."""
    response = client.responses.create(
        model="qwen2.5-7b",
        instructions="Answer briefly.",
        input=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Say more"}]},
        ],
        max_output_tokens=7,
    )
    assert len(response.output_text.split()) == 7
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_responses_streamed_as_responses_events(client: openai.OpenAI) -> None:
    """``stream=True`` iterates the Responses event sequence, ending with the whole response."""
    events = list(client.responses.create(model="llama-3-8b", input="Say something", stream=True))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[kinds.index("response.output_text.done")]
    assert done.type == "response.output_text.done" and done.text == text
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == len(text.split())


def test_a_responses_stream_cut_at_the_limit_is_incomplete(client: openai.OpenAI) -> None:
    """A streamed response stopped by ``max_output_tokens`` ends with ``response.incomplete``."""
    events = list(
        client.responses.create(
            model="llama-3-8b", input="Say something", max_output_tokens=3, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert len(events[-1].response.output_text.split()) == 3


def test_a_body_not_sent_as_json_is_told_so_in_openai_shape(module_server: LiveServer) -> None:
    """A chat body under text/plain is a 422 whose message says to send JSON."""
    response = module_server.client("alice").post(
        "/v1/chat/completions",
        content=b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]}',
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "validation-error"
    assert error["message"] == "body: send the body as JSON (Content-Type: application/json)"


def test_a_body_over_the_limit_says_the_limit(client: openai.OpenAI) -> None:
    """A body over server.max_body_bytes (4 MiB by default) is a 413 naming the limit."""
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "x" * (4 << 20)}]
        )
    assert refused.value.status_code == 413
    assert f"limit of {4 << 20} bytes" in refused.value.body["message"]  # type: ignore[index]
