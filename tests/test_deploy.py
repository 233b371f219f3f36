"""Deployment checks that run without a Docker engine.

hadolint on both Dockerfiles; the compose files against the compose specification and what the
stack relies on (ports, health checks, the scrape target and the Grafana wiring); ``promtool
check config``; the Grafana dashboard's queries against the metrics the service exports; and an
end-to-end run of the real service scraped by a real Prometheus on loopback.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "recmix.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "recmix.yml"
SERVICE = "recmix"  # the compose service, and the Prometheus job that scrapes it
SERVICE_PORT = 8000


# --- helpers ------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a command-line tool: the venv's first, then PATH; a missing one fails the test."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found:
        return found
    message = (
        f"{name} is not installed: hadolint and check-jsonschema come with the dev extra, "
        "promtool and prometheus with Debian's prometheus package"
    )
    pytest.fail(message)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        return yaml.safe_load(fh)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    defaults = {}
    for kw, rest in _instructions(dockerfile):
        if kw == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching pattern wins)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        cleaned = pattern[1:] if negate else pattern
        cleaned = cleaned.strip().lstrip("/").removeprefix("./").rstrip("/")
        rx = regex(cleaned)
        if any(rx.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for the keys used here: mappings merge, rest replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _env_names(environment: list[str] | dict[str, Any]) -> set[str]:
    if isinstance(environment, dict):
        return set(environment)
    return {item.partition("=")[0] for item in environment}


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).partition("/")[0]))
    return ports


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of the service's short-syntax bind mounts."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = str(entry).split(":")
        if source.startswith((".", "/", "$")):
            mounts[target] = source
    return mounts


# --- Dockerfiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    # The lowest threshold: a style remark fails too. Inline ignores carry their reason above them.
    result = _run(hadolint, "--failure-threshold", "style", "--format", "json", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout or "[]") == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_explained(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert n > 0 and lines[n - 1].lstrip().startswith("#"), (
                f"{dockerfile.name}:{n + 1}: say why above the ignore"
            )


@pytest.mark.parametrize(
    ("dockerfile", "extra", "base"),
    [
        (DOCKER / "Dockerfile", "serve", r"python:\d+\.\d+\.\d+-slim-\w+"),
        (DOCKER / "Dockerfile.gpu", "serve-gpu", r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-\S+"),
    ],
    ids=["cpu", "gpu"],
)
def test_dockerfile_serves_as_a_non_root_user_with_a_readiness_check(
    dockerfile: Path, extra: str, base: str
) -> None:
    text = dockerfile.read_text()
    assert not any("torch" in rest for _, rest in _instructions(dockerfile)), "no torch"
    args = _arg_defaults(dockerfile)
    base_image = next(v for k, v in args.items() if k.endswith("_IMAGE"))
    assert re.fullmatch(base, base_image), f"base image not pinned by version: {base_image}"
    assert f'".[{extra}]"' in text

    final = _final_stage(dockerfile)
    keywords = [kw for kw, _ in final]
    user = [rest for kw, rest in final if kw == "USER"]
    assert user, "the final stage must switch to a non-root user"
    uid = user[-1].partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-zero uid (Kubernetes runAsNonRoot)"
    assert keywords.index("USER") < keywords.index("CMD")

    copies = [rest for kw, rest in final if kw == "COPY"]
    assert any(c.split()[0] == "models/" for c in copies), "the shipped models are baked in"
    env = " ".join(rest for kw, rest in final if kw == "ENV")
    model_dir = re.search(r"RECMIX_MODEL_DIR=(\S+)", env)
    assert model_dir, "RECMIX_MODEL_DIR points at the baked-in models"
    assert any(c.split()[-1].rstrip("/") == model_dir.group(1) for c in copies)
    for setting in ("RECMIX_HOST=0.0.0.0", f"RECMIX_PORT={SERVICE_PORT}", "RECMIX_WORKERS="):
        assert setting in env
    if extra == "serve-gpu":
        assert "RECMIX_PROVIDER=cuda" in env

    healthcheck = [rest for kw, rest in final if kw == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "healthcheck.py" in healthcheck[0]
    assert "/readyz" in (DOCKER / "healthcheck.py").read_text()
    cmd = [rest for kw, rest in final if kw == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["recmix-serve"], "exec form, so the server is PID 1"
    assert str(SERVICE_PORT) in [rest for kw, rest in final if kw == "EXPOSE"]


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for dockerfile in DOCKERFILES:
        for kw, rest in _instructions(dockerfile):
            if kw != "COPY" or rest.startswith("--from"):
                continue
            for source in rest.split()[:-1]:
                assert not _dockerignore_excludes(source, patterns), (dockerfile.name, source)
                if source.endswith("/"):
                    assert not _dockerignore_excludes(source + "some/file", patterns), source
    for unwanted in (
        ".git/config",
        ".venv/bin/python",
        "runs/recmix/checkpoint.pt",
        "tests/test_deploy.py",
        ".pytest_cache/v/cache",
        "service/__pycache__/app.cpython-312.pyc",
        "models/.mypy_cache/x",
        "recmix.egg-info/PKG-INFO",
        ".env",
    ):
        assert _dockerignore_excludes(unwanted, patterns), unwanted


# --- compose ------------------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification() -> None:
    check = _tool("check-jsonschema")
    # The schema ships inside check-jsonschema: no network is needed.
    result = _run(check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_service_prometheus_and_grafana() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {SERVICE, "prometheus", "grafana"} <= set(services)

    api = services[SERVICE]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / api["build"].get("context", ".") / api["build"]["dockerfile"]).is_file()
    assert _container_ports(api) == {SERVICE_PORT}
    assert any(str(p).endswith(f":-{SERVICE_PORT}}}:{SERVICE_PORT}") for p in api["ports"])
    health = api["healthcheck"]
    assert health["test"][0] == "CMD" and "/app/healthcheck.py" in health["test"]
    models = [v for v in api["volumes"] if ":/app/models:" in str(v)]
    assert models and str(models[0]).endswith(":ro"), "models are mounted read-only"
    # SIGTERM drains for a while, then in-flight requests get a grace period; compose must wait.
    from service.settings import Settings

    defaults = Settings.model_fields
    drain = defaults["drain_seconds"].default + defaults["graceful_timeout"].default
    assert float(str(api["stop_grace_period"]).removesuffix("s")) > drain
    assert "RECMIX_PORT" not in _env_names(api.get("environment", []))

    prometheus = services["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    config_in_container = config_flag.partition("=")[2]
    assert (ROOT / mounts[config_in_container]).resolve() == PROMETHEUS_CONFIG
    assert _container_ports(prometheus) == {9090}

    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    providers = _load_yaml(DASHBOARD_PROVIDERS)["providers"]
    dashboards_in_container = providers[0]["options"]["path"]
    assert (ROOT / mounts[dashboards_in_container]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
    assert set(grafana["depends_on"]) == {"prometheus", SERVICE}
    assert grafana["depends_on"][SERVICE]["condition"] == "service_healthy"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"

    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            if not source.startswith("$"):
                assert (ROOT / source).exists(), f"{name}: {source} -> {target} does not exist"


def test_gpu_override_reserves_a_gpu_for_the_cuda_image() -> None:
    merged = _merge(_load_yaml(COMPOSE), _load_yaml(COMPOSE_GPU))
    api = merged["services"][SERVICE]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert (ROOT / api["build"]["context"] / api["build"]["dockerfile"]).is_file()
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "RECMIX_PROVIDER=cuda" in api["environment"]
    # Nothing else changes: same port, same health check, same scrape target.
    assert _container_ports(api) == {SERVICE_PORT}
    assert (
        api["healthcheck"]["test"]
        == _load_yaml(COMPOSE)["services"][SERVICE]["healthcheck"]["test"]
    )
    assert set(_load_yaml(COMPOSE_GPU)["services"]) == {SERVICE}


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_service() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[SERVICE]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    interval = job.get("scrape_interval", config["global"]["scrape_interval"])
    assert interval == "5s"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [SERVICE] and sd["type"] == "A" and sd["port"] == SERVICE_PORT
    assert SERVICE in _load_yaml(COMPOSE)["services"]


# --- Grafana ------------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_PROMQL_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
_PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every target


def _metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, labels and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    words = re.findall(r"(?<![\w$.])[A-Za-z_:][\w:]*\b(?!\s*\()", text)
    return {w for w in words if w.lower() not in _PROMQL_KEYWORDS}


def _exported_series() -> dict[str, str]:
    """Series name -> its metric family, for every metric the service exports."""
    from service.http import metrics

    families = {}
    for collector in metrics.Metrics().registry._collector_to_names:
        for family in collector.describe():
            families[family.name] = family.type
    series = {}
    for name in metrics.METRIC_NAMES:
        family = name.removesuffix("_total")
        kind = families[family]
        if kind == "histogram":
            series.update({f"{name}{s}": name for s in ("_bucket", "_sum", "_count")})
        elif kind == "counter":
            series[f"{family}_total"] = name
        else:
            series[name] = name
    return series


def _dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", query)
            assert found, f"variable {var['name']}: {query}"
            queries.append((f"variable {var['name']!r}", found.group(1)))
    return queries


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{x=~"b|c"}[$__interval])))'
        " / on (endpoint) group_left sum(rate(d_total[5m])) > bool 0 and up"
    )
    assert _metric_names(expr) == {"a_bucket", "d_total", "up"}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = _exported_series()
    used: set[str] = set()
    for where, expr in _dashboard_queries(dashboard):
        names = _metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names - _PROMETHEUS_OWN:
            assert name in series, f"{where}: {name} is not a series the service exports"
            used.add(series[name])
    from service.http.metrics import METRIC_NAMES

    assert used == set(METRIC_NAMES), f"not on the dashboard: {set(METRIC_NAMES) - used}"


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = _load_yaml(DATASOURCES)["datasources"][0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid

    exprs = [t["expr"] for p in panels for t in p["targets"]]
    request = "recmix_request_duration_seconds"
    assert any(f"rate({request}_count" in e and "by (endpoint)" in e for e in exprs)
    assert any('status_class="5xx"' in e for e in exprs), "error rate"
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile}, sum by (le, endpoint) (rate({request}")
            for e in exprs
        ), f"request latency quantile {quantile} per endpoint"
    inference = "recmix_inference_duration_seconds_bucket"
    assert any(inference in e and "by (le, model, stage)" in e for e in exprs)
    assert any(inference in e and "component_" in e for e in exprs)
    assert any("recmix_batch_size_bucket" in e for e in exprs)

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["recmix_model"]["query"] == "mnist-recmix"
    assert variables["vae_model"]["query"] == "mnist-vae"
    (side_by_side,) = [p for p in panels if "$recmix_model|$vae_model" in json.dumps(p)]
    assert side_by_side["type"] == "timeseries"
    # The whole encode step of each model (fused graph or components, and the mixture weights).
    assert all('stage="encode"' in t["expr"] for t in side_by_side["targets"])

    datasource = _load_yaml(DATASOURCES)["datasources"][0]
    host, _, port = urllib.parse.urlsplit(datasource["url"]).netloc.partition(":")
    assert host == "prometheus" and int(port) in _container_ports(
        _load_yaml(COMPOSE)["services"]["prometheus"]
    )


# --- the service scraped by a real Prometheus ---------------------------------------------------

# Loopback only, and never through a proxy that the environment may name.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with _LOCAL.open(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _prometheus_query(base: str, query: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with _LOCAL.open(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """Run a process in its own session; on the way out, stop it and anything it started."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def _wait_for(what: str, check: Any, proc: Any, log: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{_tail(log)}")
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(log)}")


