"""The Python side of benches/compare.py: a Celery 5.7 app whose tasks have
the names tori-worker's built-ins have, so both workers consume the very
same messages.

    BENCH_BROKER=redis://127.0.0.1:PORT/0 celery -A pyapp worker -P prefork -c 2

(compare.py starts it with this directory on PYTHONPATH.)
"""
import os

from celery import Celery

URL = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("pyapp", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="tori.noop")
def noop():
    return None


@app.task(name="pdf_ingestion", acks_late=True)
def pdf_ingestion(file_ref, options=None):
    import pypipeline

    return pypipeline.ingest_file(file_ref)
