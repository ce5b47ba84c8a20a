"""The Kubernetes manifests in deploy/k8s: valid objects, and in agreement with the image and the code.

No cluster is needed. Every manifest is validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package ships (offline), in strict mode (an unknown or misspelt field fails), for the
oldest Kubernetes the README names and the newest the package knows. Then every value that must match the
project is checked against it, as tests/test_deployment.py does for compose: setting names, port, probe routes,
models path, user, the exported metric the HPA scales on, the batch command and its shards.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

import kubernetes_validate  # noqa: E402
from kubernetes_validate.utils import latest_version  # noqa: E402

from service.settings import Settings  # noqa: E402
from tests.test_deployment import (  # noqa: E402
    ENV_PREFIX,
    ROOT,
    SERVICE_DOCKERFILE,
    Dockerfile,
    exec_form,
    healthcheck_cmd,
    option,
    probe_url,
    python_module,
    setting_env_names,
)

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
NOT_IN_KUSTOMIZATION = {"job-batch.yaml"}  # a one-off run: `kubectl apply -k` must not start it
MIN_VERSION = "1.30"  # the oldest Kubernetes deploy/k8s/README.md names
VERSIONS = sorted({MIN_VERSION, ".".join(latest_version().split(".")[:2])})
PERFORMANCE = ROOT / "docs" / "performance.md"
GPU = "nvidia.com/gpu"


# ----------------------------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects() -> list[dict]:
    return [doc for path in manifest_files() for doc in documents(path)]


def one(kind: str, path: str) -> dict:
    found = [doc for doc in documents(K8S / path) if doc["kind"] == kind]
    assert len(found) == 1, f"{path}: expected one {kind}, found {len(found)}"
    return found[0]


def validate(obj: dict, version: str) -> None:
    """Strict validation against the Kubernetes ``version`` schemas; raises with the path of the first error."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata'].get('name')} against {version}: {path}: {err.message}")


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> int:
    """A Kubernetes memory quantity in bytes (``1Gi``, ``512Mi``, ``1000000``)."""
    match = re.fullmatch(r"(\d+)([kMGT]i?)?", str(value))
    assert match, f"not a memory quantity: {value!r}"
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def only_container(obj: dict) -> dict:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj['kind']}: one container expected"
    return containers[0]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def mounts_by_path(obj: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume) of the pod's only container."""
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    out = {}
    for mount in only_container(obj).get("volumeMounts", []):
        assert mount["name"] in volumes, f"{obj['kind']}: mount of undeclared volume {mount['name']}"
        out[mount["mountPath"]] = (mount, volumes[mount["name"]])
    return out


def run_as_users(obj: dict) -> set[int]:
    """Every runAsUser the pod sets (pod and container level); the container's wins where both are set."""
    contexts = (pod_spec(obj).get("securityContext", {}), only_container(obj).get("securityContext", {}))
    return {context["runAsUser"] for context in contexts if "runAsUser" in context}


def app_paths() -> set[str]:
    """The paths the app answers ``GET`` on (its OpenAPI schema, as tests/test_deployment.py reads it)."""
    from service.main import create_app

    app = create_app(Settings(models_dir=ROOT / "no-such-models"))
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


def exported_metrics() -> dict[str, str]:
    """Metric family name -> type, of every collector :class:`service.observability.Metrics` registers."""
    from service.observability import Metrics

    return {family.name: family.type for family in Metrics().registry.collect()}


def peak_rss_mib() -> int:
    """The largest peak RSS docs/performance.md gives for a full-size request, in MiB."""
    sentence = re.search(r"Peak RSS of a fresh service process over one full-size request:([^;]+);", PERFORMANCE.read_text())
    assert sentence, "docs/performance.md no longer states the peak RSS of a full-size request"
    figures = [int(v.replace(",", "")) for v in re.findall(r"([\d,]+) MiB", sentence.group(1))]
    assert figures
    return max(figures)


@pytest.fixture(scope="module")
def service_df() -> Dockerfile:
    return Dockerfile.parse(SERVICE_DOCKERFILE)


@pytest.fixture(scope="module")
def deployment() -> dict:
    return one("Deployment", "deployment.yaml")


@pytest.fixture(scope="module")
def job() -> dict:
    return one("Job", "job-batch.yaml")


@pytest.fixture(scope="module")
def hpa() -> dict:
    return one("HorizontalPodAutoscaler", "hpa.yaml")


@pytest.fixture(scope="module")
def paths() -> set[str]:
    return app_paths()


def image_port(service_df: Dockerfile) -> int:
    cmd = exec_form(service_df.last("CMD"))
    port = option(cmd, "--port")
    assert service_df.last("EXPOSE").split("/")[0] == port
    return int(port)


