"""``--api-auth user:pass[,user2:pass2]``: HTTP Basic on every API route, checked in constant time."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

_basic = HTTPBasic(auto_error=False, description="Set with --api-auth user:password.")


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


def basic_auth_dependency(spec: str) -> Callable:
    """A FastAPI dependency that answers 401 unless the request carries one of the credentials."""
    allowed = parse_credentials(spec)

    def check(credentials: HTTPBasicCredentials | None = Depends(_basic)) -> None:
        ok = False
        if credentials is not None:
            user, password = credentials.username.encode(), credentials.password.encode()
            # Compare against every entry without stopping early, so timing tells nothing.
            for good_user, good_password in allowed:
                match_user = secrets.compare_digest(user, good_user)
                match_password = secrets.compare_digest(password, good_password)
                ok |= match_user & match_password
        if not ok:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check
