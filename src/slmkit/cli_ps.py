"""`slm ps [--host URL] [--json]`: the models a running `slm serve` has loaded (its /api/ps, Ollama's
shape plus `slots`): memory, batch slots, context per request, and when each unloads."""
from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from .errors import SlmkitError

DEFAULT_HOST = "http://127.0.0.1:8000"  # slm serve's default bind address and port
TIMEOUT_S = 5.0


class ServerNotReachable(SlmkitError):
    """No slm serve answers (or it answers with something other than /api/ps)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ps", help="models loaded by a running slm serve (memory, slots, context, keep-alive)")
    p.add_argument("--host", default=None, help=f"the server's URL (default $SLMKIT_HOST, else {DEFAULT_HOST})")
    p.add_argument("--api-key", default=None, help="its API key, if it needs one (or $SLMKIT_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def base_url(host: str | None) -> str:
    host = (host or os.environ.get("SLMKIT_HOST") or DEFAULT_HOST).strip().rstrip("/")
    return host if "://" in host else f"http://{host}"


def fetch_ps(base: str, api_key: str | None = None) -> dict:
    """The server's /api/ps answer, or ServerNotReachable saying in one line why not."""
    req = urllib.request.Request(base + "/api/ps", headers={"authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:  # noqa: S310 -- a URL the user gave
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        why = " (pass --api-key or set SLMKIT_API_KEY)" if e.code == 401 else ""
        raise ServerNotReachable(f"{base} answered /api/ps with HTTP {e.code}{why}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerNotReachable(f"no slm serve is running at {base} ({reason}); start one with `slm serve`, "
                                 "or pass --host") from None
    except ValueError:
        raise ServerNotReachable(f"{base} is not an slm serve: its /api/ps answer is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise ServerNotReachable(f"{base} is not an slm serve: its /api/ps answer has no models list")
    return body


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _until(expires: Any, now: float) -> str:
    """Ollama's UNTIL column: "Forever", or how long until the model unloads."""
    if not isinstance(expires, str) or expires.startswith("9999"):
        return "Forever"
    try:
        left = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() - now
    except ValueError:
        return expires
    if left <= 0:
        return "now"
    if left < 120:
        return f"{left:.0f} seconds from now"
    return f"{left / 60:.0f} minutes from now" if left < 7200 else f"{left / 3600:.0f} hours from now"


def table(models: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [("NAME", "SIZE", "SLOTS", "CONTEXT", "FORMAT", "UNTIL")]
    for m in models:
        d = m.get("details") or {}
        kind = f"{d.get('format', '')} {d.get('quantization_level', '')}".strip()
        rows.append((str(m.get("name", "")), _size(m.get("size")), str(m.get("slots", "")),
                     str(m.get("context_length", "")), kind, _until(m.get("expires_at"), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_ps(a: argparse.Namespace) -> int:
    base = base_url(a.host)
    body = fetch_ps(base, a.api_key or os.environ.get("SLMKIT_API_KEY"))
    if a.json:
        print(json.dumps(body, indent=2))
    else:
        print(table(body["models"]))
    return 0
