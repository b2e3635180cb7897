"""The Helm chart's values, declared once as pydantic models.

``helm/seal/values.yaml`` (with a comment above every key) and ``helm/seal/values.schema.json``
are generated from these models by ``python -m seal.deploy`` and checked for drift by the tests,
so a knob is documented where it is declared and cannot exist in one file and not the other.
The ``settings`` block is the application's own :class:`seal.config.Settings`, rendered into the
ConfigMap the three services read (see :mod:`seal.deploy.chart`).

Keys are camelCase, as Kubernetes and most charts spell them; ``settings`` keeps the snake_case
of the settings object because it *is* that object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Kubernetes quantities: "500m", "2", "8Gi", "1.5G". Checked here so that a typo fails at
# `helm install` with the key's name instead of at the API server with a parse error.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
ACCESS_MODE = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"]


class _Values(BaseModel):
    # Unknown keys are refused by the schema: a misspelt value would otherwise be ignored silently.
    model_config = ConfigDict(extra="forbid")


class Image(_Values):
    repository: str = Field(..., min_length=1, description="image repository")
    tag: str = Field("", description="image tag; empty = the chart's appVersion")
    digest: str = Field(
        "", pattern=r"^(sha256:[a-f0-9]{64})?$", description="image digest (sha256:…); when set it pins the image and wins over tag"
    )
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="imagePullPolicy")


class Resources(_Values):
    requests: dict[str, str | int] = Field(default_factory=dict, description="resource requests (cpu, memory, …)")
    limits: dict[str, str | int] = Field(default_factory=dict, description="resource limits; nvidia.com/gpu is added from gpus")


class Persistence(_Values):
    enabled: bool = Field(True, description="keep this service's state on a PersistentVolumeClaim; false = an emptyDir (lost on restart)")
    existingClaim: str = Field("", description="use this PVC instead of creating one")
    storageClass: str = Field("", description="storage class of the created PVC; empty = the cluster default")
    accessModes: list[ACCESS_MODE] = Field(default_factory=lambda: ["ReadWriteOnce"], min_length=1, description="access modes of the created PVC")
    size: str = Field("20Gi", pattern=QUANTITY_PATTERN, description="size of the created PVC")
    annotations: dict[str, str] = Field(default_factory=dict, description="annotations of the created PVC (e.g. helm.sh/resource-policy: keep)")


class Probes(_Values):
    """Native gRPC probes on the standard health service (Kubernetes ≥ 1.27). The startup probe
    covers the model load; liveness and readiness start only once it has passed."""

    startupPeriodSeconds: int = Field(10, ge=1, description="seconds between startup checks")
    startupFailureThreshold: int = Field(
        90, ge=1, description="startup checks allowed to fail; × startupPeriodSeconds = the longest model load tolerated"
    )
    periodSeconds: int = Field(10, ge=1, description="seconds between liveness/readiness checks")
    timeoutSeconds: int = Field(5, ge=1, description="seconds one check may take")
    livenessFailureThreshold: int = Field(6, ge=1, description="failed liveness checks before the container is restarted")
    readinessFailureThreshold: int = Field(3, ge=1, description="failed readiness checks before the pod leaves its Service")


class Component(_Values):
    """What every service's Deployment shares. Each service is a singleton: its state (registry,
    reward buffer, audit log) has one writer, so the Deployment runs one replica with the
    Recreate strategy (a second pod could not mount a ReadWriteOnce volume anyway)."""

    image: Image = Field(..., description="the container image")
    gpus: int = Field(0, ge=0, le=16, description="NVIDIA GPUs (nvidia.com/gpu) requested and limited; 0 = CPU only")
    resources: Resources = Field(default_factory=Resources, description="CPU and memory requests and limits")
    shmSize: str = Field(
        "1Gi", pattern=QUANTITY_PATTERN,
        description="size of /dev/shm (a memory emptyDir): PyTorch workers, vLLM and Triton's Python backend share tensors through it",
    )
    tmpSize: str = Field("4Gi", pattern=QUANTITY_PATTERN, description="size of /tmp (an emptyDir: the root filesystem is read-only)")
    persistence: Persistence = Field(default_factory=Persistence, description="storage for this service's state under SEAL_HOME")
    probes: Probes = Field(default_factory=Probes, description="startup, liveness and readiness probes")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="pod nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="pod tolerations (e.g. nvidia.com/gpu NoSchedule)")
    affinity: dict[str, Any] = Field(default_factory=dict, description="pod affinity")
    runtimeClassName: str = Field("", description="pod runtimeClassName (e.g. nvidia); empty = the cluster default")
    priorityClassName: str = Field("", description="pod priorityClassName")
    podAnnotations: dict[str, str] = Field(default_factory=dict, description="extra pod annotations")
    podLabels: dict[str, str] = Field(default_factory=dict, description="extra pod labels")
    extraEnv: list[dict[str, Any]] = Field(
        default_factory=list, description="extra container env entries; SEAL_<SECTION>__<FIELD> here wins over settings"
    )
    terminationGracePeriodSeconds: int = Field(
        60, ge=0, description="seconds between SIGTERM and SIGKILL; keep above settings.services.shutdown_grace_s"
    )


def _component(image: str, **overrides: Any) -> Any:
    return lambda: Component(image=Image(repository=image), **overrides)


class Components(_Values):
    teacher: Component = Field(
        default_factory=_component(
            "ghcr.io/seal-project/seal-teacher", gpus=1, shmSize="8Gi",
            resources=Resources(requests={"cpu": "4", "memory": "32Gi"}, limits={"memory": "64Gi"}),
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
        description="the teacher: proposes self-edits (vLLM on a GPU) and runs Adapt and ReST^EM",
    )
    student: Component = Field(
        default_factory=_component(
            "ghcr.io/seal-project/seal-student", gpus=1, shmSize="8Gi",
            resources=Resources(requests={"cpu": "4", "memory": "32Gi"}, limits={"memory": "64Gi"}),
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            persistence=Persistence(size="100Gi"),
        ),
        description="the student: trains candidate adapters, keeps the registry, serves through Triton",
    )
    auditor: Component = Field(
        default_factory=_component(
            "ghcr.io/seal-project/seal", shmSize="256Mi",
            resources=Resources(requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "4Gi"}),
            persistence=Persistence(size="5Gi"),
        ),
        description="the auditor: scores candidates, keeps the retention probe, the reward log and the audit chain",
    )


class Model(_Values):
    existingClaim: str = Field(
        "",
        description="a PVC holding base-model weights, mounted read-only at mountPath in every pod (and in training "
        "Jobs); set settings.model.path to a directory under it. Empty = the embedded SmolLM2-135M shipped in the image",
    )
    mountPath: str = Field("/models", pattern=r"^/", description="where existingClaim is mounted")
    subPath: str = Field("", description="subPath of existingClaim to mount")


class Service(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type of the three services")
    annotations: dict[str, str] = Field(default_factory=dict, description="annotations of the three Services")


class PodDisruptionBudget(_Values):
    """The services are singletons holding a GPU and in-flight training: a voluntary eviction
    (node drain, cluster autoscaler) would cut an Adapt short. minAvailable 1 makes a drain wait
    for an operator; unhealthy pods may always be evicted, so a crash-looping pod never blocks one."""

    enabled: bool = Field(True, description="create a PodDisruptionBudget per service")
    minAvailable: int = Field(1, ge=0, le=1, description="1 = a drain waits for an operator to move the pod; 0 = no protection")


class NetworkPolicy(_Values):
    """Who may call what: the teacher's gRPC port is the public API (Adapt, ReST^EM); the student
    and auditor answer only the teacher, each other, training Jobs and the helm test pod."""

    enabled: bool = Field(True, description="create NetworkPolicies for the three services")
    apiClients: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicyPeers allowed to call the teacher's gRPC API (e.g. a namespaceSelector); "
        "empty = any pod in the release's namespace",
    )
    metricsScrapers: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"namespaceSelector": {}}],
        description="NetworkPolicyPeers allowed to scrape the /metrics ports (default: any namespace; narrow it to Prometheus')",
    )


class ServiceMonitor(_Values):
    enabled: bool = Field(False, description="create a ServiceMonitor (prometheus-operator CRD) for the three /metrics ports")
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="scrape interval")
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels, e.g. the one your Prometheus selects on")


class PrometheusRule(_Values):
    enabled: bool = Field(False, description="create a PrometheusRule (prometheus-operator CRD) with seal's alerts")
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels, e.g. the one your Prometheus selects rules by")


class Dashboard(_Values):
    enabled: bool = Field(True, description="ship the Grafana dashboard as a ConfigMap for Grafana's sidecar")
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"}, description="labels the Grafana sidecar discovers dashboards by"
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="e.g. grafana_folder: seal")


class Metrics(_Values):
    serviceMonitor: ServiceMonitor = Field(default_factory=ServiceMonitor, description="prometheus-operator scraping")
    prometheusRule: PrometheusRule = Field(default_factory=PrometheusRule, description="prometheus-operator alerts")
    dashboard: Dashboard = Field(default_factory=Dashboard, description="the Grafana dashboard")
    podAnnotations: bool = Field(
        True, description="annotate pods with prometheus.io/scrape, /port, /path for Prometheus without the operator"
    )


class SecurityContext(_Values):
    runAsUser: int = Field(10001, ge=1, description="uid of every container (non-root)")
    runAsGroup: int = Field(10001, ge=1, description="gid of every container")
    fsGroup: int = Field(10001, ge=1, description="group owning the mounted volumes")


class ServiceAccount(_Values):
    create: bool = Field(True, description="create a ServiceAccount for the three services")
    name: str = Field("", description="use this ServiceAccount name; empty = the release's full name")
    annotations: dict[str, str] = Field(default_factory=dict, description="e.g. cloud IAM bindings")


class SecretKey(_Values):
    existingSecret: str = Field("", description="name of an existing Secret; empty = none")
    key: str = Field("api-key", min_length=1, description="key in that Secret")


class TlsSecrets(_Values):
    teacher: str = Field("", description="kubernetes.io/tls Secret of the teacher (tls.crt, tls.key, ca.crt; server and client usages, SANs for its Service's DNS names)")
    student: str = Field("", description="the same for the student")
    auditor: str = Field("", description="the same for the auditor")


class Auth(_Values):
    """Who may call what (docs/auth.md). Every RPC but health checks needs a bearer token whose
    principal has the RPC's scope; the services call each other with their own identities."""

    mode: Literal["tokens", "tls", "insecure"] = Field(
        "tokens",
        description="tokens = bearer tokens over plaintext gRPC on the pod network (the NetworkPolicy limits who can "
        "reach it); tls = the same tokens over mutual TLS with tlsSecrets (e.g. from cert-manager); insecure = no "
        "authentication at all (demos only: the services log a warning)",
    )
    existingSecret: str = Field(
        "",
        description="Secret with keys principals.yaml (the principals file: names, scopes, token sha256) and "
        "teacher-token, student-token, auditor-token (each service's own identity). Empty = the chart creates one "
        "with random tokens (kept across upgrades) and an operator principal whose token is under key operator-token",
    )
    operatorScopes: list[Literal["adapt", "generate", "read", "admin"]] = Field(
        default_factory=lambda: ["adapt", "generate", "read", "admin"],
        description="scopes of the operator principal the chart creates (with existingSecret empty)",
    )
    tlsSecrets: TlsSecrets = Field(default_factory=TlsSecrets, description="mode=tls: each service's certificate Secret")
    probePort: int = Field(
        8081, ge=1, le=65535,
        description="plaintext, health-only gRPC port the kubelet's probes and the helm test pod ask (native gRPC probes "
        "send neither TLS nor tokens)",
    )


