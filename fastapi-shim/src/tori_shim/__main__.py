"""``python -m tori_shim`` / ``tori-shim``: serve the app with uvicorn."""
from __future__ import annotations

import argparse
import logging
import os


def main() -> None:
    p = argparse.ArgumentParser(description="tori-shim: upload PDFs to tori-worker")
    p.add_argument("--host", default=os.environ.get("TORI_SHIM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("TORI_SHIM_PORT", "8000")))
    p.add_argument("--log-level", default="info")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvicorn

    uvicorn.run("tori_shim.asgi:app", host=args.host, port=args.port,
                log_level=args.log_level, proxy_headers=True)


if __name__ == "__main__":
    main()
