#!/usr/bin/env python3
"""Offline validation of rendered manifests.

Core kinds: kubernetes-validate (bundled schemas, Kubernetes 1.33, strict).
Custom resources: JSON schemas vendored in crd-schemas/ beside this script (Strimzi,
prometheus-operator; source and licence in crd-schemas/README.md).
Policy: every container non-root, read-only root filesystem, no capabilities, probes,
memory requests and limits; no secret value inline.
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
    for e in errors:
        print("FAIL", e)
    print(f"manifests: {passed} passed, {len(errors)} failed")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
