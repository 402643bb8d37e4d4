"""An OpenAI-compatible HTTP server over one Runtime (`offload serve`; needs the `serve` extra).

    from offload.server import ServerConfig, serve
    serve(offload.load(None), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import os

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "serve", "served_name"]


def served_name(model: str | os.PathLike | None) -> str:
    """The model id clients use: 'demo' for the demo model, a local path's last part, or the hub id as given."""
    if model is None:
        return "demo"
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else str(model)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Serve `llm` until interrupted (Ctrl-C), with uvicorn."""
    import uvicorn

    app = create_app(llm, config or ServerConfig())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
