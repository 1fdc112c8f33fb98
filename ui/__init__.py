"""ragloom's Streamlit chat UI: talks to the REST API over HTTP only.

Run it with ``ragloom ui`` (or ``streamlit run ui/streamlit_app.py``); the API
URL and key come from ``RAGLOOM_UI__API_URL`` and ``RAGLOOM_UI__API_KEY``.
"""

from ui.client import ApiClient, ApiError, SseEvent, iter_sse
from ui.sanitize import StreamSanitizer, sanitize_markdown
from ui.settings import UiSettings

__all__ = [
    "ApiClient",
    "ApiError",
    "SseEvent",
    "StreamSanitizer",
    "UiSettings",
    "iter_sse",
    "sanitize_markdown",
]
