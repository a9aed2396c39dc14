"""deploy/kubernetes/ against Kubernetes' object schemas, offline (no cluster runs here).

The schemas below are a minimal subset of the Kubernetes API's OpenAPI
definitions (API reference, v1.30), written for the kinds and fields the
manifests use: every object is closed (``additionalProperties: false``), so
a misspelt or misplaced field fails, and types, enums and required fields
follow the API.  A field the manifests start using must be added here from
the API reference, not loosened.  Beyond the schema, the checks the API
server or kubelet would make: selectors match the template's labels, every
mounted volume exists, every volume is mounted, ports are referenced by name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STRMAP = {"type": "object", "additionalProperties": STR}
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G)?$"}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


META = closed({"name": NAME, "namespace": NAME, "labels": STRMAP, "annotations": STRMAP}, ("name",))
TEMPLATE_META = closed({"labels": STRMAP, "annotations": STRMAP})
PROTOCOL = {"enum": ["TCP", "UDP", "SCTP"]}
PORT_REF = {"oneOf": [INT, STR]}
RESOURCES = closed({"requests": STRMAP, "limits": STRMAP})
CONTAINER = closed(
    {
        "name": NAME,
        "image": STR,
        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
        "command": array(STR),
        "args": array(STR),
        "env": array(
            closed(
                {
                    "name": STR,
                    "value": STR,
                    "valueFrom": closed(
                        {"fieldRef": closed({"fieldPath": STR, "apiVersion": STR}, ("fieldPath",))}
                    ),
                },
                ("name",),
            )
        ),
        "ports": array(
            closed(
                {"name": STR, "containerPort": INT, "hostPort": INT, "protocol": PROTOCOL},
                ("containerPort",),
            )
        ),
        "readinessProbe": closed(
            {"tcpSocket": closed({"port": PORT_REF}, ("port",)), "periodSeconds": INT}
        ),
        "securityContext": closed({"privileged": BOOL, "readOnlyRootFilesystem": BOOL}),
        "resources": RESOURCES,
        "volumeMounts": array(
            closed(
                {
                    "name": STR,
                    "mountPath": STR,
                    "readOnly": BOOL,
                    "mountPropagation": {"enum": ["None", "HostToContainer", "Bidirectional"]},
                },
                ("name", "mountPath"),
            )
        ),
    },
    ("name", "image"),
)
HOST_PATH_TYPES = [
    "", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
    "BlockDevice",
]  # fmt: skip
VOLUME = closed(
    {
        "name": STR,
        "hostPath": closed({"path": STR, "type": {"enum": HOST_PATH_TYPES}}, ("path",)),
        "configMap": closed({"name": STR, "defaultMode": INT}, ("name",)),
    },
    ("name",),
)
POD_SPEC = closed(
    {
        "serviceAccountName": NAME,
        "hostPID": BOOL,
        "hostNetwork": BOOL,
        "dnsPolicy": {"enum": ["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"]},
        "priorityClassName": STR,
        "terminationGracePeriodSeconds": INT,
        "nodeSelector": STRMAP,
        "tolerations": array(
            closed(
                {
                    "key": STR,
                    "operator": {"enum": ["Exists", "Equal"]},
                    "value": STR,
                    "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                }
            )
        ),
        "containers": {**array(CONTAINER), "minItems": 1},
        "volumes": array(VOLUME),
    },
    ("containers",),
)
SELECTOR = closed({"matchLabels": STRMAP})
POLICY_RULE = closed(
    {
        "apiGroups": array(STR),
        "resources": array(STR),
        "verbs": {
            "type": "array",
            "items": {
                "enum": [
                    "get",
                    "list",
                    "watch",
                    "create",
                    "update",
                    "patch",
                    "delete",
                    "deletecollection",
                ],
            },
        },
    },
    ("verbs",),
)


def kind(api: str, name: str, **fields: dict[str, Any]) -> dict[str, Any]:
    required = ("apiVersion", "kind", "metadata", *fields)
    properties = {"apiVersion": {"const": api}, "kind": {"const": name}, "metadata": META}
    return closed({**properties, **fields}, required)


SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": kind("v1", "Namespace"),
    "ServiceAccount": kind("v1", "ServiceAccount"),
    "ConfigMap": kind("v1", "ConfigMap", data=STRMAP),
    "ClusterRole": kind("rbac.authorization.k8s.io/v1", "ClusterRole", rules=array(POLICY_RULE)),
    "ClusterRoleBinding": kind(
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        roleRef=closed(
            {"apiGroup": STR, "kind": {"enum": ["ClusterRole", "Role"]}, "name": STR},
            ("apiGroup", "kind", "name"),
        ),
        subjects=array(
            closed(
                {
                    "kind": {"enum": ["ServiceAccount", "User", "Group"]},
                    "name": STR,
                    "namespace": STR,
                },
                ("kind", "name"),
            )
        ),
    ),
    "DaemonSet": kind(
        "apps/v1",
        "DaemonSet",
        spec=closed(
            {
                "selector": SELECTOR,
                "updateStrategy": closed(
                    {
                        "type": {"enum": ["RollingUpdate", "OnDelete"]},
                        "rollingUpdate": closed({"maxUnavailable": PORT_REF, "maxSurge": PORT_REF}),
                    }
                ),
                "template": closed({"metadata": TEMPLATE_META, "spec": POD_SPEC}, ("spec",)),
            },
            ("selector", "template"),
        ),
    ),
    "Service": kind(
        "v1",
        "Service",
        spec=closed(
            {
                "clusterIP": STR,
                "selector": STRMAP,
                "ports": array(
                    closed(
                        {"name": STR, "port": INT, "targetPort": PORT_REF, "protocol": PROTOCOL},
                        ("port",),
                    )
                ),
            }
        ),
    ),
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.name}:{doc.get('kind')}/{doc['metadata']['name']}", doc))
    return out


def check(doc: dict[str, Any]) -> None:
    """Schema, then the cross-field rules the API server and kubelet apply."""

    schema = SCHEMAS.get(doc.get("kind", ""))
    if schema is None:
        raise jsonschema.ValidationError(f"no schema for kind {doc.get('kind')!r}")
    jsonschema.validate(doc, schema)
    if doc["kind"] == "DaemonSet":
        spec = doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        for key, value in spec["selector"]["matchLabels"].items():
            if labels.get(key) != value:
                raise jsonschema.ValidationError(f"selector {key}={value} matches no label")
        pod = spec["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        if mounted - volumes or volumes - mounted:
            raise jsonschema.ValidationError(f"volumes {volumes} vs mounts {mounted}")
        for container in pod["containers"]:
            names = {p.get("name") for p in container.get("ports", [])}
            probe = (container.get("readinessProbe") or {}).get("tcpSocket", {}).get("port")
            if isinstance(probe, str) and probe not in names:
                raise jsonschema.ValidationError(f"probe port {probe} is not a named port")


def test_every_manifest_is_valid() -> None:
    docs = documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "Service",
        "ServiceAccount",
    ]  # fmt: skip
    for _where, doc in docs:
        check(doc)


def test_the_daemonset_shares_the_platform_socket_and_serves_metrics() -> None:
    (ds,) = [d for _, d in documents() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert paths["platform-socket"] == "/run/migsgx"
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert "--metrics" in agent["args"] and agent["command"][:3] == ["migsgx", "agent", "serve"]
    # The same CLI the manifests run: the options exist.
    from click.testing import CliRunner

    from migsgx.cli import cli

    for container in pod["containers"]:
        command = container["command"][1:]
        help_text = CliRunner().invoke(cli, [*command, "--help"]).output
        assert "Usage:" in help_text, command
        for option in (a for a in container["args"] if a.startswith("--")):
            assert f"{option} " in help_text or f"{option}\n" in help_text, (command, option)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy="Some"),
        lambda d: d["spec"]["template"]["spec"].update(hostPid=True),  # misspelt field
        lambda d: d["spec"]["template"]["spec"]["volumes"][0]["hostPath"].update(type="Dir"),
        lambda d: d["spec"]["selector"]["matchLabels"].update(extra="x"),
        lambda d: d["spec"]["template"]["spec"]["volumes"].pop(),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("image"),
        lambda d: d.update(apiVersion="extensions/v1beta1"),
    ],
)
def test_broken_manifests_are_caught(mutate: Any) -> None:
    (ds,) = [d for _, d in documents() if d["kind"] == "DaemonSet"]
    broken = copy.deepcopy(ds)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        check(broken)
