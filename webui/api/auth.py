"""``--api-auth user:pass[,user2:pass2]``: the API's HTTP Basic credentials.

They are checked, in constant time and before a request's body is read, by :class:`webui.security.Guard`.
"""

from __future__ import annotations


def parse_credentials(spec: str) -> list[tuple[bytes, bytes]]:
    """``"u:p,u2:p2"`` -> [(b"u", b"p"), ...]; a password may itself contain ':'. ValueError for a bad entry."""
    pairs = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, colon, password = entry.partition(":")
        if not colon or not user:
            raise ValueError("--api-auth: expected user:password[,user2:password2]")
        pairs.append((user.encode(), password.encode()))
    if not pairs:
        raise ValueError("--api-auth: expected user:password[,user2:password2]")
    return pairs
