"""The catalog server: ``machinable serve``, a read-only HTTP front door to catalogs.

``app`` builds the ASGI app, ``views/`` holds the JSON API and the browser page,
``static/`` the page's script and styles, ``config`` what a server serves and who may
read it, ``auth`` the token gate.
"""

from __future__ import annotations

from machinable.server.app import create_app, serve
from machinable.server.config import ServerConfig, make_config

__all__ = ["ServerConfig", "create_app", "make_config", "serve"]
