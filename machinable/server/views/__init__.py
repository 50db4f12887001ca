"""The server's views, one module per kind: ``api`` (JSON) and ``page`` (the browser)."""
