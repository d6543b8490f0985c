"""tori_shim: a FastAPI service in front of tori-worker (see create_app)."""
from .app import create_app
from .config import Settings

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"