class Tests(_Values):
    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/seal-project/seal"),
        description="image of the helm test pod (needs the seal CLI: `seal health`)",
    )


class ChartValues(_Values):
    # --- the services ---
    components: Components = Field(default_factory=Components, description="the three services")
    imagePullSecrets: list[dict[str, str]] = Field(default_factory=list, description="pull secrets of every pod")
    model: Model = Field(default_factory=Model, description="base-model weights on a volume")
    service: Service = Field(default_factory=Service, description="the Services in front of the gRPC and metrics ports")
    serviceAccount: ServiceAccount = Field(default_factory=ServiceAccount, description="the pods' identity")
    auth: Auth = Field(default_factory=Auth, description="authentication and authorisation of every RPC")
    judgeApiKey: SecretKey = Field(
        default_factory=SecretKey,
        description="API key of the judge grader (settings.auditor.grader=judge), from a Secret; given to the auditor "
        "as the variable settings.auditor.judge_api_key_env names. The chart never holds the key itself",
    )
    # --- safety ---
    securityContext: SecurityContext = Field(default_factory=SecurityContext, description="non-root identity of every pod")
    podDisruptionBudget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget, description="voluntary-eviction protection")
    networkPolicy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="who may reach each port")
    # --- observability ---
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus and Grafana")
    tests: Tests = Field(default_factory=Tests, description="the `helm test` hook")
    # --- escape hatches ---
    extraObjects: list[dict[str, Any]] = Field(
        default_factory=list, description="extra manifests rendered with the release (strings are templated)"
    )
    nameOverride: str = Field("", description="replaces the chart name in resource names")
    fullnameOverride: str = Field("", description="replaces the release-chart full name")
