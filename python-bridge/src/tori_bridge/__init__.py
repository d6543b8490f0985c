"""tori_bridge: the Python (Celery client) side of tori-worker.

    from tori_bridge import ingest_pdf_task
    ingest_pdf_task.delay("uploads/ab/abcd...pdf")

The default app reads ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` /
``REDIS_URL`` when ``tori_bridge`` is first imported.
"""
from .app import broker_url_from_env, make_celery_app, result_backend_from_env
from .models import (
    Artifacts,
    EmbedStats,
    IngestProgress,
    Concept,
    IngestResult,
    Language,
    TaskError,
    TaskStatus,
    TERMINAL_STATES,
    Timings,
)
from .results import get_status, read_task_meta, status_from_meta
from .storage import (
    HEAD_BYTES_PDF,
    LocalStorage,
    ObjectStorage,
    PendingUpload,
    Storage,
    StorageError,
    StoredFile,
    UploadTooLarge,
    storage_from_env,
)
from .tasks import (
    ALIASES,
    WORKER_TASKS,
    Stubs,
    TaskRunsInToriWorker,
    app,
    define_stubs,
    echo,
    fail,
    flaky,
    ingest_pdf_clean_task,
    ingest_pdf_task,
    noop,
    sleep,
    stub_params,
    whoami,
)

__all__ = [
    "ALIASES", "Artifacts", "Concept", "HEAD_BYTES_PDF", "EmbedStats", "IngestProgress", "IngestResult", "Language", "LocalStorage",
    "ObjectStorage", "PendingUpload", "Storage", "StorageError", "StoredFile", "Stubs",
    "TERMINAL_STATES", "TaskError", "TaskRunsInToriWorker", "TaskStatus", "Timings",
    "UploadTooLarge", "WORKER_TASKS", "app", "broker_url_from_env", "define_stubs", "echo",
    "fail", "flaky", "get_status", "ingest_pdf_clean_task", "ingest_pdf_task",
    "make_celery_app", "noop", "read_task_meta", "result_backend_from_env", "sleep",
    "status_from_meta", "storage_from_env", "stub_params", "whoami",
]
__version__ = "0.1.0"
