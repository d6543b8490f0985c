"""The jobs table (SQLAlchemy 2; SQLite by default, PostgreSQL by URL)."""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, DateTime, Index, String, Text, create_engine, event,
                        inspect, text)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .auth import ANONYMOUS

log = logging.getLogger("tori_shim.db")


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Job(Base):
    __tablename__ = "tori_jobs"
    # Dedup is per owner: the same bytes from two owners are two jobs (the
    # worker's content-addressed artifacts make the second one cheap). The
    # listing reads one owner's newest rows. _migrate builds the same indexes
    # on a table from before owners.
    __table_args__ = (
        Index("ux_tori_jobs_owner_sha256", "owner", "sha256", unique=True),
        Index("ix_tori_jobs_owner_submitted_at", "owner", "submitted_at"),
    )

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(64), server_default=ANONYMOUS)
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    file_ref: Mapped[str] = mapped_column(String(2048))
    size: Mapped[int] = mapped_column(BigInteger)
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                      index=True)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True),
                                                               nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    result: Mapped[Optional[Any]] = mapped_column(JSON, nullable=True)

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "task_id": self.task_id,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": self.size,
            "submitted_at": _iso(self.submitted_at),
            "finished_at": _iso(self.finished_at),
            "status": self.status,
            "error": self.error,
        }


def _iso(t: Optional[dt.datetime]) -> Optional[str]:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite drops the zone
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.isoformat()


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _rec: Any) -> None:  # pragma: no cover - trivial
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    Base.metadata.create_all(engine)
    _migrate(engine)
    return engine


def _migrate(engine: Engine) -> None:
    """Brings a jobs table from before owners up to date (additive: existing
    rows get owner ``anonymous``; the global unique index on sha256 becomes
    unique per owner). Plain DDL that SQLite and PostgreSQL both run."""
    if "owner" in {c["name"] for c in inspect(engine).get_columns("tori_jobs")}:
        return
    try:
        with engine.begin() as c:
            c.execute(text(f"ALTER TABLE tori_jobs ADD COLUMN owner VARCHAR(64) NOT NULL "
                           f"DEFAULT '{ANONYMOUS}'"))
            c.execute(text("DROP INDEX IF EXISTS ix_tori_jobs_sha256"))
            c.execute(text("CREATE UNIQUE INDEX ux_tori_jobs_owner_sha256 "
                           "ON tori_jobs (owner, sha256)"))
            c.execute(text("CREATE INDEX ix_tori_jobs_owner_submitted_at "
                           "ON tori_jobs (owner, submitted_at)"))
            n = c.execute(text("SELECT COUNT(*) FROM tori_jobs")).scalar_one()
    except DBAPIError:
        # Another shim process migrating at the same moment wins the race;
        # anything else is a real failure.
        if "owner" in {c["name"] for c in inspect(engine).get_columns("tori_jobs")}:
            return
        raise
    log.warning("jobs table migrated: added column owner; the %d existing jobs belong to "
                "owner %r", n, ANONYMOUS)


def make_sessionmaker(engine: Engine) -> "sessionmaker[Session]":
    return sessionmaker(engine, expire_on_commit=False)
