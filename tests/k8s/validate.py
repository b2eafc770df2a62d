#!/usr/bin/env python3
"""Offline validation of rendered manifests.

Core kinds: kubernetes-validate (bundled schemas, Kubernetes 1.33, strict).
Custom resources: JSON schemas vendored in crd-schemas/ beside this script (Strimzi,
prometheus-operator; source and licence in crd-schemas/README.md).
Policy: every container non-root, read-only root filesystem, no capabilities, probes,
memory requests and limits; no secret value inline. Across the documents of one file (one
rendered overlay): a workload an HPA scales sets no spec.replicas (the HPA owns the count),
and every PodDisruptionBudget selects a workload and allows at least one voluntary
disruption at that workload's replicas (the HPA's minReplicas when an HPA owns it).
Usage: validate.py RENDERED.yaml...   Exit 0 when everything passes.
"""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crd-schemas")

CRDS = {
    ("kafka.strimzi.io", "Kafka"): "kafka.strimzi.io/kafka_v1beta2.json",
    ("kafka.strimzi.io", "KafkaTopic"): "kafka.strimzi.io/kafkatopic_v1beta2.json",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com/podmonitor_v1.json",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com/prometheusrule_v1.json",
}


def policy(doc, errors):
    if doc["kind"] != "Deployment":
        return
    name = doc["metadata"]["name"]
    pod = doc["spec"]["template"]["spec"]
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        errors.append(f"{name}: pod must set runAsNonRoot")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if not sc.get("readOnlyRootFilesystem"):
            errors.append(f"{name}/{c['name']}: readOnlyRootFilesystem")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}/{c['name']}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{name}/{c['name']}: capabilities must drop ALL")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in c:
                errors.append(f"{name}/{c['name']}: missing {probe}")
        res = c.get("resources", {})
        if "memory" not in res.get("requests", {}) or "memory" not in res.get("limits", {}):
            errors.append(f"{name}/{c['name']}: memory request and limit required")
        for env in c.get("env", []):
            if any(k in env["name"] for k in ("SECRET", "PASSWORD", "KEY", "TOKEN")) and "value" in env:
                errors.append(f"{name}/{c['name']}: {env['name']} must come from a Secret")


WORKLOADS = ("Deployment", "StatefulSet", "ReplicaSet")


