"""`queue list` and `queue show` as text: where a recipient is, said so that the queue
never reads as one node's own, and how often it was tried."""

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


@pytest.mark.parametrize(
    ("attempts", "says"), [(1, "[queued, 1 attempt]"), (2, "[queued, 2 attempts]"), (0, "[queued]")]
)
def test_mailq_counts_attempts_in_words(attempts: int, says: str) -> None:
    m = {
        "id": "m1", "sender": "a@example.org", "size": 10, "age_s": 5,
        "recipients": [{"address": "b@example.com", "state": "queued", "attempts": attempts,
                        "last_error": ""}],
    }  # fmt: skip
    assert any(line.endswith(f"b@example.com  {says}") for line in cli_format.queue_list([m]))
