#!/usr/bin/env bash
# Validates every deployment manifest under deploy/ with real tools from PyPI
# (yamllint, kubernetes-validate, check-jsonschema's vendored compose-spec)
# and systemd-analyze when present. Installs the PyPI tools if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need yamllint || ! need kubernetes-validate || ! need check-jsonschema; then
    python3 -m pip install --quiet yamllint kubernetes-validate check-jsonschema
fi

echo "== yamllint"
yamllint -d '{extends: default, rules: {line-length: {max: 130}, document-start: disable, truthy: {check-keys: false}, braces: {max-spaces-inside: 1}, brackets: {max-spaces-inside: 1}}}' \
    deploy/k8s deploy/docker/compose.yaml

echo "== kubernetes-validate (strict, against the Kubernetes OpenAPI schemas)"
kubernetes-validate --strict deploy/k8s/base/coordinator.yaml deploy/k8s/base/merchant-agent.yaml \
    deploy/k8s/fleet/fleet-job.yaml

echo "== kustomization resources exist"
python3 - <<'PY'
import os, sys, yaml
missing = []
for base in ("deploy/k8s/base", "deploy/k8s/fleet"):
    k = yaml.safe_load(open(os.path.join(base, "kustomization.yaml")))
    assert k["kind"] == "Kustomization", k
    missing += [os.path.join(base, r) for r in k["resources"] if not os.path.exists(os.path.join(base, r))]
sys.exit(f"missing kustomize resources: {missing}" if missing else 0)
PY

echo "== compose-spec"
check-jsonschema --builtin-schema vendor.compose-spec deploy/docker/compose.yaml

echo "== compose: each container mounts only its own secrets"
python3 - <<'PY'
import sys, yaml
c = yaml.safe_load(open("deploy/docker/compose.yaml"))
bad = []
for name, svc in c["services"].items():
    vols = [v.split(":")[0] for v in svc.get("volumes", [])]
    if name != "certs" and "ca" in vols:
        bad.append(f"{name} mounts the CA volume (CA key)")
    if name.startswith("merchant-"):
        own = "tls-m" + name.split("-")[1]
        tls = [v for v in vols if v.startswith("tls-") or v == "pki"]
        if tls != [own]:
            bad.append(f"{name} mounts {tls}, expected only {own}")
sys.exit("\n".join(bad) if bad else 0)
PY

echo "== fleet Job: only the init container mounts the study CA key"
python3 - <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("deploy/k8s/fleet/fleet-job.yaml")) if d]
job = next(d for d in docs if d["kind"] == "Job")
assert job["spec"]["completionMode"] == "Indexed", "the fleet Job must be Indexed"
pod = job["spec"]["template"]["spec"]
ca_volumes = {v["name"] for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] == "fedcart-study-ca"}
bad = [c["name"] for c in pod["containers"]
       if any(m["name"] in ca_volumes for m in c.get("volumeMounts", []))]
sys.exit(f"containers mounting the study CA: {bad}" if bad else 0)
PY

echo "== coordinator/merchant TOML parse"
python3 - <<'PY'
import glob, tomllib
for f in glob.glob("deploy/**/*.toml", recursive=True):
    tomllib.load(open(f, "rb"))
    print("ok", f)
PY

if need systemd-analyze; then
    echo "== systemd-analyze verify"
    # ExecStart must exist for verify; point it at a stand-in binary in a temp root.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sed "s#/usr/local/bin/fedcart-client#/bin/true#" deploy/systemd/fedcart-agent.service > "$tmp/fedcart-agent.service"
    out=$(systemd-analyze verify "$tmp/fedcart-agent.service" 2>&1 || true)
    # Only complaints about this unit count (the host may lack other units).
    if echo "$out" | grep -i "fedcart-agent.service" | grep -vi "documentation"; then
        echo "$out"; exit 1
    fi
fi
echo "deploy manifests valid"
