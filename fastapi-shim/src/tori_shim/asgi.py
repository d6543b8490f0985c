"""ASGI entry point configured from the environment: ``uvicorn tori_shim.asgi:app``."""
from .app import create_app

app = create_app()
