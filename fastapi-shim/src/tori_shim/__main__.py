"""``python -m tori_shim`` / ``tori-shim``: serve the app with uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .auth import AuthConfigError, is_loopback, truthy

#: sysexits' EX_CONFIG, as tori-worker uses for a configuration it refuses.
EXIT_CONFIG = 78


def main() -> None:
    p = argparse.ArgumentParser(description="tori-shim: upload PDFs to tori-worker")
    p.add_argument("--host", default=os.environ.get("TORI_SHIM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("TORI_SHIM_PORT", "8000")))
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-auth", action="store_true",
                   default=truthy(os.environ.get("TORI_SHIM_NO_AUTH")),
                   help="serve without API keys (every caller is owner 'anonymous'); "
                        "loopback only (also TORI_SHIM_NO_AUTH=1)")
    args = p.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger("tori_shim")
    if args.no_auth:
        # The app reads its settings from the environment (tori_shim.asgi).
        os.environ["TORI_SHIM_NO_AUTH"] = "1"
        if not is_loopback(args.host):
            log.error("--no-auth serves without authentication and so binds to loopback "
                      "only; refusing --host %s (use 127.0.0.1, or configure API keys)",
                      args.host)
            sys.exit(EXIT_CONFIG)
        log.warning("--no-auth: NO authentication; listening on %s only (loopback)",
                    args.host)
    else:
        from .config import Settings

        try:
            settings = Settings.from_env()
        except AuthConfigError as e:
            log.error("%s", e)
            sys.exit(EXIT_CONFIG)
        if not settings.api_keys:
            log.error("no API keys configured: set TORI_SHIM_API_KEYS=owner:key[,owner2:key2] "
                      "or TORI_SHIM_API_KEYS_FILE, or pass --no-auth (loopback only)")
            sys.exit(EXIT_CONFIG)
    import uvicorn

    uvicorn.run("tori_shim.asgi:app", host=args.host, port=args.port,
                log_level=args.log_level, proxy_headers=True)


if __name__ == "__main__":
    main()
