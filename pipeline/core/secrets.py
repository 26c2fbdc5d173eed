"""Credentials in URLs (a tracking server's, a database's): kept out of every record and message.

A URL's password never belongs in params.yaml (git, dvc.lock, every MLflow run's params, the
checkpoint): params refuse it (`password_problem`) and the environment carries it instead
(`MLFLOW_TRACKING_URI`, `OPTUNA_STORAGE`, or the driver's own: `PGPASSWORD`, `~/.pgpass`).
Whatever prints or records a URL from the environment passes it through `redact` first.
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact(url: str) -> str:
    """`url` with the password (and a token given as the user name) of its user part masked:
    scheme://user:***@host/...; any other string unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, _ = userinfo.partition(":")
    masked = f"{user}:{MASK}" if has_password else MASK
    return urlunsplit(parts._replace(netloc=f"{masked}@{host}"))


def redact_text(text: str, url: str | None) -> str:
    """`text` with every occurrence of `url`, and of its password alone, masked."""
    if not url or redact(url) == url:
        return text
    text = text.replace(url, redact(url))
    password = urlsplit(url).password
    return text.replace(password, MASK) if password else text


def password_problem(key: str, url: str, env: str) -> str | None:
    """Why `url`, the value of params key `key`, must not be in params.yaml: it holds a password.
    None when it holds none."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    if not password:
        return None
    return (f"holds a password, and params.yaml is committed to git and recorded by DVC and MLflow: "
            f"leave {key} at its default and put the URL in the {env} environment variable "
            f"(e.g. export {env}='{redact(url)}' with the real password), or give the URL without "
            "the password and let the driver read it (PGPASSWORD, ~/.pgpass)")
