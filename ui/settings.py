"""The UI's own settings (env ``RAGLOOM_UI__API_URL``, ``RAGLOOM_UI__API_KEY``, ...).

The UI talks to the API over HTTP only, so it reads just these few variables
instead of importing ``app.settings``.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class UiSettings(BaseSettings):
    """Where the API is and how to call it.

    Example:
        >>> settings = UiSettings()          # RAGLOOM_UI__API_URL, RAGLOOM_UI__API_KEY
        >>> settings.api_url
        'http://127.0.0.1:8000'
    """

    model_config = SettingsConfigDict(env_prefix="RAGLOOM_UI__", extra="ignore")

    api_url: str = Field(default="http://127.0.0.1:8000", description="Base URL of the REST API.")
    api_key: SecretStr | None = Field(
        default=None, description="API key sent as 'Authorization: Bearer'; unset when auth is off."
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds to wait for a reply (the API loads its embedding model on first use).",
    )
    chat_timeout_s: float = Field(
        default=180.0, gt=0, description="Seconds to wait for each piece of a streamed answer."
    )
    job_timeout_s: float = Field(
        default=600.0, gt=0, description="How long the Documents page follows an ingestion job."
    )