# --------------------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas(path, version):
    docs = documents(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        validate(doc, version)


def readme_yaml_blocks() -> list[dict]:
    text = (K8S / "README.md").read_text()
    return [doc for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for doc in yaml.safe_load_all(block) if doc]


@pytest.mark.parametrize("version", VERSIONS)
def test_readme_manifests_are_valid(version):
    blocks = readme_yaml_blocks()
    assert blocks, "the README shows the models loader pod"
    for doc in blocks:
        validate(doc, version)


def test_readme_loader_fills_the_models_claim_as_the_image_user(deployment, service_df):
    (loader,) = [doc for doc in readme_yaml_blocks() if doc["kind"] == "Pod"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in loader["spec"]["volumes"]]
    assert claims == [models_claim(deployment)]
    assert loader["spec"]["containers"][0]["image"] == only_container(deployment)["image"]
    assert str(loader["spec"]["securityContext"]["runAsUser"]) == service_df.last("USER")
    # the shipped models it copies are where the image keeps them
    assert service_df.env()["BRATS_MODELS_DIR"] in " ".join(loader["spec"]["containers"][0]["command"])


def test_the_validation_is_strict():
    """A misspelt field and a wrong type both fail: the schema check is not vacuous."""
    deployment = one("Deployment", "deployment.yaml")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    container = only_container(misspelt)
    container["readinessProbes"] = container.pop("readinessProbe")
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    only_container(wrong_type)["ports"][0]["containerPort"] = "8000"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, MIN_VERSION, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_hpa_cpu_alternative_in_the_comment_is_valid(hpa, version):
    """The commented CPU-utilisation alternative, uncommented, makes a valid HPA."""
    text = (K8S / "hpa.yaml").read_text()
    block = re.search(r"^  # metrics:\n((?:  #   .*\n)+)", text, re.M)
    assert block, "hpa.yaml lost its commented CPU alternative"
    lines = ["metrics:"] + [line.replace("  # ", "", 1) for line in block.group(1).splitlines()]
    alternative = yaml.safe_load(yaml.safe_dump(hpa))
    alternative["spec"]["metrics"] = yaml.safe_load("\n".join(lines))["metrics"]
    validate(alternative, version)
    assert alternative["spec"]["metrics"][0]["resource"]["name"] == "cpu"


# ------------------------------------------------------------------------------------------- kustomization


def test_kustomization_lists_every_manifest_but_the_batch_job():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which is missing"
    expected = {p.name for p in manifest_files()} - NOT_IN_KUSTOMIZATION
    assert set(listed) == expected, f"missing: {sorted(expected - set(listed))}, extra: {sorted(set(listed) - expected)}"
    assert NOT_IN_KUSTOMIZATION <= {p.name for p in manifest_files()}
    readme = (K8S / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s" in readme
    for name in NOT_IN_KUSTOMIZATION:
        assert f"kubectl create -f deploy/k8s/{name}" in readme, f"the README says how to run {name}"


def test_kustomization_image_is_the_manifests_image(deployment, job):
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    (entry,) = kustomization["images"]
    for obj in (deployment, job):
        name, _, tag = only_container(obj)["image"].partition(":")
        assert (entry["name"], entry["newTag"]) == (name, tag)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_build_renders_valid_objects():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    expected = [doc for path in manifest_files() if path.name not in NOT_IN_KUSTOMIZATION for doc in documents(path)]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, expected))
    for doc in rendered:
        validate(doc, MIN_VERSION)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "brats-seg"


# -------------------------------------------------------------------------------------- the Deployment


