"""Test databases: a fresh SQLite file, or a fresh PostgreSQL database created and dropped per test.

PostgreSQL is looked for on 127.0.0.1:5432 (or ``PGHOST``/``PGPORT``) as user
``postgres`` or ``root`` with trust authentication.  Where none answers the
PostgreSQL tests are skipped with the reason, except under ``CI=true``, where
they must run and so fail instead.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

_found: list[str] = []


def admin_url() -> str:
    """A URL of the local PostgreSQL's ``test`` database with rights to create databases."""
    if _found:
        return _found[0]
    try:
        import psycopg
    except ImportError as e:
        return _unavailable(f"psycopg is not installed ({e})")
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    errors = []
    for user in [os.environ.get("PGUSER")] + ["postgres", "root"]:
        if not user:
            continue
        url = f"postgresql://{user}@{host}:{port}/test"
        try:
            with psycopg.connect(url, connect_timeout=5):
                pass
        except psycopg.Error as e:
            errors.append(f"{user}: {str(e).strip()}")
            continue
        _found.append(url)
        return url
    return _unavailable(f"no PostgreSQL at {host}:{port} ({'; '.join(errors)})")


def _unavailable(reason: str) -> str:
    if os.environ.get("CI") == "true":
        raise AssertionError(f"PostgreSQL is required in CI: {reason}")
    raise SkipTest(f"PostgreSQL tests skipped: {reason}")


def fresh_postgresql(test: TestCase) -> str:
    """Create an empty database for ``test``, dropped when it ends; return its URL."""
    import psycopg

    admin = admin_url()
    name = f"papertrader_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    test.addCleanup(drop)
    return admin.rsplit("/", 1)[0] + "/" + name


def fresh_database_url(test: TestCase, backend: str) -> str:
    """A URL for an empty database of ``backend`` (``sqlite`` or ``postgresql``)."""
    if backend == "postgresql":
        return fresh_postgresql(test)
    return "sqlite:///" + os.path.join(os.path.abspath(test.mktemp()), "papertrader.sqlite")


def query(url: str, statement: str, *parameters: Any) -> list[tuple]:
    """Run one statement directly (not through PaperTrader) and return its rows."""
    if url.startswith("sqlite:"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite:///") :]) as connection:
            return connection.execute(statement, parameters).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(statement.replace("?", "%s"), parameters)
        return cursor.fetchall() if cursor.description else []
