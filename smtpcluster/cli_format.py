"""Human output of the admin CLI: tables in the manner of mailq, postcat and qshape.
(`--json` output bypasses this module entirely.)"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from raft import clocks
from smtpcluster.upgrade import holding_back

_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60))  # the largest that fits, then seconds


def age(seconds: int) -> str:
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def queue_list(messages: Iterable[dict[str, Any]]) -> Iterator[str]:
    """mailq: a message per block, its recipients indented with state and last error."""
    count = total = 0
    for m in messages:
        if count == 0:
            yield f"{'-Queue ID-':<40} {'--Size--':>8} {'-Age-':>6}  -Sender/Recipient-------"
        count, total = count + 1, total + m["size"]
        yield f"{m['id']:<40} {m['size']:>8} {age(m['age_s']):>6}  {m['sender'] or '<>'}"
        for r in m["recipients"]:
            n = r["attempts"]
            tries = f", {n} attempt{'s' * (n != 1)}" if n else ""
            yield f"{'':>58}{r['address']}  [{r['state']}{tries}]"
            if r["last_error"] and r["state"] not in ("delivered", "bounced"):
                yield f"{'':>60}({r['last_error']})"
    if count == 0:
        yield "Mail queue is empty"
    else:
        yield f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' * (count != 1)}."


def message(m: dict[str, Any]) -> Iterator[str]:
    """postcat: the envelope, each recipient's state, then the body if asked for."""
    yield f"id: {m['id']}"
    yield f"sender: {m['sender'] or '<>'}"
    yield f"size: {m['size']}  age: {age(m['age_s'])}  accepted by: {m['accepted_by']}"
    for r in m["recipients"]:
        yield f"recipient: {r['address']}  {_where(r)}  attempts: {r['attempts']}"
        for label in ("last_error", "reply"):
            if r[label]:
                yield f"    {label.replace('_', ' ')}: {r[label]}"
    if "body" in m:
        yield ""
        yield m["body"].replace("\r\n", "\n").rstrip("\n")


# The states in which a recipient is in a node's hands; in the others `node` is only
# the node that tried it last, and "queued on node2" read as if the queue were node2's.
HELD_BY_NODE = ("assigned", "sending", "uncertain")


def _where(r: dict[str, Any]) -> str:
    if not r["node"]:
        return str(r["state"])
    if r["state"] in HELD_BY_NODE:
        return f"{r['state']} on {r['node']}"
    return f"{r['state']}, last tried by {r['node']}"


def stats(s: dict[str, Any]) -> Iterator[str]:
    """qshape: pending recipients per domain by age (minutes), then totals by state."""
    buckets = s["buckets_min"]
    head = ["T"] + [str(b) for b in buckets] + [f"{buckets[-1]}+"]
    yield f"{'':>28}" + "".join(f"{h:>7}" for h in head)
    total = [0] * (len(buckets) + 1)
    for d in s["domains"]:
        total = [a + b for a, b in zip(total, d["by_age"], strict=True)]
    yield f"{'TOTAL':>28}" + "".join(f"{n:>7}" for n in [sum(total), *total])
    for d in s["domains"]:
        yield f"{d['domain'][-28:]:>28}" + "".join(f"{n:>7}" for n in [d["total"], *d["by_age"]])
    states = ", ".join(f"{k} {v}" for k, v in sorted(s["states"].items()) if v)
    yield f"messages: {s['messages']}  recipients: {states or 'none'}"
    yield f"uncertain (ever): {s['uncertain_total']}"


def cluster(s: dict[str, Any]) -> Iterator[str]:
    yield f"node {s['id']}: {s['role']}, term {s['term']}, leader {s['leader'] or '(none)'}"
    yield f"commit {s['commit']}, applied {s['applied']}, snapshot at {s['snapshot_index']}"
    yield f"version {s.get('version', 'unknown')}" + _format(s)
    if "data_dir_free_bytes" in s:
        yield _disk(s["data_dir_free_bytes"], s["min_free_space"])
    if s.get("members") is None:
        yield f"members: unknown ({s.get('members_error', 'no leader')})"
        return
    yield (f"{'ID':<16} {'ROLE':<9} {'ADDRESS':<24} {'REACHABLE':<10} {'LAG':>8} {'FORMAT':>6} "
           f"{'CLOCK':>8}")  # fmt: skip
    for m in s["members"]:
        reach = "yes" if m["reachable"] else "NO"
        fmt = "?" if m.get("format") is None else m["format"]
        yield (f"{m['id']:<16} {m['role']:<9} {m['address']:<24} {reach:<10} {m['lag']:>8} "
               f"{fmt:>6} {_offset(m.get('clock_offset_s')):>8}")  # fmt: skip
    if "format" in s:
        said = {m["id"]: m.get("format") for m in s["members"]}
        if held := holding_back(s["format"], said, said.get):
            yield f"a member reads a newer format; the cluster waits for {', '.join(held)}"
    off = [m for m in s["members"] if abs(m.get("clock_offset_s") or 0.0) > clocks.WARN_S]
    if off:
        which = ", ".join(f"{m['id']} {_offset(m['clock_offset_s'])}" for m in off)
        yield (f"clocks differ from the leader's: {which}; mail expires by the time a "
               "majority of the clocks agree on")  # fmt: skip


def _offset(seconds: float | None) -> str:
    """A clock offset as the leader read it, in the largest unit that fits."""
    if seconds is None:
        return "?"
    for unit, size in _UNITS:
        if abs(seconds) >= size:
            return f"{seconds / size:+.1f}{unit}"
    return f"{seconds:+.1f}s"


def _format(s: dict[str, Any]) -> str:
    if "format" not in s:
        return ""
    return f", replicated format {s['format']} (reads up to {s['format_readable']})"


def _disk(free: int, reserve: int) -> str:
    mib = 1 << 20
    if reserve and free < reserve:
        return (f"data_dir: {free // mib:,} MiB free, UNDER min_free_space "
                f"({reserve // mib:,} MiB): new mail is refused (452 4.3.1)")  # fmt: skip
    return f"data_dir: {free // mib:,} MiB free (new mail is refused under {reserve // mib:,} MiB)"
