"""compose.yaml and the Dockerfile: valid for docker-compose, and wired to routes and settings.

``docker-compose config`` (Debian package ``docker-compose``) validates the file;
the wiring checks read the YAML: every ``RAGLOOM_*`` variable names a Settings
field, every health URL is a route of the app it probes, ports agree, and every
``depends_on`` waits for a healthy service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _health_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:\d+/[\w/]*", test)
    assert match, f"no health URL in {test!r}"
    return match.group(0)


def _setting_exists(name: str) -> bool:
    parts = name.removeprefix("RAGLOOM_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_docker_compose_config_accepts_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: bash scripts/setup.sh installs it")
    for profile in ("cpu", "gpu"):
        result = subprocess.run(
            [binary, "-f", str(COMPOSE), "--profile", profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"api", "ui", "chroma", "engine", "vllm"}
    assert services["engine"]["profiles"] == ["cpu"]
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["chroma"]["image"].startswith("chromadb/chroma")
    assert any("chroma" in v for v in services["chroma"]["volumes"])
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    command = vllm["command"]
    assert "--enable-auto-tool-choice" in command
    assert command[command.index("--tool-call-parser") + 1] == "hermes"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"].get("start_period"), f"{name} has no start_period"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}"


def test_environment_names_settings_fields(compose: dict[str, Any]) -> None:
    for name in ("api", "engine"):
        for var in compose["services"][name].get("environment", {}):
            if var.startswith("RAGLOOM_"):
                assert _setting_exists(var), f"{name}: {var} is not a Settings field"
    assert not _setting_exists("RAGLOOM_API__NO_SUCH_FIELD")  # the check can fail


def test_ui_environment_names_ui_settings_fields(compose: dict[str, Any]) -> None:
    from ui.settings import UiSettings

    service = compose["services"]["ui"]
    names = [v for v in service.get("environment", {}) if v.startswith("RAGLOOM_")]
    assert "RAGLOOM_UI__API_URL" in names
    for var in names:
        field = var.removeprefix("RAGLOOM_UI__").lower()
        assert var.startswith("RAGLOOM_UI__") and field in UiSettings.model_fields, var
    # inside the container the UI must listen beyond loopback for the published port
    assert "0.0.0.0" in service["command"]


def test_health_urls_are_routes_and_ports_agree(
    compose: dict[str, Any], tmp_path: Path, embedder: Any
) -> None:
    from app.main import create_app
    from llm_backend import ScriptedBackend
    from llm_backend.engine.server import create_app as create_engine_app

    services = compose["services"]
    api = create_app(Settings(data_dir=tmp_path), backend=ScriptedBackend([]), embedder=embedder)
    api_paths = set(api.openapi()["paths"])
    engine_paths = set(create_engine_app(None).openapi()["paths"])  # type: ignore[arg-type]
    api_url = urlparse(_health_url(services["api"]))
    assert api_url.path in api_paths
    api_cmd = services["api"]["command"]
    assert str(api_url.port) == api_cmd[api_cmd.index("--port") + 1]
    assert services["api"]["ports"][0].endswith(f":{api_url.port}")
    assert services["api"]["ports"][0].startswith("127.0.0.1:")

    engine_url = urlparse(_health_url(services["engine"]))
    assert engine_url.path in engine_paths
    engine_cmd = services["engine"]["command"]
    assert str(engine_url.port) == engine_cmd[engine_cmd.index("--port") + 1]
    env = services["api"]["environment"]
    backend_default = re.search(r":-([^}]+)}", env["RAGLOOM_AGENT__BASE_URL"])
    assert backend_default, "RAGLOOM_AGENT__BASE_URL needs a default"
    backend = urlparse(backend_default.group(1))
    assert (backend.hostname, backend.port) == ("engine", engine_url.port)
    assert backend.path == "/v1" and "/v1/chat/completions" in engine_paths
    chroma = urlparse(env["RAGLOOM_RETRIEVAL__CHROMA_URL"])
    assert chroma.hostname == "chroma"
    assert f"/dev/tcp/127.0.0.1/{chroma.port}" in " ".join(
        services["chroma"]["healthcheck"]["test"]
    )
    assert env.get("RAGLOOM_API__AUTH", "on") == "on"  # listens on 0.0.0.0 in the container


def test_dockerfile_installs_cpu_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index("torch==2.13.0")
    assert "download.pytorch.org/whl/cpu" in text[torch_at : torch_at + 120]
    assert torch_at < text.index("pip install .")
    assert '"ragloom", "serve"' in text