@pytest.fixture(scope="module")
def model_repo(tiny_model_repo: Path) -> Path:
    """A small model repository: the suite's tiny models, exported by the real export code."""
    return tiny_model_repo


def _png(size: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size), color=128).save(buffer, format="PNG")
    return buffer.getvalue()


def _traffic(base: str, models: list[str], stop: threading.Event) -> None:
    """Bounded load on loopback: at most 1200 requests, and never past 120 s."""
    boundary = "recmixdeploytest"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
    body = (
        (head + "Content-Type: image/png\r\n\r\n").encode()
        + _png(28)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    deadline = time.monotonic() + 120
    for n in range(600):
        if stop.is_set() or time.monotonic() > deadline:
            return
        _http(f"{base}/encode?model={models[n % len(models)]}", data=body, headers=headers)
        _http(f"{base}/models")
        stop.wait(0.05)


def _dashboard_exprs_for(models: list[str]) -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    values = {
        "$__rate_interval": "20s",
        "$__range": "5m",
        "$model": ".*",
        "$endpoint": ".*",
        "$recmix_model": models[0],
        "$vae_model": models[-1],
    }
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(name, values[name])
            assert "$" not in expr, expr
            exprs.append(expr)
    return exprs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prometheus_scrapes_the_running_service(model_repo: Path, tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    from service.model.repository import discover

    models = [folder.name for folder in discover(model_repo)]
    assert models
    api_port, prometheus_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECMIX_")}
    env.update(
        RECMIX_MODEL_DIR=str(model_repo),
        RECMIX_DEFAULT_MODEL=models[0],
        RECMIX_HOST="127.0.0.1",
        RECMIX_PORT=str(api_port),
        RECMIX_WORKERS="1",
        RECMIX_PROVIDER="cpu",
        RECMIX_LOG_LEVEL="warning",
    )

    # The compose configuration, with the compose service's address swapped for loopback.
    config = _load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == SERVICE]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    prom = f"http://127.0.0.1:{prometheus_port}"

    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"
    # The image's command, recmix-serve, where the project is installed; else the same main().
    script = Path(sys.executable).parent / "recmix-serve"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]
    with _process(command, service_log, env) as service:
        _wait_for(
            "/readyz", lambda: _http(f"{api}/readyz") == 200, service, service_log, timeout=120
        )
        # The image's HEALTHCHECK command, against the live service and against a closed port.
        probe = [sys.executable, str(DOCKER / "healthcheck.py")]
        ok = subprocess.run(probe, env={**env, "RECMIX_PORT": str(api_port)}, timeout=30)
        closed = subprocess.run(
            probe, env={**env, "RECMIX_PORT": str(_free_port())}, capture_output=True, timeout=30
        )
        assert (ok.returncode, closed.returncode) == (0, 1)

        stop = threading.Event()
        load = threading.Thread(target=_traffic, args=(api, models, stop), daemon=True)
        args = [
            prometheus,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
        with _process(args, prometheus_log) as server:
            load.start()
            try:
                _wait_for(
                    "Prometheus ready",
                    lambda: _http(f"{prom}/-/ready") == 200,
                    server,
                    prometheus_log,
                    timeout=60,
                )

                def target_up() -> bool:
                    answer = _prometheus_query(prom, f'up{{job="{SERVICE}"}}')
                    result = answer.get("data", {}).get("result", [])
                    return bool(result) and result[0]["value"][1] == "1"

                _wait_for("up == 1", target_up, server, prometheus_log, timeout=60)

                p99 = (
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(recmix_request_duration_seconds_bucket[30s])))"
                )

                def quantile() -> float | None:
                    result = _prometheus_query(prom, p99).get("data", {}).get("result", [])
                    value = float(result[0]["value"][1]) if result else math.nan
                    return value if math.isfinite(value) else None

                seconds = _wait_for("a finite p99", quantile, server, prometheus_log, timeout=90)
                assert 0 < seconds < 10

                inference = _prometheus_query(
                    prom, 'sum by (model) (recmix_inference_duration_seconds_count{stage="encode"})'
                )["data"]["result"]
                assert {r["metric"]["model"] for r in inference} & set(models), (
                    "no encode was timed: the /encode traffic failed\n" + _tail(service_log)
                )
                info = _prometheus_query(prom, "recmix_model_info")["data"]["result"]
                assert {r["metric"]["model"] for r in info} == set(models)

                # Every dashboard query parses and runs on a real Prometheus.
                for expr in _dashboard_exprs_for(models):
                    answer = _prometheus_query(prom, expr)
                    assert answer["status"] == "success", (expr, answer)
            finally:
                stop.set()
                load.join(timeout=15)
