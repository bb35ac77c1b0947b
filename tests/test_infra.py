"""Infrastructure files: what can be checked without a Docker engine or a cluster — the compose
stack, Dockerfile and Kubernetes manifests parse and agree on images, env, secrets, buckets and
queues; deployment entrypoints import; and infra/bootstrap.py against real S3/SQS and Prefect."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
import yaml
from prefect import Flow

from tasks.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
EVENTS = INFRA / "docker-compose.events.yml"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
RADFLOW_IMAGE = "${RADFLOW_IMAGE:-radflow:latest}"

# infra/ is not a package: load its bootstrap script by file name
_spec = importlib.util.spec_from_file_location("radflow_bootstrap", INFRA / "bootstrap.py")
bootstrap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bootstrap)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d | {"_file": path.name} for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _merged_services() -> dict[str, dict]:
    """Base compose file plus the events overlay, merged service by service like compose does."""
    services = {k: dict(v) for k, v in _load(COMPOSE)["services"].items()}
    for name, overlay in _load(EVENTS)["services"].items():
        merged = services.setdefault(name, {})
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return services


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    if isinstance(command, str):
        return shlex.split(command)
    if service.get("entrypoint") == ["/bin/sh", "-c"]:
        return shlex.split(" ".join(command))
    return [str(c) for c in command]


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# -- docker compose ---------------------------------------------------------------------------


def test_compose_services_use_one_radflow_image_built_from_the_dockerfile():
    services = _merged_services()
    radflow = {n for n, s in services.items() if s.get("image") == RADFLOW_IMAGE}
    assert {"radflow-worker", "radflow-deploy", "simulator", "bridge", "s3-sqs-init"} <= radflow
    for path in (COMPOSE, EVENTS):
        for name, service in _load(path)["services"].items():
            if service.get("image") == RADFLOW_IMAGE:
                build = service["build"]
                assert (path.parent / build["context"] / build["dockerfile"]).is_file(), name
    # every other image is pinned to a version, never :latest
    for name, service in services.items():
        if name not in radflow and "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name


def test_compose_dependencies_volumes_and_prefect_api_are_consistent():
    base = _load(COMPOSE)["services"]
    services = _merged_services()
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if name in base:
            for dep in base[name].get("depends_on", {}):
                assert dep in base, f"{name} needs {dep}, which only the overlay defines"
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (INFRA / src).is_file(), f"{name} mounts missing {src}"
    server = services["prefect-server"]
    port = _option(_command(server), "--port")
    for name in ("radflow-deploy", "radflow-worker", "bridge"):
        api = services[name]["environment"]["PREFECT_API_URL"]
        assert api == f"http://prefect-server:{port}/api", name
    assert "postgresql+asyncpg://" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    worker = _command(services["radflow-worker"])
    assert worker[:3] == ["prefect", "worker", "start"]
    pool = _option(worker, "--pool")
    deploy = _command(services["radflow-deploy"])
    assert deploy[deploy.index("work-pool") + 2] == pool
    assert _option(deploy, "--prefect-file") == "deployments/prefect.yaml"
    pools = {d["work_pool"]["name"] for d in _load(PREFECT_YAML)["deployments"]}
    assert pools == {pool}


def test_compose_config_buckets_queue_and_model_keys_agree():
    services = _merged_services()
    config_file = INFRA / "radflow.compose.yaml"
    settings = Settings.model_validate(_load(config_file))
    worker = services["radflow-worker"]
    mounted = {
        v.split(":")[1]: v.split(":")[0]
        for v in _load(COMPOSE)["services"]["radflow-worker"]["volumes"]
    }
    assert mounted[worker["environment"]["RADFLOW_CONFIG"]] == "./radflow.compose.yaml"
    buckets = {settings.source.split("/")[2], settings.output.split("/")[2]}
    made = _command(services["minio-init"])
    assert buckets <= {a.removeprefix("local/") for a in made if a.startswith("local/")}
    init = _command(services["s3-sqs-init"])
    assert buckets == {_option(init, "--bucket"), _option(init, "--output-bucket")}
    queue_url = _option(_command(services["bridge"]), "--queue-url")
    assert queue_url.endswith("/" + _option(init, "--queue"))
    assert queue_url.startswith(services["bridge"]["environment"]["AWS_ENDPOINT_URL"])
    assert worker["environment"]["AWS_ENDPOINT_URL_S3"] == "http://s3-sqs:5000"  # overlay wins
    # model keys: env var named in the config ← Secret block made by bootstrap ← prefect.yaml
    key_envs = {m.api_key_env for m in settings.models}
    assert key_envs == set(bootstrap.SECRET_BLOCKS.values())
    deploy_env = services["radflow-deploy"]["environment"]
    assert key_envs <= set(deploy_env)
    text = PREFECT_YAML.read_text()
    for block, env in bootstrap.SECRET_BLOCKS.items():
        assert f'{env}: "{{{{ prefect.blocks.secret.{block} }}}}"' in text
    for model in settings.models:
        assert model.base_url.startswith("http://simulator:8787")
    assert "8787" in _command(services["simulator"])


# -- Dockerfile -------------------------------------------------------------------------------


def _ignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (.dockerignore, gitignore-like patterns)."""
    import pathspec

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return pathspec.PathSpec.from_lines("gitignore", lines).match_file(path)


