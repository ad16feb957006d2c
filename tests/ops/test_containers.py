"""Dockerfile and docker-compose.yml, checked without a container runtime: the Dockerfile's
rules by parsing it, the compose file against the Compose specification's JSON schema (the
copy vendored in the check-jsonschema package: no network), and every file they name."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import check_jsonschema
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from k2d.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
COMPOSE_SCHEMA = (
    Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
)


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions per stage, each list starting with its FROM."""
    out: list[list[dict[str, Any]]] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def validate_compose(doc: Any) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


# Dockerfile


def test_multi_stage_from_python_slim_with_pinned_tags(dockerfile: DockerfileParser) -> None:
    assert len(dockerfile.parent_images) >= 2
    for image in dockerfile.parent_images:
        name, _, tag = image.partition(":")
        assert name == "python" and "slim" in tag, image
        assert re.match(r"\d+\.\d+", tag), f"{image}: pin a Python version"
        assert tag != "latest"


def test_the_runtime_stage_takes_the_builders_venv_only(dockerfile: DockerfileParser) -> None:
    builder, runtime = stages(dockerfile)[0], stages(dockerfile)[-1]
    assert builder[0]["value"].split()[-2:] == ["AS", "builder"]
    assert any("wheel" in v for v in values(builder, "RUN"))
    copies = values(runtime, "COPY")
    assert any(v.startswith("--from=builder /opt/k2d ") for v in copies)
    assert not any("pip install" in v for v in values(runtime, "RUN"))


def test_the_final_stage_runs_as_a_non_root_user(dockerfile: DockerfileParser) -> None:
    users = values(stages(dockerfile)[-1], "USER")
    assert users, "no USER in the final stage: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_healthcheck_asks_ready_with_python_not_curl(dockerfile: DockerfileParser) -> None:
    (check,) = values(stages(dockerfile)[-1], "HEALTHCHECK")
    assert "CMD" in check
    assert "http://127.0.0.1:8765/ready" in check
    assert "urllib.request" in check
    assert not re.search(r"\b(curl|wget)\b", check)


def test_no_download_tools_and_no_remote_add(dockerfile: DockerfileParser) -> None:
    for ins in dockerfile.structure:
        if ins["instruction"] in ("RUN", "HEALTHCHECK", "ENTRYPOINT", "CMD"):
            assert not re.search(r"\b(curl|wget)\b", ins["value"]), ins["content"]
        if ins["instruction"] == "ADD":
            assert not re.search(r"https?://", ins["value"]), ins["content"]


def test_port_volume_and_entrypoint(dockerfile: DockerfileParser) -> None:
    runtime = stages(dockerfile)[-1]
    assert values(runtime, "EXPOSE") == ["8765"]
    assert values(runtime, "VOLUME") == ["/var/lib/k2d"]
    (entrypoint,) = values(runtime, "ENTRYPOINT")
    argv = json.loads(entrypoint)
    assert argv[0].endswith("k2d") and argv[1:3] == ["run", "--config"]
    assert argv[3] == "/etc/k2d/config.toml"
    assert any(v == "config.toml /etc/k2d/config.toml" for v in values(runtime, "COPY"))


def test_the_image_environment_is_valid_k2d_config(dockerfile: DockerfileParser) -> None:
    env = {k: v for k, v in dockerfile.envs.items() if k.startswith("K2D_")}
    cfg = load_config(ROOT / "config.toml", environ=env)
    assert str(cfg.storage.data_path()) == "/var/lib/k2d"
    assert cfg.api.port == 8765  # what EXPOSE and HEALTHCHECK name


