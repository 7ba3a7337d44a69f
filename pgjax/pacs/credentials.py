"""Credentials for a PACS: from environment variables or a file, never from the command line.

A password on the command line lands in shell history and in `ps` output for every user of the
machine, so pgjax reads only these:

    PGJAX_PACS_USER + PGJAX_PACS_PASSWORD    HTTP basic authentication
    PGJAX_PACS_TOKEN                         a bearer token (OAuth2/OIDC)
    --auth-file FILE                         JSON {"user": ..., "password": ...} or {"token": ...}

A credentials file readable by other users is refused.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import requests

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "PGJAX_PACS_USER", "PGJAX_PACS_PASSWORD", "PGJAX_PACS_TOKEN"


class BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never show the token in a log or traceback
        return "BearerAuth(<token withheld>)"


def _from_mapping(obj: dict, where: str):
    if obj.get("token"):
        return BearerAuth(str(obj["token"]))
    if obj.get("user") is not None:
        if obj.get("password") is None:
            raise ValueError(f"{where}: a user without a password")
        return requests.auth.HTTPBasicAuth(str(obj["user"]), str(obj["password"]))
    return None


def load_auth(auth_file: str | Path | None = None, environ=None):
    """A requests auth object, or None when no credentials are configured."""
    environ = os.environ if environ is None else environ
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read the credentials file: {e.strerror}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"{path}: the credentials file is readable by other users; chmod 600 it"
            )
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(
                f'{path}: want JSON, {{"user": ..., "password": ...}} or {{"token": ...}}'
            ) from None
        auth = _from_mapping(obj if isinstance(obj, dict) else {}, str(path))
        if auth is None:
            raise ValueError(f"{path}: no 'user'/'password' or 'token' in the credentials file")
        return auth
    return _from_mapping(
        {
            "token": environ.get(ENV_TOKEN),
            "user": environ.get(ENV_USER),
            "password": environ.get(ENV_PASSWORD),
        },
        f"environment ({ENV_USER}/{ENV_PASSWORD})",
    )