def test_dockerfile_copies_existing_unignored_files_and_runs_as_non_root():
    text = (INFRA / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M)
    sources = [s for line in copies for s in line.split()[:-1]]
    assert {"pyproject.toml", "uv.lock", "README.md", "flows/", "tasks/"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert not _ignored(src.rstrip("/")), f"COPY {src} is excluded by .dockerignore"
    for excluded in (".venv", ".git", "tests", "demo-output", "infra/k8s"):
        assert _ignored(excluded), excluded
    assert "uv sync --frozen --no-dev" in text and "-slim" in text
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}


# -- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_reference_defined_secrets_accounts_and_config():
    docs = _k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if "metadata" in d}
    secrets = {
        d["metadata"]["name"]: set(d["stringData"]) for d in docs if d.get("kind") == "Secret"
    }
    assert set(secrets["radflow-model-keys"]) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    assert all(
        v == "REPLACE_ME"
        for d in docs
        if d.get("kind") == "Secret"
        for v in d["stringData"].values()
    )
    template = json.loads((K8S / "base-job-template.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    bridge = next(d for d in docs if d.get("kind") == "Deployment")["spec"]["template"]["spec"]
    for spec in (pod, bridge):
        for container in spec["containers"]:
            for ref in container.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets
            for env in container.get("env", []) if isinstance(container.get("env"), list) else []:
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]
            assert container["resources"]["requests"]
    accounts = {name for kind, name in kinds if kind == "ServiceAccount"}
    variables = template["variables"]["properties"]
    assert variables["service_account_name"]["default"] in accounts
    assert bridge["serviceAccountName"] in accounts
    config_maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    (volume,) = pod["volumes"]
    config_map = config_maps[volume["configMap"]["name"]]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    (filename,) = config_map["data"]
    assert variables["env"]["default"]["RADFLOW_CONFIG"] == f"{mount}/{filename}"
    settings = Settings.model_validate(yaml.safe_load(config_map["data"][filename]))
    assert {m.api_key_env for m in settings.models} <= secrets["radflow-model-keys"]
    # every image names the same repository, and kustomize pins it
    images = {variables["image"]["default"], bridge["containers"][0]["image"]}
    repos = {i.rsplit(":", 1)[0] for i in images}
    kustomization = _load(K8S / "kustomization.yaml")
    assert repos == {i["name"] for i in kustomization["images"]} and len(images) == 1
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    assert "secrets.example.yaml" not in kustomization["resources"]  # values are never applied


def test_k8s_job_template_placeholders_are_declared_variables():
    template = json.loads((K8S / "base-job-template.json").read_text())
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    values = _load(K8S / "worker-values.yaml")["worker"]
    assert values["config"]["type"] == "kubernetes"
    pool = values["config"]["workPool"]
    text = (K8S / "worker-values.yaml").read_text() + (INFRA / "README.md").read_text()
    assert f"prefect work-pool create {pool} --type kubernetes" in text.replace("\\\n", "")
    assert values["image"]["prefectTag"].startswith("3.9.1-")


def test_shard_deployment_named_in_configs_exists():
    docs = _k8s_docs()
    config_map = next(d for d in docs if d.get("kind") == "ConfigMap")
    settings = Settings.model_validate(yaml.safe_load(config_map["data"]["radflow.yaml"]))
    flow_name, deployment = settings.runner.shard_deployment.split("/")
    (entry,) = [d for d in _load(PREFECT_YAML)["deployments"] if d["name"] == deployment]
    assert _flow(entry["entrypoint"]).name == flow_name
    assert settings.limits == "global"  # shards on the pool share the panel's limits


@pytest.mark.e2e
def test_a_shard_runs_job_env_keeps_the_templates_and_adds_the_heartbeat(prefect_harness):
    """What a worker makes of the parent's job variables on the Kubernetes pool (Prefect's
    own merge): the template's RADFLOW_CONFIG stays, the shard run beats every 30 s."""
    import asyncio

    from prefect.workers.base import BaseJobConfiguration

    from tasks.screening.shards import HEARTBEAT_ENV

    template = json.loads((K8S / "base-job-template.json").read_text())
    job = asyncio.run(
        BaseJobConfiguration.from_template_and_values(template, {"env": HEARTBEAT_ENV})
    )
    defaults = template["variables"]["properties"]["env"]["default"]
    assert job.env == defaults | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    assert job.env["RADFLOW_CONFIG"] == "/etc/radflow/radflow.yaml"


# -- deployments/prefect.yaml -----------------------------------------------------------------


def _flow(entrypoint: str) -> Flow:
    path, _, name = entrypoint.partition(":")
    assert (ROOT / path).is_file(), f"{entrypoint}: no such file"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    obj = getattr(module, name)
    assert isinstance(obj, Flow), f"{entrypoint} is not a Prefect flow"
    return obj


@pytest.mark.skipif(not PREFECT_YAML.is_file(), reason="deployments/prefect.yaml not written yet")
def test_prefect_yaml_entrypoints_exist_and_import():
    deployments = _load(PREFECT_YAML)["deployments"]
    assert deployments
    for deployment in deployments:
        flow = _flow(deployment["entrypoint"])
        signature = set(flow.parameters.properties)
        assert set(deployment.get("parameters") or {}) <= signature, deployment["name"]


# -- infra/bootstrap.py against real servers --------------------------------------------------


@pytest.mark.e2e
def test_bootstrap_wires_bucket_notifications_to_the_queue(moto_server):
    import boto3

    bootstrap.main(
        ["notifications", "--bucket", "scans", "--output-bucket", "reports", "--queue", "uploads"]
    )
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    s3.put_object(Bucket="scans", Key="incoming/study 1/a.dcm", Body=b"x")
    url = sqs.get_queue_url(QueueName="uploads")["QueueUrl"]
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=5)
    records = [r for m in messages["Messages"] for r in json.loads(m["Body"]).get("Records", [])]
    keys = [unquote_plus(r["s3"]["object"]["key"]) for r in records]  # S3 events encode keys
    assert keys == ["incoming/study 1/a.dcm"]
    assert s3.head_bucket(Bucket="reports")["ResponseMetadata"]["HTTPStatusCode"] == 200


@pytest.mark.e2e
def test_bootstrap_saves_model_keys_as_secret_blocks(prefect_harness, monkeypatch, capsys):
    from prefect.blocks.system import Secret

    monkeypatch.setenv("OPENAI_API_KEY", "test-openai-key-never-printed")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-anthropic-key-never-printed")
    bootstrap.main(["secrets"])
    assert Secret.load("radflow-openai-api-key").get() == "test-openai-key-never-printed"
    assert Secret.load("radflow-anthropic-api-key").get() == "test-anthropic-key-never-printed"
    assert "never-printed" not in capsys.readouterr().out
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SystemExit, match="OPENAI_API_KEY is not set"):
        bootstrap.main(["secrets"])
