"""Credentials by value and by name: found before they are written anywhere (compiled YAML, run parameters,
settings), and redacted from everything printed or logged.

By value: a URI whose userinfo holds a password (`http://admin:pw@host`) or a token as user
(`https://hf_xxx@host`), and strings in the published shapes of common tokens (Hugging Face, GitHub, AWS key
ids, JWTs such as Kubeflow/OIDC bearer tokens, private-key blocks, `Bearer ...` headers). Random-looking
strings without a known shape are not guessed at: image digests and content hashes look exactly like that.
By name: environment-variable names that say they hold a secret (`*_PASSWORD`, `DB_PASS`, `HF_TOKEN_VALUE`, ...).

This is the lowest layer: it raises nothing of its own (callers turn a finding into a `UserError` naming the
place), so `errors.UserError` can redact every message with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

MASK = "***"

# An environment variable whose name says "secret": one of these words as a whole `_`-separated segment.
_SECRET_WORDS = r"PASSWORD|PASSWD|PASS|PWD|SECRET|TOKEN|APIKEY|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?"
SECRET_NAME = re.compile(rf"(^|_)({_SECRET_WORDS})(_|$)|(^|_)KEY$", re.IGNORECASE)

# scheme://user:password@ (password may be empty) or scheme://token@ where the user part is token-shaped.
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/@:?#]*)(?P<pw>:[^\s/@?#]*)?@")

# Published token formats; each is specific enough not to fire on ordinary text, ids or digests.
TOKEN_SHAPES: dict[str, re.Pattern[str]] = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "a GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"),
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "an OpenAI-style API key": re.compile(r"\bsk-(proj-)?[A-Za-z0-9_-]{20,}"),
    "a Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a bearer token": re.compile(r"\bBearer\s+[A-Za-z0-9._~+/-]{16,}=*"),
}


def is_secret_name(name: str) -> bool:
    """Whether an environment-variable name says it holds a secret (DB_PASS, HF_TOKEN_VALUE, MLFLOW_KEY ...)."""
    return bool(SECRET_NAME.search(name))


def _token_kind(text: str) -> str | None:
    for kind, pattern in TOKEN_SHAPES.items():
        if pattern.search(text):
            return kind
    return None


def credential_kind(value: str) -> str | None:
    """What credential `value` carries ("a URI with a password", "a Hugging Face token", ...), else None."""
    for m in _URI_USERINFO.finditer(value):
        if m.group("pw") is not None:
            return "a URI with a password"
        if m.group("user") and _token_kind(m.group("user")):
            return "a URI with a token as user"
    return _token_kind(value)


def find_credentials(obj: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(place, kind) of every credential in a nested structure of dicts, lists and strings.

    Values are judged by `credential_kind`; Kubernetes-style env entries (`{name: X, value: Y}`) and plain
    mappings of env names (`{DB_PASS: ...}`) are also judged by the variable's name when it holds a value.
    """
    if isinstance(obj, str):
        kind = credential_kind(obj)
        if kind:
            yield where or "value", kind
    elif isinstance(obj, dict):
        name = obj.get("name")
        if isinstance(name, str) and _holds_value(obj.get("value")) and is_secret_name(name):
            yield f"{where}[{name}]" if where else name, f"a value for the secret-named variable {name}"
        for key, value in obj.items():
            place = f"{where}.{key}" if where else str(key)
            if _is_env_name(key) and _holds_value(value) and is_secret_name(key):
                yield place, f"a value for the secret-named variable {key}"
                continue
            yield from find_credentials(value, place)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from find_credentials(value, f"{where}[{i}]")


_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")  # UPPER_SNAKE: an environment variable, not a field


def _is_env_name(key: Any) -> bool:
    return isinstance(key, str) and bool(_ENV_NAME.match(key))


def _holds_value(value: Any) -> bool:
    """A non-empty string that is not itself a variable name (`{AWS_ACCESS_KEY_ID: AWS_ACCESS_KEY_ID}` maps a
    Secret key to an env name; that is a reference, not a value)."""
    return isinstance(value, str) and bool(value) and not _is_env_name(value)


def redact(text: str) -> str:
    """`text` with every credential `credential_kind` recognises replaced by `***` (URI users stay readable)."""
    if not text:
        return text

    def userinfo(m: re.Match[str]) -> str:
        user = m.group("user")
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{user}:{MASK}@"
        if user and _token_kind(user):
            return f"{m.group('scheme')}{MASK}@"
        return m.group(0)

    out = _URI_USERINFO.sub(userinfo, text)
    for pattern in TOKEN_SHAPES.values():
        out = pattern.sub(MASK, out)
    return out
