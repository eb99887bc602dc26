"""Credentials and connecting as a client, the same for a managed and an external server.

ultrack builds ``postgresql://{address}`` itself, so the password never goes into an address or a
URL: workers get it through ``PGPASSWORD`` (:func:`libpq_env`), SQLAlchemy through connect_args."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psycopg

from gridsearch.core.errors import GridsearchError, first_line
from gridsearch.core.secrets import PASSWORD_ENV as PASSWORD_ENV  # defined once, re-exported

if TYPE_CHECKING:
    import sqlalchemy

DEFAULT_ROLE = "gridsearch"
DRIVER = "postgresql+psycopg2"


class PostgresError(GridsearchError):
    """A one-line, password-free error meant to be shown to the user as is."""


@dataclass(frozen=True)
class Credentials:
    """Where and as whom clients connect; the password is kept out of repr/tracebacks."""

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)


def hostport(host: str, port: int) -> str:
    """``host:port`` as users type it; IPv6 literals need brackets to stay unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def search_path(schema: str | None) -> dict[str, str]:
    """libpq ``options`` that make ``schema`` the only one unqualified names resolve in (and tables
    are created in): a table missing there is missing, never found in ``public``."""
    return {"options": f"-csearch_path={schema}"} if schema else {}


def sqlalchemy_url(creds: Credentials, dbname: str, schema: str | None = None) -> str:
    """The SQLAlchemy (psycopg2) URL for ``creds.user`` on ``dbname`` (in ``schema``, if given);
    never holds the password.

    An empty ``creds.host`` leaves host and port out: the caller then names a unix-socket directory
    in connect_args. User and database names are percent-quoted so any name round-trips."""
    import sqlalchemy

    url = sqlalchemy.URL.create(
        DRIVER,
        username=creds.user,
        host=creds.host or None,
        port=creds.port if creds.host else None,
        database=dbname,
        query=search_path(schema),
    )
    return url.render_as_string(hide_password=False)


def engine(dbname: str, creds: Credentials, **kwargs: Any) -> sqlalchemy.Engine:
    """SQLAlchemy engine whose URL holds no password: it goes via connect_args."""
    import sqlalchemy

    connect_args = dict(kwargs.pop("connect_args", {}))
    if creds.password is not None:
        connect_args["password"] = creds.password
    return sqlalchemy.create_engine(sqlalchemy_url(creds, dbname), connect_args=connect_args, **kwargs)


def libpq_env(creds: Credentials) -> dict[str, str]:
    """Environment for worker processes: libpq reads PGPASSWORD, ultrack's address stays clean."""
    return {} if creds.password is None else {"PGPASSWORD": creds.password}


def ultrack_address(creds: Credentials, dbname: str, schema: str | None = None) -> str:
    """``user@host:port/dbname`` for ultrack's ``database.address`` (no password in it), with
    ``?options=-csearch_path%3D<schema>`` when its tables live in a schema of their own."""
    query = "".join(f"?{k}={quote(v, safe='')}" for k, v in search_path(schema).items())
    return f"{quote(creds.user, safe='')}@{hostport(creds.host, creds.port)}/{quote(dbname, safe='')}{query}"


def connect(creds: Credentials, dbname: str = "postgres", timeout: int = 10,
            **libpq: Any) -> psycopg.Connection:
    """An autocommit psycopg connection over TCP; a failure becomes one line naming where and who.
    ``libpq``: more connection parameters (application_name, keepalives, ...)."""
    kwargs: dict[str, Any] = {
        "host": creds.host,
        "port": creds.port,
        "user": creds.user,
        "dbname": dbname,
        "connect_timeout": timeout,
        "autocommit": True,
        **libpq,
    }
    if creds.password is not None:
        kwargs["password"] = creds.password
    try:
        return psycopg.connect(**kwargs)
    except psycopg.Error as exc:
        raise PostgresError(
            f"cannot connect to PostgreSQL at {hostport(creds.host, creds.port)} as "
            f"{creds.user!r} (database {dbname!r}): {first_line(exc)}"
        ) from None