def test_copied_sources_exist_and_are_not_dockerignored(dockerfile: DockerfileParser) -> None:
    ignored = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    sources: list[str] = []
    for ins in dockerfile.structure:
        if ins["instruction"] in ("COPY", "ADD"):
            args = [a for a in ins["value"].split() if not a.startswith("--")]
            if "--from=" not in ins["value"]:
                sources += args[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        hits = [p for p in ignored if fnmatch.fnmatch(src, p) or src.startswith(f"{p}/")]
        assert hits == [], f"COPY {src} is excluded by .dockerignore {hits}"


# docker-compose.yml


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    assert validate_compose(COMPOSE) == []


def test_the_schema_check_rejects_a_broken_compose_file() -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["k2d"]["restart_policy"] = "always"  # not a Compose key
    broken["services"]["prometheus"]["ports"] = 9090  # must be a list
    errors = validate_compose(broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any("ports" in e for e in errors), errors


def test_the_stack_has_k2d_prometheus_grafana_and_a_collector() -> None:
    assert set(SERVICES) == {"k2d", "prometheus", "grafana", "otel-collector"}
    assert SERVICES["k2d"]["build"]["context"] == "."
    assert (ROOT / SERVICES["k2d"]["build"]["dockerfile"]).is_file()
    assert SERVICES["otel-collector"]["image"].startswith("otel/opentelemetry-collector:")


def test_images_are_pinned() -> None:
    for name, svc in SERVICES.items():
        image = svc["image"]
        tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: {image} is not pinned"


def test_ports_are_published_on_loopback_only() -> None:
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> repository file, for the service's ./ bind mounts."""
    out: dict[str, Path] = {}
    for volume in SERVICES[service].get("volumes", []):
        src, target = volume.split(":")[:2]
        if src.startswith("./"):
            out[target] = ROOT / src
    return out


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_mounted_files_exist_in_the_repository(service: str) -> None:
    for target, src in bind_mounts(service).items():
        assert src.exists(), f"{service}: {src} (mounted at {target}) is missing"


def test_prometheus_gets_its_rules_beside_its_config() -> None:
    mounts = bind_mounts("prometheus")
    config_path = next(t for t in mounts if t.endswith("prometheus.yml"))
    config = yaml.safe_load(mounts[config_path].read_text())
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert in_container in mounts, f"{rule_file} is not mounted at {in_container}"
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert "k2d:8765" in targets


def test_grafana_provisions_the_dashboard_and_the_datasource() -> None:
    mounts = bind_mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "k2d.yml").read_text())["providers"]
    dashboard_dir = provider["options"]["path"]
    assert mounts[f"{dashboard_dir}/k2d.json"] == ROOT / "deploy" / "grafana" / "k2d.json"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname in SERVICES and url.port == 9090


def test_k2d_exports_spans_to_the_collectors_otlp_http_receiver() -> None:
    mounts = bind_mounts("otel-collector")
    command = SERVICES["otel-collector"]["command"]
    config_path = next(c.split("=", 1)[1] for c in command if c.startswith("--config="))
    config = yaml.safe_load(mounts[config_path].read_text())
    http = config["receivers"]["otlp"]["protocols"]["http"]
    endpoint = SERVICES["k2d"]["environment"]["K2D_TELEMETRY__OTLP_ENDPOINT"]
    url = urlsplit(endpoint)
    assert url.hostname == "otel-collector" and url.scheme == "http"
    assert http["endpoint"].rsplit(":", 1)[1] == str(url.port)
    cfg = load_config(ROOT / "config.toml", environ=SERVICES["k2d"]["environment"])
    assert cfg.telemetry.otlp_endpoint == endpoint
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} is not defined in {kind}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


# docker-compose.kafka.yml (Kafka mode, on top of docker-compose.yml)

KAFKA_COMPOSE = yaml.safe_load((ROOT / "docker-compose.kafka.yml").read_text())


def test_the_kafka_override_is_valid_against_the_compose_spec() -> None:
    assert validate_compose(KAFKA_COMPOSE) == []


def test_the_kafka_override_runs_a_kraft_broker_k2d_waits_for() -> None:
    kafka = KAFKA_COMPOSE["services"]["kafka"]
    image = kafka["image"]
    assert image.startswith("apache/kafka:") and image.rpartition(":")[2].startswith("4.")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["healthcheck"]["test"] and kafka["volumes"]
    assert kafka["deploy"]["resources"]["limits"]["memory"]
    assert "ports" not in kafka, "the broker stays inside the compose network"
    k2d = KAFKA_COMPOSE["services"]["k2d"]
    assert k2d["depends_on"]["kafka"]["condition"] == "service_healthy"
    host = env["KAFKA_ADVERTISED_LISTENERS"].split("//", 1)[1]
    assert k2d["environment"]["K2D_KAFKA__BOOTSTRAP_SERVERS"] == host


def test_the_kafka_override_environment_is_valid_k2d_config() -> None:
    from k2d.config import load_config

    env = {k: str(v) for k, v in KAFKA_COMPOSE["services"]["k2d"]["environment"].items()}
    cfg = load_config(ROOT / "config.toml", environ=env)
    assert cfg.kafka.enabled and cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.kafka.instance_id == "k2d-compose"
