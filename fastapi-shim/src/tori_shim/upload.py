"""Streaming a multipart upload straight into storage, with checks.

Starlette's ``UploadFile`` spools the whole body before the endpoint runs;
here the body is parsed chunk by chunk (python-multipart's push parser) and
each chunk goes into a :class:`tori_bridge.PendingUpload`, so the size
limit, the file-name check and the PDF magic-byte check stop a bad upload
while it is still arriving, and nothing reaches the storage root's object
names until every check passed.
"""
from __future__ import annotations

import time
import unicodedata
from typing import AsyncIterator, Optional

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from tori_bridge import HEAD_BYTES_PDF, PendingUpload, Storage, UploadTooLarge

FILE_FIELD = "file"
MAX_FILENAME = 255
#: After a rejection, the rest of the body is read and dropped up to this
#: many bytes (so the client sees the answer rather than a reset).
DRAIN_LIMIT = 32 * 1024 * 1024
DRAIN_SECONDS = 10.0


class UploadRejected(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def check_filename(raw: str) -> str:
    """A plain file name, or :class:`UploadRejected` (400 ``bad_filename``)."""
    name = unicodedata.normalize("NFC", raw)
    bad = None
    if not name.strip():
        bad = "is empty"
    elif "/" in name or "\\" in name:
        bad = "contains a directory separator ('/' or '\\')"
    elif name in (".", "..") or name.startswith(".."):
        bad = "is a relative path component ('..')"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        bad = "contains control characters"
    elif len(name.encode("utf-8")) > MAX_FILENAME:
        bad = f"is longer than {MAX_FILENAME} bytes"
    if bad:
        raise UploadRejected(
            400, "bad_filename",
            f"file name {raw!r} {bad}: send a plain file name such as 'report.pdf' "
            "(no directory parts)")
    return name


def looks_like_pdf(head: bytes) -> bool:
    """``%PDF-`` within the first 1024 bytes (where PDF readers look for it)."""
    return b"%PDF-" in head[:HEAD_BYTES_PDF]


class StreamedUpload:
    """Feeds body chunks to a multipart parser; writes the ``file`` part."""

    def __init__(self, content_type: str, storage: Storage, max_bytes: int):
        ctype, params = parse_options_header(content_type)
        if ctype != b"multipart/form-data" or not params.get(b"boundary"):
            raise UploadRejected(
                415, "not_multipart",
                "send the PDF as multipart/form-data with the field 'file' "
                "(e.g. curl -F file=@doc.pdf)")
        self.storage = storage
        self.max_bytes = max_bytes
        self.upload: Optional[PendingUpload] = None
        self.filename: Optional[str] = None
        self.done = False
        self._in_file = False
        self._hname = b""
        self._hvalue = b""
        self._headers: dict[bytes, bytes] = {}
        self._files_seen = 0
        self.parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin,
            "on_header_field": self._hfield,
            "on_header_value": self._hval,
            "on_header_end": self._hend,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })

    # -- parser callbacks -------------------------------------------------
    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _hval(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _hend(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname = b""
        self._hvalue = b""

    def _headers_done(self) -> None:
        disp, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name != FILE_FIELD:
            return  # other form fields are ignored
        self._files_seen += 1
        if self._files_seen > 1:
            raise UploadRejected(400, "too_many_files",
                                 "send one file per request in the field 'file'")
        raw_name = params.get(b"filename")
        if raw_name is None:
            raise UploadRejected(400, "not_a_file",
                                 "the field 'file' must be a file upload (with a file name)")
        self.filename = check_filename(raw_name.decode("utf-8", "replace"))
        self.upload = self.storage.begin(self.max_bytes)
        self._in_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file or self.upload is None:
            return
        before = len(self.upload.head)
        try:
            self.upload.write(data[start:end])
        except UploadTooLarge:
            raise UploadRejected(
                413, "too_large",
                f"the upload is larger than the limit of {self.max_bytes} bytes") from None
        if before < HEAD_BYTES_PDF <= len(self.upload.head) and not looks_like_pdf(self.upload.head):
            raise _not_pdf()

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.done = True

    # -- driving ----------------------------------------------------------
    async def consume(self, stream: AsyncIterator[bytes]) -> None:
        """Reads the body; raises :class:`UploadRejected` after draining."""
        try:
            async for chunk in stream:
                if chunk:
                    self.parser.write(chunk)
            self.parser.finalize()
        except UploadRejected:
            self.abort()
            await _drain(stream)
            raise
        except MultipartParseError as e:
            self.abort()
            await _drain(stream)
            raise UploadRejected(400, "bad_multipart", f"malformed multipart body: {e}") from None
        if self.upload is None:
            raise UploadRejected(400, "missing_file",
                                 "no file in the request: send it in the multipart field 'file'")
        if self.upload.size == 0:
            self.abort()
            raise UploadRejected(400, "empty_file", "the uploaded file is empty (0 bytes)")
        if not looks_like_pdf(self.upload.head):
            self.abort()
            raise _not_pdf()

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.discard()


def _not_pdf() -> UploadRejected:
    return UploadRejected(
        415, "not_a_pdf",
        "the upload is not a PDF: it has no '%PDF-' header in its first 1024 bytes")


async def _drain(stream: AsyncIterator[bytes]) -> None:
    read = 0
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        async for chunk in stream:
            read += len(chunk)
            if read > DRAIN_LIMIT or time.monotonic() > deadline:
                break
    except Exception:
        pass
