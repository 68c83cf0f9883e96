#!/usr/bin/env bash
# Offline validation of deploy/kubernetes (no cluster needed); part of scripts/test.sh.
#   1. every YAML document under deploy/kubernetes (examples/ included, and the yaml
#      blocks of its README.md) against the Kubernetes OpenAPI schemas, strictly
#      (unknown fields are errors), with the PyPI package kubernetes-validate, for each
#      version in K8S_VERSIONS; a kind the schemas do not know is an error too
#      (kustomization.yaml is checked by step 2 instead); where kubectl is installed,
#      also the output of `kubectl kustomize deploy/kubernetes`;
#   2. the StorageClasses: exactly storage-for-dev-and-test, storage-for-acceptance and
#      storage-for-production, provisioner blk.raftblk.io, allowVolumeExpansion true,
#      fstype ext4, and no driver parameters but replicas and encrypted, with their
#      values; also the CSIDriver, kustomization.yaml's resource list, duplicate keys,
#      the volume claims' classes, raftblkd.toml's keys (against daemon/src/default.toml);
#   3. raftblkd-start.sh (from raftblkd-config.yaml) on a few made-up nodes.
# kubernetes-validate is installed once into a venv under
# ${XDG_CACHE_HOME:-~/.cache}/raftblk-k8s-venv, made with Debian's /usr/bin/python3
# (needs python3-venv, which scripts/install-test-deps.sh installs).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# The oldest Kubernetes the sidecars in controller.yaml support (csi-provisioner 6 and
# csi-resizer 2 need 1.34) and the newest the pinned kubernetes-validate knows.
k8s_versions=${K8S_VERSIONS:-1.34.0 1.37.0}
kv_version=1.37.0
venv=${XDG_CACHE_HOME:-$HOME/.cache}/raftblk-k8s-venv

fail() {
    echo "validate.sh: FAIL: $*" >&2
    exit 1
}

# --- the venv ----------------------------------------------------------------------
if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "validate.sh: installing python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove python3-venv
    else
        fail "/usr/bin/python3 cannot make a venv: install python3-venv (scripts/install-test-deps.sh does)"
    fi
fi
if ! "$venv/bin/python" -c "import sys, kubernetes_validate.version as v; sys.exit(v.__version__ != '$kv_version')" 2>/dev/null; then
    echo "validate.sh: installing kubernetes-validate $kv_version into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$kv_version" ||
        fail "cannot install kubernetes-validate $kv_version from PyPI into $venv"
fi
py=$venv/bin/python

