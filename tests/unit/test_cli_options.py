"""The command line's options: -h everywhere, --version, --url/--api-key on every client command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gpu_request_router import __version__
from gpu_request_router.cli import answer_text, app

RUNNER = CliRunner()
CLIENT_COMMANDS = [
    ["submit", "m"],
    ["status", "x"],
    ["wait", "x"],
    ["cancel", "x"],
    ["list"],
    ["gpus"],
    ["explain", "x"],
    ["top"],
]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["worker"],
        ["submit"],
        ["keys"],
        ["keys", "create"],
        ["bench"],
        ["bench", "replay"],
    ],
    ids=lambda command: " ".join(command) or "gpurouter",
)
def test_short_help_is_help_everywhere(command: list[str]) -> None:
    """-h prints what --help prints, on the program, its commands and its command groups."""
    short = RUNNER.invoke(app, [*command, "-h"])
    assert short.exit_code == 0, short.output
    assert "Usage: gpurouter" in short.stdout
    assert short.stdout == RUNNER.invoke(app, [*command, "--help"]).stdout


def test_version() -> None:
    """--version prints the package's version and exits 0, before any command is needed."""
    result = RUNNER.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gpurouter {__version__}"


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda command: command[0])
def test_every_client_command_takes_url_and_api_key(command: list[str]) -> None:
    """Each client command documents --url and --api-key (the program does too, before it)."""
    text = RUNNER.invoke(app, [*command, "--help"]).stdout
    assert "--url" in text and "--api-key" in text


def _chat(*contents: str) -> dict[str, object]:
    choices = [{"message": {"role": "assistant", "content": text}} for text in contents]
    return {"status": "succeeded", "result": {"object": "chat.completion", "choices": choices}}


def test_the_answer_of_each_kind_of_result() -> None:
    """Chat: the assistant's text; completion: the text; anything else: its JSON."""
    assert answer_text(_chat("Hello there")) == "Hello there"
    assert answer_text(_chat("one", "two")) == "one\n\ntwo"
    completion = {"status": "succeeded", "result": {"choices": [{"text": "once upon"}]}}
    assert answer_text(completion) == "once upon"
    embedding = {"status": "succeeded", "result": {"data": [{"embedding": [0.5, 1.0]}]}}
    assert json.loads(answer_text(embedding) or "") == embedding["result"]
    odd = {"status": "succeeded", "result": {"choices": [{"message": {"content": None}}]}}
    assert json.loads(answer_text(odd) or "") == odd["result"], "no text: the JSON"
    assert answer_text({"status": "succeeded", "result": "plain"}) == '"plain"'


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled", "expired"])
def test_no_answer_before_success(status: str) -> None:
    """A request that has not succeeded has no answer, even with a partial result."""
    assert answer_text({**_chat("partial"), "status": status}) is None
    assert answer_text({"status": "succeeded", "result": None}) is None
