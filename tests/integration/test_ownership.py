"""I5 as a property over the HTTP API: users see, wait on and cancel only their own requests.

Hypothesis generates short sequences of alice, bob (users) and root (admin) submitting requests
and calling, at random, every route that takes a request id and the list route with random
filters, against one real router on loopback. A model of who owns what (and what has ended)
says what each answer must be: another user's request is answered exactly as an id that names
nothing, lists hold the caller's own requests only, and the admin sees and may cancel all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from conftest import LiveServer

USERS = ("alice", "bob", "root")
ADMINS = {"root"}
MODELS = ("llama-3-8b", "qwen2.5-7b")
PRIORITIES = ("high", "normal", "batch")
ROUTES = ("get", "wait", "delete", "events")
LIVE = frozenset({"queued", "dispatching", "running"})
STATUSES = ("queued", "dispatching", "running", "succeeded", "failed", "cancelled", "expired")
MAX_PAGES = 200

Submit = tuple[str, str, str, str, bool]
Call = tuple[str, str, str, int]
Listing = tuple[str, str, dict[str, Any]]

# A submission runs until it is cancelled, or (one in three) ends at once and is waited for.
submits = st.tuples(
    st.just("submit"),
    st.sampled_from(USERS),
    st.sampled_from(MODELS),
    st.sampled_from(PRIORITIES),
    st.sampled_from([False, False, True]),
)
# Which request a call names, counted from the newest: mostly one of this sequence's own.
targets = st.one_of(st.integers(0, 3), st.integers(0, 10_000))
calls = st.tuples(st.just("call"), st.sampled_from(USERS), st.sampled_from(ROUTES), targets)
filters = st.fixed_dictionaries(
    {},
    optional={
        "status": st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3, unique=True),
        "model": st.sampled_from(MODELS),
        "priority": st.sampled_from(PRIORITIES),
        "user": st.sampled_from(USERS),
        "limit": st.sampled_from([2, 7, 500]),
    },
)
listings = st.tuples(st.just("list"), st.sampled_from(USERS), filters)


@dataclass
class Owners:
    """What the router holds, as the test made it: each request's owner, model and class.

    ``ended`` has the terminal status of the requests that have ended (cancelled or succeeded);
    the others run (or wait) until cancelled.
    """

    owner: dict[str, str] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)
    priority: dict[str, str] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)

    def sees(self, caller: str, request_id: str) -> bool:
        """Whether ``caller`` may see the request (I5)."""
        return caller in ADMINS or self.owner[request_id] == caller


def chat_body(model: str, priority: str, *, ends: bool) -> dict[str, Any]:
    """A chat submission that ends at once, or whose execution never ends (until cancelled)."""
    simulate = {"duration_s": 0.001} if ends else {"failure": "hang"}
    return {
        "model": model,
        "priority": priority,
        "input": {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "simulate": simulate,
        },
    }


def call(client: httpx.Client, route: str, request_id: str) -> tuple[int, str, str]:
    """Call ``route`` for ``request_id``: (status, content type, body).

    For a stream of events the body is its first event's data (the stream is then closed).
    """
    path = f"/v1/requests/{request_id}"
    if route == "events":
        with client.stream("GET", f"{path}/events") as response:
            kind = response.headers.get("content-type", "")
            if response.status_code != 200:
                return response.status_code, kind, response.read().decode()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    return response.status_code, kind, line.removeprefix("data: ")
            raise AssertionError("the event stream ended without an event")
    method = "DELETE" if route == "delete" else "GET"
    params = {"wait": 0} if route == "wait" else None
    response = client.request(method, path, params=params)
    return response.status_code, response.headers.get("content-type", ""), response.text


def without_ids(body: str, request_id: str) -> dict[str, Any]:
    """A problem body with the asked id blanked and without its HTTP request id."""
    problem: dict[str, Any] = json.loads(body.replace(request_id, "<id>"))
    problem.pop("request_id")
    return problem


def listed(client: httpx.Client, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every item of a listing, page by page."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = client.get("/v1/requests", params={**params, "cursor": cursor} if cursor else params)
        assert page.status_code == 200, page.text
        items.extend(page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the listing did not end")


def check_call(clients: dict[str, httpx.Client], held: Owners, step: Call, missing: str) -> None:
    """A call on a request: the right answer for its owner and the admin, a 404 for others."""
    _, caller, route, index = step
    newest_first = list(reversed(held.owner))
    request_id = newest_first[index % len(newest_first)] if newest_first else missing
    status, kind, body = call(clients[caller], route, request_id)
    if request_id not in held.owner or not held.sees(caller, request_id):
        gone = call(clients[caller], route, missing)
        assert status == gone[0] == 404, body
        assert kind == gone[1] and kind.startswith("application/problem+json")
        assert without_ids(body, request_id) == without_ids(gone[2], missing)
        if request_id in held.owner and route == "delete" and request_id not in held.ended:
            owner = clients[held.owner[request_id]].get(f"/v1/requests/{request_id}")
            assert owner.json()["status"] in LIVE, "another user cancelled the request"
        return
    answer = json.loads(body)
    if route == "delete" and request_id in held.ended:
        assert status == 409, body
        assert answer["request_status"] == held.ended[request_id]
        return
    assert status == 200, body
    assert answer["request_id" if route == "events" else "id"] == request_id
    if route == "events":
        assert kind.startswith("text/event-stream")
        assert answer["status"] == "queued" and answer["from_status"] is None
        return
    assert answer["user"] == held.owner[request_id]
    if route == "delete":
        assert answer["status"] == "cancelled"
        held.ended[request_id] = "cancelled"


def check_listing(clients: dict[str, httpx.Client], held: Owners, step: Listing) -> None:
    """A listing holds exactly the requests the caller may see that match its filters."""
    _, caller, params = step
    items = listed(clients[caller], params)
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)), "a request listed twice"
    whose = params.get("user") if caller in ADMINS else caller
    expected = {
        request_id
        for request_id, owner in held.owner.items()
        if (whose is None or owner == whose)
        and params.get("model", held.model[request_id]) == held.model[request_id]
        and params.get("priority", held.priority[request_id]) == held.priority[request_id]
    }
    assert set(ids) <= expected, f"{caller} was shown {set(ids) - expected}"
    if caller not in ADMINS:
        assert all(held.owner[request_id] == caller for request_id in ids)
    wanted = set(params.get("status", STATUSES))
    assert all(item["status"] in wanted for item in items)
    assert {i for i in expected & held.ended.keys() if held.ended[i] in wanted} <= set(ids)
    if wanted >= LIVE:
        assert expected - held.ended.keys() <= set(ids)


def test_users_see_wait_on_and_cancel_only_their_own_requests(
    serve: Callable[..., LiveServer],
) -> None:
    """Random users' submits and calls: others' requests look missing; admins see everything.

    Every route that takes a request id (get, get with ``wait=0``, cancel, events) answers
    another user's request exactly as an id that names nothing (status and body, but for the
    ids); lists, with any filters and page size, hold only the caller's own requests, or all of
    them for the admin (``user=`` filters for the admin and is ignored for a user).
    """
    server = serve()
    clients = {user: server.client(user) for user in USERS}
    held = Owners()

    @settings(max_examples=50, deadline=None)
    @given(steps=st.lists(st.one_of(submits, calls, listings), min_size=1, max_size=8))
    def run(steps: list[Submit | Call | Listing]) -> None:
        try:
            play(steps)
        finally:
            # The admin cancels what still runs, so that the fleet has room for the next example.
            for request_id in list(held.owner):
                if request_id not in held.ended:
                    response = clients["root"].delete(f"/v1/requests/{request_id}")
                    assert response.json()["status"] == "cancelled", response.text
                    held.ended[request_id] = "cancelled"

    def play(steps: list[Submit | Call | Listing]) -> None:
        for number, step in enumerate(steps):
            if step[0] == "submit":
                _, user, model, priority, ends = step
                body = chat_body(model, priority, ends=ends)
                response = clients[user].post("/v1/requests", json=body)
                assert response.status_code == 202, response.text
                request_id = response.json()["id"]
                held.owner[request_id] = user
                held.model[request_id] = model
                held.priority[request_id] = priority
                if ends:
                    done = clients[user].get(f"/v1/requests/{request_id}", params={"wait": 10})
                    assert done.json()["status"] == "succeeded", done.text
                    held.ended[request_id] = "succeeded"
            elif step[0] == "call":
                missing = f"req_{len(held.owner):020d}{number:06d}"
                check_call(clients, held, step, missing)
            else:
                check_listing(clients, held, step)

    run()
    # The admin sees every request, and so does each owner their own.
    everyone = {item["id"] for item in listed(clients["root"], {"limit": 500})}
    assert everyone == set(held.owner)
    for user in USERS[:2]:
        mine = {item["id"] for item in listed(clients[user], {"limit": 500})}
        assert mine == {request_id for request_id, owner in held.owner.items() if owner == user}
