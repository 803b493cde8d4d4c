"""mailq-, postcat- and qshape-style views of the spool."""

from __future__ import annotations

from mailqueue import queries
from mailqueue.commands import Accept, Hold
from mailqueue.spool import RcptState, Spool

MIN = 60_000


def spool() -> Spool:
    s = Spool()
    for k in range(25):
        rcpts = (f"u{k}@x.example",) if k % 2 else (f"u{k}@y.example", f"v{k}@x.example")
        s.apply(
            Accept(k * MIN, f"m{k:03d}", "s@example.org", rcpts, b"Subject: %d\r\n\r\n" % k, "a")
        )
    s.apply(Hold(25 * MIN, ("m003", "m004")))
    return s


def test_listing_pages_with_a_cursor() -> None:
    s, now = spool(), 30 * MIN
    seen: list[str] = []
    after = ""
    while True:
        page, after = queries.list_messages(s, now, queries.Filter(), after, limit=10)
        seen += [m["id"] for m in page]
        if not after:
            break
    assert seen == sorted(f"m{k:03d}" for k in range(25))


def test_listing_filters_by_state_domain_and_age() -> None:
    s, now = spool(), 30 * MIN
    held, _ = queries.list_messages(s, now, queries.Filter(state=RcptState.HELD))
    assert [m["id"] for m in held] == ["m003", "m004"]
    y, _ = queries.list_messages(s, now, queries.Filter(domain="Y.example"))
    assert all(k % 2 == 0 for k in (int(m["id"][1:]) for m in y)) and len(y) == 13
    old, _ = queries.list_messages(s, now, queries.Filter(min_age_ms=25 * MIN))
    assert [m["id"] for m in old] == ["m000", "m001", "m002", "m003", "m004", "m005"]


def test_a_message_stamped_by_a_clock_ahead_is_listed() -> None:
    """Taken by a node whose clock runs ahead of the one listing: its age is negative."""
    s = Spool()
    s.apply(Accept(90 * MIN, "m1", "s@example.org", ("u@x.example",), b"", "b"))
    page, _ = queries.list_messages(s, 30 * MIN, queries.Filter())
    assert [m["id"] for m in page] == ["m1"] and page[0]["age_s"] < 0


def test_show_includes_the_body_on_request() -> None:
    s = spool()
    shown = queries.show(s, "m002", 30 * MIN, body=True)
    assert shown["body"] == "Subject: 2\r\n\r\n" and shown["recipients"][0]["state"] == "queued"
    assert "body" not in queries.show(s, "m002", 30 * MIN)


def test_stats_shape_the_queue_by_domain_and_age() -> None:
    s, shape = spool(), queries.Shape(30 * MIN)
    for m in s.messages.values():
        shape.add(m)
    st = shape.result(s)
    x = next(d for d in st["domains"] if d["domain"] == "x.example")
    assert x["total"] == 25 and sum(x["by_age"]) == 25
    assert x["by_age"][:2] == [0, 5]  # none under 5 minutes old; m020..m024 are 6-10
    assert st["states"]["held"] == 3 and st["messages"] == 25


def test_a_page_looks_at_a_bounded_number_of_messages_and_says_where_to_go_on() -> None:
    s, now = spool(), 30 * MIN
    held = queries.Filter(state=RcptState.HELD)  # m003 and m004 only
    page, after = queries.list_messages(s, now, held, "", limit=10, scan=3)
    assert page == [] and after == "m002"  # looked at m000-m002, none held: go on
    page, after = queries.list_messages(s, now, held, after, limit=10, scan=3)
    assert [m["id"] for m in page] == ["m003", "m004"] and after == "m005"
    seen = [m["id"] for m in page]
    while after:
        page, after = queries.list_messages(s, now, held, after, limit=10, scan=3)
        seen += [m["id"] for m in page]
    assert seen == ["m003", "m004"]