def selects(selector, labels):
    """Whether a LabelSelector matches a label set."""
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def scaled(value, replicas):
    """An int-or-percent PDB field as a pod count (Kubernetes rounds percentages up)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * replicas // 100)
    return int(value)


def disruptions_allowed(pdb_spec, replicas):
    """Evictions a budget allows when all `replicas` pods are healthy."""
    if "maxUnavailable" in pdb_spec:
        return min(scaled(pdb_spec["maxUnavailable"], replicas), replicas)
    return max(replicas - scaled(pdb_spec.get("minAvailable", 1), replicas), 0)


def memory_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for u, m in units.items():
        if str(q).endswith(u):
            return int(float(str(q)[: -len(u)]) * m)
    return int(q)


def gateway_cap(pod_spec):
    """The session cap the gateway derives from its memory limit (gateway/src/limits.rs:
    (limit - 64 MiB) * 0.8 / --memory-per-session, default 8192 B)."""
    for c in pod_spec["containers"]:
        if c["name"] != "gateway":
            continue
        limit = memory_bytes(c["resources"]["limits"]["memory"])
        per = next((int(e["value"]) for e in c.get("env", []) if e["name"] == "SWITCHBOARD_GATEWAY_MEMORY_PER_SESSION"), 8192)
        return int((limit - (64 << 20)) * 0.8 / per)
    return None


def fleet(docs, where, errors):
    """Checks that span documents: HPA ownership of replicas, disruption budgets, and an
    HPA connection target below the connection cap the gateway's memory limit gives."""
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in WORKLOADS}
    hpa_min = {}
    for d in docs:
        if d["kind"] != "HorizontalPodAutoscaler":
            continue
        ref = d["spec"]["scaleTargetRef"]
        target = (ref["kind"], ref["name"])
        if target not in workloads:
            errors.append(f"{where}: HorizontalPodAutoscaler/{d['metadata']['name']} targets missing {target}")
            continue
        hpa_min[target] = d["spec"].get("minReplicas", 1)
        cap = gateway_cap(workloads[target]["spec"]["template"]["spec"]) if target == ("Deployment", "gateway") else None
        for metric in d["spec"].get("metrics", []):
            pods = metric.get("pods")
            if cap and pods and pods["metric"]["name"] == "switchboard_gateway_connections_active":
                want = int(pods["target"]["averageValue"])
                # SwitchboardGatewayNearConnectionCap fires at 90 % of the cap: scale before it.
                if want >= 0.9 * cap:
                    errors.append(
                        f"{where}: HorizontalPodAutoscaler/{d['metadata']['name']} targets {want} sessions per pod, "
                        f"but the gateway's memory limit caps it at {cap} (scale out below 90 % of it)"
                    )
        if "replicas" in workloads[target]["spec"]:
            errors.append(
                f"{where}: {target[0]}/{target[1]} sets spec.replicas but HorizontalPodAutoscaler/"
                f"{d['metadata']['name']} owns its count (every apply would reset the fleet)"
            )
    for d in docs:
        if d["kind"] != "PodDisruptionBudget":
            continue
        name = d["metadata"]["name"]
        matched = [
            k for k, w in workloads.items()
            if selects(d["spec"].get("selector", {}), w["spec"]["template"]["metadata"].get("labels", {}))
        ]
        if not matched:
            errors.append(f"{where}: PodDisruptionBudget/{name} selects no workload")
        for k in matched:
            replicas = hpa_min.get(k, workloads[k]["spec"].get("replicas", 1))
            if disruptions_allowed(d["spec"], replicas) < 1:
                errors.append(
                    f"{where}: PodDisruptionBudget/{name} allows no voluntary disruption of "
                    f"{k[0]}/{k[1]} at {replicas} replica(s): `kubectl drain` would block forever"
                )


def main():
    schema_dir, files = SCHEMA_DIR, sys.argv[1:]
    if not files:
        sys.exit("usage: validate.py RENDERED.yaml...")
    passed, errors = 0, []
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            kind, api = doc["kind"], doc["apiVersion"]
            group = api.split("/")[0] if "/" in api else ""
            where = f"{os.path.basename(path)}: {kind}/{doc['metadata']['name']}"
            before = len(errors)
            if (group, kind) in CRDS:
                with open(os.path.join(schema_dir, CRDS[(group, kind)])) as f:
                    schema = json.load(f)
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
                    errors.append(f"{where}: {e.message} at {list(e.absolute_path)}")
            elif kind == "KafkaNodePool":
                # No schema vendored (crd-schemas/README.md): check the fields Strimzi requires.
                spec = doc.get("spec", {})
                if not isinstance(spec.get("replicas"), int) or not spec.get("roles") or "storage" not in spec:
                    errors.append(f"{where}: replicas, roles and storage are required")
                if "strimzi.io/cluster" not in doc["metadata"].get("labels", {}):
                    errors.append(f"{where}: needs the strimzi.io/cluster label")
            else:
                try:
                    kubernetes_validate.validate(doc, "1.33", strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{where}: {e.message}")
                except Exception as e:  # unknown kind/version
                    errors.append(f"{where}: {e}")
            try:
                policy(doc, errors)
            except (KeyError, TypeError) as e:
                errors.append(f"{where}: malformed ({e!r} missing or wrong)")
            if len(errors) == before:
                passed += 1
        try:
            fleet(docs, os.path.basename(path), errors)
        except (KeyError, TypeError) as e:
            errors.append(f"{os.path.basename(path)}: malformed ({e!r} missing or wrong)")
    for e in errors:
        print("FAIL", e)
    print(f"manifests: {passed} passed, {len(errors)} failed")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
