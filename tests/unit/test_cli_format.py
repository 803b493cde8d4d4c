"""`queue show`'s text: where a recipient is, said so that the queue never reads as one
node's own."""

from __future__ import annotations

from typing import Any

import pytest

from smtpcluster import cli_format


def shown(state: str, node: str) -> str:
    m: dict[str, Any] = {
        "id": "m1", "sender": "a@example.org", "size": 10, "age_s": 5, "accepted_by": "n1",
        "recipients": [{"address": "b@example.com", "state": state, "node": node,
                        "attempts": 1, "last_error": "", "reply": ""}],
    }  # fmt: skip
    [line] = [x for x in cli_format.message(m) if x.startswith("recipient:")]
    return line


@pytest.mark.parametrize(
    ("state", "node", "says"),
    [
        ("assigned", "n2", "assigned on n2"),
        ("sending", "n2", "sending on n2"),
        ("uncertain", "n3", "uncertain on n3"),
        ("queued", "n2", "queued, last tried by n2"),
        ("delivered", "n3", "delivered, last tried by n3"),
        ("queued", "", "queued  attempts"),
    ],
)
def test_a_recipient_is_on_a_node_only_while_that_node_holds_it(
    state: str, node: str, says: str
) -> None:
    assert f"recipient: b@example.com  {says}" in shown(state, node)
