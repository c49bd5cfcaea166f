"""Keys for the clouds, and the errors of a call to one, with the key never in either's text.

A key comes from, in order: the api_key option of slmkit.load; the provider's environment variables
(GITHUB_TOKEN, AZURE_AI_API_KEY, NVIDIA_API_KEY, OPENAI_API_KEY, ...); the keys file
``$XDG_CONFIG_HOME/slmkit/keys.json`` (or ``keys.toml``; default ``~/.config/slmkit``), which is
refused unless only its owner can read it (mode 0600 or 0400). The file maps a provider to its key,
or to a table with ``api_key`` and ``base_url``::

    {"github": "github_pat_...", "nim": "nvapi-...", "azure": {"api_key": "...", "base_url": "https://..."}}
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import (
    ConfigError,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimitError,
    ProviderTimeoutError,
    ProviderUnreachableError,
)


def keys_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "slmkit"


def from_keys_file(provider: str, field: str = "api_key") -> str | None:
    """The provider's api_key (or base_url) in the keys file, if there is one."""
    for path in (keys_dir() / "keys.json", keys_dir() / "keys.toml"):
        if path.is_file():
            entry = _read_keys(path).get(provider)
            if isinstance(entry, dict):
                entry = entry.get(field)
            elif field != "api_key":
                entry = None
            if entry is not None and not isinstance(entry, str):
                raise ConfigError(f"{provider}.{field}", "must be a string", path=path)
            return entry or None
    return None


def _read_keys(path: Path) -> dict[str, Any]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError("mode", f"is {mode:04o}: a keys file must be readable by its owner only "
                          f"(chmod 600 {path})", path=path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise ConfigError("format", "TOML needs Python 3.11 or later: use keys.json", path=path) from None
    except (OSError, ValueError) as e:  # the message names the line, never the content
        raise ConfigError("format", f"cannot be read ({type(e).__name__} at {getattr(e, 'lineno', '?')})",
                          path=path) from None
    if not isinstance(data, dict):
        raise ConfigError("format", "must map provider names to keys", path=path)
    return data


def find_key(provider: str, given: str | None, env_names: tuple[str, ...]) -> str | None:
    if given is not None:
        if not isinstance(given, str):
            raise ConfigError("api_key", "must be a string")
        return given or None
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return from_keys_file(provider)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """text with every secret (and any long-enough piece of one a provider quotes) masked."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
            if len(s) >= 16:  # a provider that echoes "sk-abc...xyz" quotes the key's ends
                text = text.replace(s[:12], "***").replace(s[-8:], "***")
    return text


def provider_message(body: Any, fallback: str) -> str:
    """The provider's own message from an OpenAI-shaped ({"error": {"message", "code"}}) or looser body."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or err.get("title") or fallback
        code = err.get("code")
        return f"{msg} ({code})" if isinstance(code, str) and code and code not in str(msg) else str(msg)
    if isinstance(err, str) and err:
        return err
    return fallback


def translate(e: Exception, provider: str, where: str, secrets: tuple[str, ...]) -> Exception:
    """The ProviderError for an openai SDK exception (or the exception itself if it is not one)."""
    import openai

    def clean(msg: str) -> str:
        return scrub(msg, secrets)[:2000]

    if isinstance(e, openai.APITimeoutError):
        return ProviderTimeoutError(provider, f"no answer from {where} in time (timeout; retries included)")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return ProviderUnreachableError(provider, clean(f"cannot reach {where} ({type(cause).__name__}: {cause})"))
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        msg = clean(provider_message(e.body, e.message))
        if status in (401, 403) or (status == 404 and "not found for account" in msg.lower()):
            return ProviderAuthError(provider, f"{msg} (check the key and its permissions)", status=status)
        if status == 429:
            return ProviderRateLimitError(provider, msg, status=status, retry_after=_retry_after(e.response))
        return ProviderError(provider, msg, status=status)
    if isinstance(e, openai.APIError):  # an error event in a stream
        return ProviderError(provider, clean(e.message))
    return e


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers[name]) / scale
        except (KeyError, ValueError, TypeError):
            continue
    return None