work=$(mktemp -d "${TMPDIR:-/tmp}/raftblk-k8s-validate.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- 1. the schemas ----------------------------------------------------------------
mapfile -t files < <(find "$here" -type f \( -name '*.yaml' -o -name '*.yml' \) ! -name kustomization.yaml | sort)
((${#files[@]})) || fail "no YAML files under $here"
# The README's yaml blocks, one file each.
"$py" - "$here/README.md" "$work" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
for i, block in enumerate(re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)):
    open(f"{sys.argv[2]}/README.md-block{i + 1}.yaml", "w").write(block)
EOF
mapfile -t readme_blocks < <(find "$work" -name 'README.md-block*.yaml' | sort)
args=(--strict --quiet)
for v in $k8s_versions; do args+=(-k "$v"); done
rc=0
out=$("$venv/bin/kubernetes-validate" "${args[@]}" "${files[@]}" "${readme_blocks[@]}" 2>&1) || rc=$?
if ((rc != 0)) || grep -qE '^(ERROR|WARN|FATAL)' <<<"$out"; then
    printf '%s\n' "$out" | sed "s|$work/|deploy/kubernetes/|g; s|$repo/||g" >&2
    fail "the manifests do not validate against Kubernetes $k8s_versions (strict); see above (a WARN about a missing schema means a kind or apiVersion Kubernetes does not know)"
fi
echo "validate.sh: ${#files[@]} files and ${#readme_blocks[@]} README blocks valid against Kubernetes ${k8s_versions// /, } (strict schemas, kubernetes-validate $kv_version)"
# What `kubectl apply -k` would send, where kubectl is installed (its built-in kustomize).
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    kubectl kustomize "$here" >"$work/kustomized.yaml" 2>"$work/kustomize.err" ||
        fail "kubectl kustomize deploy/kubernetes failed: $(cat "$work/kustomize.err")"
    out=$("$venv/bin/kubernetes-validate" "${args[@]}" "$work/kustomized.yaml" 2>&1) || rc=$?
    if ((rc != 0)) || grep -qE '^(ERROR|WARN|FATAL)' <<<"$out"; then
        printf '%s\n' "$out" >&2
        fail "the output of kubectl kustomize deploy/kubernetes does not validate"
    fi
    echo "validate.sh: kubectl kustomize deploy/kubernetes renders $(grep -c '^kind:' "$work/kustomized.yaml") valid objects"
else
    echo "validate.sh: no kubectl here; kustomization.yaml checked by the rules below only"
fi

# --- 2. what the schemas cannot know -----------------------------------------------
"$py" - "$here" "$repo" "${readme_blocks[@]}" <<'EOF'
import os, sys, tomllib
import yaml

here, repo, readme_blocks = sys.argv[1], sys.argv[2], sys.argv[3:]
errors = []


class UniqueKeyLoader(yaml.SafeLoader):
    pass


def mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping_without_duplicates)

docs = []  # (file, document)
for root, _, names in os.walk(here):
    for name in sorted(names):
        if name.endswith((".yaml", ".yml")):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, repo)
            try:
                with open(path) as f:
                    docs += [(rel, d) for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]
            except yaml.YAMLError as e:
                errors.append(f"{rel}: {e}")
for path in readme_blocks:
    with open(path) as f:
        docs += [("deploy/kubernetes/README.md", d) for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]

by_kind = {}
for rel, d in docs:
    if not isinstance(d, dict) or not d.get("kind"):
        errors.append(f"{rel}: a document without kind")
        continue
    if d["kind"] == "Kustomization":
        continue
    if not (d.get("metadata") or {}).get("name"):
        errors.append(f"{rel}: a {d['kind']} without metadata.name")
        continue
    by_kind.setdefault(d["kind"], []).append((rel, d))

# The StorageClasses: exactly these, with exactly these driver parameters.
expected = {
    "storage-for-dev-and-test": {"replicas": "0", "encrypted": "false"},
    "storage-for-acceptance": {"replicas": "1", "encrypted": "false"},
    "storage-for-production": {"replicas": "2", "encrypted": "true"},
}
classes = by_kind.get("StorageClass", [])
names = [d["metadata"]["name"] for _, d in classes]
if sorted(names) != sorted(expected):
    errors.append(f"StorageClasses are {sorted(names)}; expected exactly {sorted(expected)}")
for rel, sc in classes:
    name = sc["metadata"]["name"]
    where = f"{rel}: StorageClass {name}"
    if sc.get("provisioner") != "blk.raftblk.io":
        errors.append(f"{where}: provisioner is {sc.get('provisioner')!r}, not 'blk.raftblk.io'")
    if sc.get("allowVolumeExpansion") is not True:
        errors.append(f"{where}: allowVolumeExpansion is {sc.get('allowVolumeExpansion')!r}, not true")
    if sc.get("reclaimPolicy") != "Delete":
        errors.append(f"{where}: reclaimPolicy is {sc.get('reclaimPolicy')!r}, not Delete")
    if sc.get("volumeBindingMode") != "WaitForFirstConsumer":
        errors.append(f"{where}: volumeBindingMode is {sc.get('volumeBindingMode')!r}, not WaitForFirstConsumer")
    params = sc.get("parameters") or {}
    if params.get("csi.storage.k8s.io/fstype") != "ext4":
        errors.append(f"{where}: csi.storage.k8s.io/fstype is {params.get('csi.storage.k8s.io/fstype')!r}, not 'ext4'")
    own = {k: v for k, v in params.items() if not k.startswith("csi.storage.k8s.io/")}
    if set(own) != {"replicas", "encrypted"}:
        errors.append(f"{where}: driver parameters are {sorted(own)}; the driver takes exactly replicas and encrypted")
    if name in expected and own != expected[name]:
        errors.append(f"{where}: parameters {own}, expected {expected[name]} (strings)")
    if not (isinstance(own.get("replicas"), str) and own["replicas"].isdigit()):
        errors.append(f"{where}: replicas {own.get('replicas')!r} is not a string holding a non-negative integer")
    if own.get("encrypted") not in ("true", "false"):
        errors.append(f"{where}: encrypted {own.get('encrypted')!r} is not \"true\" or \"false\"")

# Claims name one of these classes.
claims = [(rel, d["spec"]) for rel, d in by_kind.get("PersistentVolumeClaim", [])]
for rel, d in by_kind.get("StatefulSet", []):
    claims += [(rel, t.get("spec", {})) for t in d["spec"].get("volumeClaimTemplates", [])]
for rel, spec in claims:
    if spec.get("storageClassName") not in expected:
        errors.append(f"{rel}: a claim with storageClassName {spec.get('storageClassName')!r}, not one of {sorted(expected)}")

# The CSIDriver.
drivers = by_kind.get("CSIDriver", [])
want = {"attachRequired": True, "podInfoOnMount": False, "volumeLifecycleModes": ["Persistent"], "fsGroupPolicy": "File"}
if [d["metadata"]["name"] for _, d in drivers] != ["blk.raftblk.io"]:
    errors.append(f"CSIDrivers are {[d['metadata']['name'] for _, d in drivers]}; expected one, blk.raftblk.io")
for rel, d in drivers:
    for key, value in want.items():
        if d["spec"].get(key) != value:
            errors.append(f"{rel}: CSIDriver spec.{key} is {d['spec'].get(key)!r}, not {value!r}")

# No object twice; kustomization.yaml lists every manifest of the directory.
seen = {}
for rel, d in docs:
    if isinstance(d, dict) and d.get("kind") not in (None, "Kustomization") and (d.get("metadata") or {}).get("name"):
        key = (d["apiVersion"].split("/")[0], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        if key in seen and seen[key] != rel:
            errors.append(f"{rel}: {d['kind']} {d['metadata']['name']} is also in {seen[key]}")
        elif key in seen:
            errors.append(f"{rel}: {d['kind']} {d['metadata']['name']} appears twice")
        seen[key] = rel
kust = [d for rel, d in docs if rel.endswith("kubernetes/kustomization.yaml")]
if len(kust) != 1 or kust[0].get("kind") != "Kustomization":
    errors.append("deploy/kubernetes/kustomization.yaml is missing or not a Kustomization")
else:
    listed = kust[0].get("resources", [])
    present = sorted(n for n in os.listdir(here) if n.endswith(".yaml") and n != "kustomization.yaml")
    for r in listed:
        if not os.path.isfile(os.path.join(here, r)):
            errors.append(f"kustomization.yaml lists {r}, which does not exist")
    for n in present:
        if n not in listed:
            errors.append(f"kustomization.yaml does not list {n} (kubectl apply -k would leave it out)")

# raftblkd.toml: raftblkd refuses unknown keys, so every key must be in its default.
with open(os.path.join(repo, "daemon/src/default.toml"), "rb") as f:
    default = tomllib.load(f)
configs = [d for _, d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == "raftblkd-config"]
if len(configs) != 1:
    errors.append("ConfigMap raftblkd-config is missing")
else:
    data = configs[0].get("data", {})
    try:
        conf = tomllib.loads(data.get("raftblkd.toml", ""))
    except tomllib.TOMLDecodeError as e:
        conf = {}
        errors.append(f"raftblkd-config: raftblkd.toml is not TOML: {e}")

    def known(table, base, path):
        for key, value in table.items():
            if key not in base:
                errors.append(f"raftblkd-config: raftblkd.toml sets {path}{key}, which raftblkd does not know (daemon/src/default.toml)")
            elif isinstance(value, dict) and isinstance(base[key], dict):
                known(value, base[key], f"{path}{key}.")

    known(conf, default, "")
    for key in ("seeds", "zones", "raftblkd-start.sh"):
        if key not in data:
            errors.append(f"raftblkd-config: no {key}")

if errors:
    print("validate.sh: FAIL:", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)
print(f"validate.sh: StorageClasses {', '.join(sorted(names))} as specified; CSIDriver, kustomization.yaml, "
      f"{len(claims)} volume claim(s) and raftblkd.toml consistent ({len(docs)} documents)")
EOF

# --- 3. raftblkd-start.sh ----------------------------------------------------------
"$py" - "$here/raftblkd-config.yaml" "$work/config" <<'EOF'
import os, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "raftblkd-config":
        os.makedirs(sys.argv[2])
        for key, value in d["data"].items():
            open(os.path.join(sys.argv[2], key), "w").write(value)
EOF
start=$work/config/raftblkd-start.sh
bash -n "$start" || fail "raftblkd-start.sh (raftblkd-config.yaml) has a bash syntax error"
cat >"$work/fake-raftblkd" <<'EOF'
#!/usr/bin/env bash
echo "args=$*"
env | grep '^RAFTBLK_' | grep -v '^RAFTBLK_START_' | sort
EOF
chmod +x "$work/fake-raftblkd"
node() {   # node NAME IP ZONE-LABEL: runs the script as that node; prints what raftblkd would get
    RAFTBLK_START_CONF_DIR=$work/config RAFTBLK_START_DATA_DIR=$work/data-$1 \
        RAFTBLK_START_SHARED_DIR=$work/run-$1 RAFTBLK_START_DAEMON=$work/fake-raftblkd \
        NODE_NAME=$1 NODE_IP=$2 K8S_ZONE=$3 JOIN_ADDRESS=raftblkd-api.raftblk-system.svc:10810 \
        env -u RAFTBLK_NODE_ID -u RAFTBLK_PEERS -u RAFTBLK_JOIN -u RAFTBLK_ZONE -u RAFTBLK_LABELS \
        bash "$start" 2>"$work/stderr-$1"
}
expect() {   # expect WHAT OUTPUT LINE...
    local what=$1 output=$2 line
    shift 2
    for line in "$@"; do
        grep -qxF -- "$line" <<<"$output" || fail "raftblkd-start.sh, $what: no line '$line' in:"$'\n'"$output"
    done
}
# As shipped (no seeds) it refuses to start, saying what to do.
if node a 10.0.0.1 "" >/dev/null; then fail "raftblkd-start.sh started raftblkd without seeds"; fi
grep -q 'list at least two' "$work/stderr-a" || fail "raftblkd-start.sh without seeds: unclear message: $(cat "$work/stderr-a")"
printf '# test seeds\n1@10.0.0.1\n2@10.0.0.2  # second\n3@10.0.0.3\n' >"$work/config/seeds"
printf 'c zone-c\n# d zone-x\n' >"$work/config/zones"
out=$(node b 10.0.0.2 zone-b) || fail "raftblkd-start.sh as seed 2 failed: $(cat "$work/stderr-b")"
expect "seed 2" "$out" "args=--config $work/config/raftblkd.toml" RAFTBLK_NODE_ID=2 \
    RAFTBLK_PEER_LISTEN=10.0.0.2:10811 RAFTBLK_PEERS=1@10.0.0.1:10811,3@10.0.0.3:10811 \
    RAFTBLK_ZONE=zone-b RAFTBLK_LABELS=k8s-node=b
grep -q '^RAFTBLK_JOIN=' <<<"$out" && fail "raftblkd-start.sh: a seed was given a join address"
[[ $(<"$work/run-b/node-id") == 2 && $(<"$work/data-b/k8s-node-id") == 2 ]] || fail "raftblkd-start.sh: seed 2's id was not kept"
out=$(node c 10.0.0.9 "") || fail "raftblkd-start.sh as a joining node failed: $(cat "$work/stderr-c")"
id=$(<"$work/data-c/k8s-node-id")
((id >= 1000)) || fail "raftblkd-start.sh drew id $id for a joining node (want 1000 or more)"
expect "joining node" "$out" "RAFTBLK_NODE_ID=$id" RAFTBLK_PEER_LISTEN=10.0.0.9:10811 \
    RAFTBLK_JOIN=raftblkd-api.raftblk-system.svc:10810 RAFTBLK_ZONE=zone-c
grep -q '^RAFTBLK_PEERS=' <<<"$out" && fail "raftblkd-start.sh: a joining node was given static peers"
out=$(node c 10.0.0.9 "") || fail "raftblkd-start.sh restarting a joining node failed: $(cat "$work/stderr-c")"
expect "joining node, restarted" "$out" "RAFTBLK_NODE_ID=$id"
# A data directory of another node's id under a seed's IP is refused.
if node c 10.0.0.3 "" >/dev/null; then fail "raftblkd-start.sh accepted seed 3's IP for the data of node $id"; fi
echo "validate.sh: raftblkd-start.sh: seeds, joining nodes, kept ids, zones and refusals as intended"
echo "validate.sh: OK"
