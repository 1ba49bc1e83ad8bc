"""OpenAI's Responses API (``POST /v1/responses``) on top of chat completions, text only.

A Responses call becomes a chat completion call (:func:`chat_payload`): ``instructions`` a system
message, a string ``input`` one user message, a list of input messages the chat's messages (their
text parts joined), ``max_output_tokens`` the chat's ``max_tokens``. That call is admitted,
queued, placed and run as any chat call. Its answer becomes a ``response`` object
(:func:`response_object`); a streamed one, whose chat chunks arrive as Server-Sent Events, becomes
the Responses event sequence (:class:`ResponseEvents`): ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` per piece, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then ``response.completed`` (or
``response.incomplete`` when the output stopped at ``max_output_tokens``, or
``response.failed`` when the stream broke).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

__all__ = ["ResponseEvents", "chat_payload", "response_object"]

_ROLES = {"developer": "system"}


def _text(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def chat_payload(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completion body of a Responses body (as dumped from ``ResponsesBody``)."""
    messages: list[dict[str, str]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        for item in given:
            role = _ROLES.get(item["role"], item["role"])
            messages.append({"role": role, "content": _text(item["content"])})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for key in ("temperature", "top_p", "user"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _usage(usage: Any) -> dict[str, Any] | None:
    """Chat usage figures as the Responses API counts them."""
    if not isinstance(usage, Mapping):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class _Shape:
    """The fixed fields of one response: its ids, model, creation time and the call's settings."""

    def __init__(self, request_id: str, created: int, body: Mapping[str, Any]) -> None:
        self.id = f"resp_{request_id}"
        self.message_id = f"msg_{request_id}"
        self.created = created
        self.body = body

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "usage": usage,
            "metadata": {},
        }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _status(finish_reason: Any) -> str:
    """A response's status from the chat's finish reason: cut at the limit is incomplete."""
    return "incomplete" if finish_reason == "length" else "completed"


def response_object(request_id: str, body: Mapping[str, Any], chat: Any) -> dict[str, Any]:
    """The ``response`` object of a finished call, from its chat completion answer."""
    answer = chat if isinstance(chat, Mapping) else {}
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], Mapping) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, Mapping) else None
    created = answer.get("created")
    shape = _Shape(request_id, created if isinstance(created, int) else 0, body)
    status = _status(choice.get("finish_reason"))
    output = [shape.message(text if isinstance(text, str) else "", "completed")]
    return shape.response(status, output, _usage(answer.get("usage")))


class ResponseEvents:
    """The Responses event stream of one streamed call, from its chat chunks (module docstring).

    The chat chunks come as SSE bytes cut anywhere (a passed-through backend's stream); they
    are read event by event.
    """

    def __init__(self, request_id: str, created: int, body: Mapping[str, Any]) -> None:
        self._shape = _Shape(request_id, created, body)
        self._sequence = 0
        self._buffer = b""
        self._text: list[str] = []
        self._finish: Any = None
        self._usage: dict[str, Any] | None = None
        self._done = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._shape.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        """The events before any text: the response created and in progress, its message open."""
        shape = self._shape
        return [
            self._event("response.created", response=shape.response("in_progress", [])),
            self._event("response.in_progress", response=shape.response("in_progress", [])),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=shape.message(None, "in_progress"),
            ),
            self._event("response.content_part.added", **self._where(), part=_part("")),
        ]

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events for the chat chunks completed by ``chunk``."""
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    events += self._data(line[5:].strip())
        return events

    def _data(self, data: bytes) -> list[bytes]:
        if data == b"[DONE]":
            return self._closing()
        try:
            chunk = json.loads(data)
        except ValueError:
            return []
        if not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("usage"), Mapping):
            self._usage = _usage(chunk["usage"])
        events: list[bytes] = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, Mapping) else None
            if isinstance(piece, str) and piece:
                self._text.append(piece)
                events.append(
                    self._event("response.output_text.delta", **self._where(), delta=piece)
                )
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return events

    def _closing(self) -> list[bytes]:
        self._done = True
        shape = self._shape
        text = "".join(self._text)
        status = _status(self._finish)
        message = shape.message(text, "completed")
        return [
            self._event("response.output_text.done", **self._where(), text=text),
            self._event("response.content_part.done", **self._where(), part=_part(text)),
            self._event("response.output_item.done", output_index=0, item=message),
            self._event(
                f"response.{status}", response=shape.response(status, [message], self._usage)
            ),
        ]

    def failed(self) -> list[bytes]:
        """The last event when the stream ended without its end (the backend's stream broke)."""
        if self._done:
            return []
        error = {"code": "server_error", "message": "the stream from the backend broke"}
        message = self._shape.message("".join(self._text), "incomplete")
        response = self._shape.response("failed", [message], self._usage, error)
        return [self._event("response.failed", response=response)]

    async def relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The whole event stream for the chat chunks ``chunks``."""
        for event in self.opening():
            yield event
        async for chunk in chunks:
            for event in self.feed(chunk):
                yield event
        for event in self.failed():
            yield event