class TestDeployment:
    def test_env_names_are_real_settings(self, deployment):
        names = set(env_of(only_container(deployment)))
        ours = {n for n in names if n.startswith(ENV_PREFIX)}
        assert ours == names, f"not settings: {sorted(names - ours)}"
        assert ours <= setting_env_names(), f"unknown settings: {sorted(ours - setting_env_names())}"
        assert {"BRATS_HOST", "BRATS_MAX_CONCURRENT", "BRATS_MAX_QUEUE", "BRATS_REQUIRE_MODELS"} <= names

    def test_env_values_are_valid_settings(self, deployment, monkeypatch):
        for name in setting_env_names():
            monkeypatch.delenv(name, raising=False)
        for name, item in env_of(only_container(deployment)).items():
            if "value" in item:
                monkeypatch.setenv(name, item["value"])
        settings = Settings()
        assert settings.host == "0.0.0.0" and settings.require_models is True
        assert settings.api_keys == []  # no Secret: no key needed

    def test_api_keys_come_from_the_optional_secret(self, deployment):
        ref = env_of(only_container(deployment))["BRATS_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "brats-api-keys", "key": "api-keys", "optional": True}

    def test_no_service_links(self, deployment, job):
        """Service links inject ``<SERVICE>_PORT=tcp://...``: a Service named ``brats...`` would set BRATS_*
        variables that the settings read (and fail on)."""
        for obj in (deployment, job):
            assert pod_spec(obj)["enableServiceLinks"] is False

    def test_port_is_the_images_and_the_settings_default(self, deployment, service_df):
        container = only_container(deployment)
        port = image_port(service_df)
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert Settings.model_fields["port"].default == port
        # no command: the image's CMD (python -m service --host 0.0.0.0 --port 8000) runs
        assert "command" not in container and "args" not in container
        assert python_module(exec_form(service_df.last("CMD"))) == "service"

    def test_service_targets_the_pods_port(self, deployment):
        service = one("Service", "service.yaml")
        assert service["spec"]["type"] == "ClusterIP"
        (port,) = service["spec"]["ports"]
        (container_port,) = only_container(deployment)["ports"]
        assert port["port"] == container_port["containerPort"]
        assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    def test_probes_hit_routes_of_the_app_on_the_container_port(self, deployment, paths, service_df):
        container = only_container(deployment)
        (port,) = container["ports"]
        probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        for kind, get in probes.items():
            assert get["path"] in paths, f"{kind} path {get['path']} is not a route of the app"
            assert get["port"] in (port["name"], port["containerPort"]), kind
        assert probes["livenessProbe"]["path"] == "/healthz"
        assert probes["readinessProbe"]["path"] == "/readyz"
        # readiness is what the image's HEALTHCHECK asks
        assert probes["readinessProbe"]["path"] == re.sub(r"^https?://[^/]+", "", probe_url(healthcheck_cmd(service_df.last("HEALTHCHECK"))))

    def test_startup_probe_gives_the_models_time_to_load(self, deployment, service_df):
        """With BRATS_REQUIRE_MODELS the server listens only once the models are loaded: the startup probe
        must allow at least the image's HEALTHCHECK start period before liveness can restart the pod."""
        startup = only_container(deployment)["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
        start_period = re.search(r"--start-period=(\d+)s", service_df.last("HEALTHCHECK"))
        assert budget >= int(start_period.group(1)) * 2

    def test_models_mounted_read_only_where_the_image_looks(self, deployment, service_df):
        models_dir = service_df.env()["BRATS_MODELS_DIR"]
        mount, volume = mounts_by_path(deployment)[models_dir]
        assert mount.get("readOnly") is True
        assert volume["persistentVolumeClaim"] == {"claimName": "brats-models", "readOnly": True}
        env = env_of(only_container(deployment))
        assert env.get("BRATS_MODELS_DIR", {"value": models_dir})["value"] == models_dir

    def test_read_only_root_with_tmp_in_memory(self, deployment, service_df):
        container = only_container(deployment)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tmp_dir = env_of(container).get("BRATS_TMP_DIR", {"value": service_df.env()["BRATS_TMP_DIR"]})["value"]
        assert tmp_dir == "/tmp"
        _, volume = mounts_by_path(deployment)[tmp_dir]
        assert volume["emptyDir"]["medium"] == "Memory"
        assert quantity(volume["emptyDir"]["sizeLimit"]) > 0

    def test_runs_as_the_images_user(self, deployment, service_df):
        uid = int(service_df.last("USER").split(":")[0])
        assert run_as_users(deployment) == {uid}
        security = only_container(deployment)["securityContext"]
        assert security["runAsNonRoot"] is True and pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]

    def test_one_gpu_per_pod(self, deployment):
        resources = only_container(deployment)["resources"]
        assert resources["limits"][GPU] == 1 and resources["requests"][GPU] == 1

    def test_memory_follows_the_measured_peak(self, deployment):
        """Request: the peak RSS docs/performance.md measured, with at least 25% headroom; limit: that, plus the
        in-memory /tmp (a tmpfs is charged to the pod's memory). The manifest names the figure it used."""
        peak = peak_rss_mib() * 2**20
        resources = only_container(deployment)["resources"]
        request, limit = quantity(resources["requests"]["memory"]), quantity(resources["limits"]["memory"])
        assert request >= 1.25 * peak, (request, peak)
        _, tmp = mounts_by_path(deployment)["/tmp"]
        assert limit >= request + quantity(tmp["emptyDir"]["sizeLimit"])
        text = (K8S / "deployment.yaml").read_text()
        assert f"{peak_rss_mib()} MiB" in text and "docs/performance.md" in text

    def test_prometheus_scrape_annotations_point_at_metrics(self, deployment, paths):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        (port,) = only_container(deployment)["ports"]
        assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in paths
        assert int(annotations["prometheus.io/port"]) == port["containerPort"]


# --------------------------------------------------------------------------------------------- the HPA


class TestAutoscaler:
    def test_targets_the_deployment(self, hpa, deployment):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    def test_scales_on_the_queue_depth_gauge_the_service_exports(self, hpa):
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        exported = exported_metrics()
        assert name in exported, f"{name} is not exported at /metrics: {sorted(exported)}"
        assert exported[name] == "gauge", "an average over pods is meaningful for a gauge only"
        assert name == "brats_inference_queue_depth"
        assert metric["pods"]["target"]["type"] == "AverageValue"

    def test_says_it_needs_a_metrics_adapter(self):
        text = (K8S / "hpa.yaml").read_text()
        assert "metrics adapter" in text and "prometheus-adapter" in text
        assert "prometheus-adapter" in (K8S / "README.md").read_text()


# ------------------------------------------------------------------------------------------ the batch Job


def job_argv(job: dict) -> list[str]:
    container = only_container(job)
    return list(container.get("command", [])) + list(container.get("args", []))


class TestBatchJob:
    def test_runs_service_predict(self, job):
        assert python_module(job_argv(job)) == "service.predict"

    def test_the_module_exists(self, job):
        module = python_module(job_argv(job))
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not written yet")
        assert importlib.util.find_spec(module).origin

    def test_is_indexed_with_one_part_per_completion(self, job):
        spec, argv = job["spec"], job_argv(job)
        assert spec["completionMode"] == "Indexed"
        assert int(option(argv, "--num-parts")) == spec["completions"]
        assert 1 <= spec["parallelism"] <= spec["completions"]
        # the index from the Job controller, expanded by Kubernetes (no shell in between)
        assert option(argv, "--part-id") == "$(JOB_COMPLETION_INDEX)"
        assert "JOB_COMPLETION_INDEX" not in env_of(only_container(job)), "the controller sets it"

    def test_arguments_parse_and_point_at_the_mounts(self, job, service_df):
        argv = job_argv(job)
        if importlib.util.find_spec("service.predict") is None:
            pytest.skip("service.predict is not written yet")
        from service import predict

        args = predict.parser().parse_args([a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in argv[3:]])
        assert args.num_parts == job["spec"]["completions"] and args.part_id == 0
        mounts = mounts_by_path(job)
        mount, volume = mounts[str(args.input)]
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"] == {"claimName": "brats-data-in", "readOnly": True}
        mount, volume = mounts[str(args.output)]
        assert not mount.get("readOnly") and volume["persistentVolumeClaim"] == {"claimName": "brats-data-out"}
        # service.predict takes its models from --models-dir, not BRATS_MODELS_DIR: it must name the mount
        models_dir = service_df.env()["BRATS_MODELS_DIR"]
        assert str(args.models_dir) == models_dir
        mount, volume = mounts[models_dir]
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["claimName"] == "brats-models"

    def test_bad_arguments_exit_with_the_status_that_fails_the_index(self, job, tmp_path):
        """podFailurePolicy fails an index without retries on the exit status of bad arguments."""
        (rule,) = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
        assert rule["onExitCodes"]["containerName"] == only_container(job)["name"]
        if importlib.util.find_spec("service.predict") is None:
            pytest.skip("service.predict is not written yet")
        result = subprocess.run(
            [sys.executable, "-m", "service.predict", str(tmp_path / "missing"), str(tmp_path / "out"),
             "--num-parts", "4", "--part-id", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode in rule["onExitCodes"]["values"], result.stderr

    def test_retries_per_index_need_restart_policy_never(self, job):
        """The API server refuses backoffLimitPerIndex (and podFailurePolicy) with any other restart policy;
        the schema cannot say so."""
        assert job["spec"]["backoffLimitPerIndex"] >= 1
        assert pod_spec(job)["restartPolicy"] == "Never"

    def test_same_image_user_and_gpu_as_the_service(self, job, deployment, service_df):
        container = only_container(job)
        assert container["image"] == only_container(deployment)["image"]
        assert run_as_users(job) == {int(service_df.last("USER").split(":")[0])}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "emptyDir" in mounts_by_path(job)["/tmp"][1]
        assert container["resources"]["limits"][GPU] == 1 and container["resources"]["requests"][GPU] == 1
        assert quantity(container["resources"]["requests"]["memory"]) >= 1.25 * peak_rss_mib() * 2**20

    def test_claims_are_declared(self, job, deployment):
        declared = {doc["metadata"]["name"] for doc in objects() if doc["kind"] == "PersistentVolumeClaim"}
        used = {v["persistentVolumeClaim"]["claimName"]
                for obj in (job, deployment) for v in pod_spec(obj)["volumes"] if "persistentVolumeClaim" in v}
        assert used == declared == {"brats-models", "brats-data-in", "brats-data-out"}


def models_claim(deployment: dict) -> str:
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(deployment)["volumes"] if "persistentVolumeClaim" in v]
    return claim


def test_readme_relative_links_resolve():
    readme = K8S / "README.md"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme.read_text()):
        assert (readme.parent / target).exists(), f"deploy/k8s/README.md links to {target}, which does not exist"
