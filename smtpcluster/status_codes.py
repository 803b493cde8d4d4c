"""RFC 2034 enhanced status codes for the replies that aiosmtpd writes without one.

We advertise ENHANCEDSTATUSCODES, and RFC 2034 then requires a code in every 2xx, 4xx
and 5xx reply except the greeting and the replies to HELO and EHLO. Our own replies
carry theirs. aiosmtpd 1.4.6 writes many without one ("250 OK", "503 Error: need MAIL
command", "221 Bye"). Clients that act on the class and subject of the code (a 5.5.x
is the client's own protocol error, a 5.7.x is policy) then have nothing to act on.
"""

from __future__ import annotations

import re

# The codes RFC 3463 and the IANA registry (RFC 5248) give these replies, as Postfix
# gives them. Any other reply gets its class's generic code: X.0.0.
BY_REPLY = {
    "500": "5.5.2",  # syntax error, command unrecognized
    "501": "5.5.4",  # syntax error in parameters or arguments
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",  # command parameter not implemented
    "530": "5.7.0",  # authentication required
    "552": "5.3.4",  # message too big
    "553": "5.1.3",  # bad address syntax
    "555": "5.5.4",  # MAIL or RCPT parameters not recognized
    "454": "4.7.0",  # TLS not available
}
HAS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |\Z)")


def with_status_code(reply: str) -> str:
    """`reply` (one line, "250 OK" or "250-...") with an enhanced status code after its
    reply code, unless it has one or is a 3xx (354, AUTH's 334: RFC 2034 gives those
    none)."""
    code = reply[:3]
    if not code.isdigit() or code[0] not in "245" or HAS_CODE.match(reply, 4):
        return reply
    detail = BY_REPLY.get(code, f"{code[0]}.0.0")
    if len(reply) <= 4:
        return f"{code} {detail}"
    return f"{reply[:4]}{detail} {reply[4:]}"
