"""Typed views of what tori-worker stores for ``pdf_ingestion``.

:class:`IngestResult` mirrors ``tasks/schema/ingest_result.schema.json``
(written from the Rust struct). Unknown fields are kept (``extra="allow"``)
so a newer worker does not break an older app; ``model_extra`` shows them.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Language(_Model):
    code: str = Field(description="ISO 639-3 code")
    confidence: float = Field(ge=0, le=1)
    reliable: bool


class EmbedStats(_Model):
    sequences: int = Field(ge=0, description="sequences asked for")
    unique: int = Field(ge=0, description="distinct sequences actually run")
    batches: int = Field(ge=0)
    padded_tokens: int = Field(ge=0)
    tokens: int = Field(ge=0)


class Timings(_Model):
    """Milliseconds per stage."""

    read_ms: float = Field(ge=0)
    extract_ms: float = Field(ge=0)
    clean_ms: float = Field(ge=0)
    chunk_ms: float = Field(ge=0)
    embed_ms: float = Field(ge=0)
    summarize_ms: float = Field(ge=0)
    total_ms: float = Field(ge=0)


class Concept(_Model):
    """A keyphrase of the document."""

    phrase: str
    score: float = Field(ge=0)
    count: int = Field(ge=1)


class Artifacts(_Model):
    """URLs of one document's artifacts (``file://`` or ``s3://``)."""

    pages: str
    chunks: str
    result: str


class IngestResult(_Model):
    """The SUCCESS result of ``pdf_ingestion``."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file_ref: str
    bytes: int = Field(ge=0)
    backend: str
    pages: int = Field(ge=0)
    chars: int = Field(ge=0)
    language: Optional[Language]
    title: Optional[str]
    author: Optional[str]
    needs_ocr: bool
    needs_ocr_pages: list[int]
    chunks: int = Field(ge=0)
    embedding_model: Optional[str]
    embedding_dim: Optional[int]
    embed_stats: Optional[EmbedStats]
    header_footer_lines_removed: int = Field(ge=0)
    summary: list[str]
    concepts: list[Concept]
    warnings: list[str]
    timings: Timings
    artifacts: Optional[Artifacts]
    reused: bool


class IngestProgress(_Model):
    """The meta of a PROGRESS state: ``{"stage", "page", "pages", ...}``."""

    stage: str = "extract"
    page: int = 0
    pages: int = 0
    batch: Optional[int] = None
    chunks: Optional[int] = None

    @property
    def fraction(self) -> float:
        """0..1: extraction is the first half, embedding batches the second."""
        if self.stage == "embed":
            return 0.5 + (0.5 * self.batch / self.chunks if self.chunks and self.batch is not None else 0.0)
        return 0.5 * self.page / self.pages if self.pages else 0.0


_REASON = re.compile(r"^\[([a-z0-9_]+)\]\s*")


class TaskError(_Model):
    """A FAILURE as stored by the worker (Celery's exception document)."""

    exc_type: str
    exc_message: str
    exc_module: Optional[str] = None

    @property
    def reason(self) -> Optional[str]:
        """The worker's reason code, e.g. ``password_protected``, or None."""
        m = _REASON.match(self.exc_message)
        return m.group(1) if m else None

    @classmethod
    def from_meta(cls, result: Any) -> "TaskError":
        if isinstance(result, dict):
            msg = result.get("exc_message")
            if isinstance(msg, (list, tuple)):
                msg = " ".join(str(m) for m in msg)
            return cls(exc_type=str(result.get("exc_type") or "Exception"),
                       exc_message=str(msg if msg is not None else ""),
                       exc_module=result.get("exc_module"))
        return cls(exc_type="Exception", exc_message=str(result))


TaskState = Literal["PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY", "SUCCESS",
                    "FAILURE", "REVOKED"]
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class TaskStatus(_Model):
    """One read of a task's state from the result backend."""

    task_id: str
    state: str
    progress: Optional[IngestProgress] = None
    result: Any = None
    error: Optional[TaskError] = None
    date_done: Optional[str] = None
    """When the worker stored the terminal state (ISO 8601, UTC)."""

    @property
    def ready(self) -> bool:
        return self.state in TERMINAL_STATES

    def ingest_result(self) -> IngestResult:
        """The typed result of a SUCCESS (raises ValueError otherwise)."""
        if self.state != "SUCCESS":
            raise ValueError(f"task {self.task_id} is {self.state}, not SUCCESS")
        return IngestResult.model_validate(self.result)
