"""The one HTTP reachability probe behind every "is the server there?" check (MLflow, Kubeflow Pipelines).

Client libraries retry for minutes and then print a traceback; one GET with a short timeout tells within
seconds. The probe only reports what happened: each caller words its own one-line UserError.
"""

from __future__ import annotations

import base64
import http.client
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Answer:
    """What a probed URL did: `status` is the HTTP status (None when nothing answered, then `reason` says why)."""

    status: int | None
    reason: str = ""

    @property
    def reachable(self) -> bool:
        return self.status is not None

    @property
    def healthy(self) -> bool:
        """Up and serving: a non-error status, or 401/403 (an auth proxy in front of it: the server is there)."""
        return self.status is not None and (self.status < 400 or self.status in (401, 403))


def is_http_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _request(url: str) -> urllib.request.Request:
    """`url` as a request; credentials in the URL (`http://user:pass@host`, which urllib would read as part of the
    host name) go in a Basic Authorization header instead, as MLflow's own client sends them."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    plain = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(plain, headers={"Authorization": f"Basic {token}"})


def probe(url: str, timeout: float = TIMEOUT_S) -> Answer:
    """GET `url` once; any HTTP status counts as an answer, an error or a timeout as none."""
    try:
        with urllib.request.urlopen(_request(url), timeout=timeout) as resp:  # noqa: S310 (the user's own server)
            return Answer(resp.status)
    except urllib.error.HTTPError as exc:  # before URLError: it is one, but the server did answer
        return Answer(exc.code)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        # refused, timed out, not HTTP at all (BadStatusLine), a malformed URL (InvalidURL, ValueError)
        return Answer(None, str(getattr(exc, "reason", exc)))
