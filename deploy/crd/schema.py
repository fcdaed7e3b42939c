"""The KubeRay CRD fields our manifests use, and a checker of manifests against them.

KubeRay's CRDs (ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml) are ~1 MB each, mostly the
Kubernetes pod template repeated. `prune` keeps, from a CRD's v1 openAPIV3Schema, the branches a manifest
uses: at every object it visits, the names (and types) of ALL its fields, `required`, enums; below fields
the manifest does not use, only their type (marked `x-pruned`). An object the CRD leaves open (the
resource's own `metadata`, checked by Kubernetes itself) takes any fields. `check` then finds, in a manifest, unknown fields, missing
required fields, values of the wrong type and values outside an enum.

Refresh the vendored files after editing a manifest or for a new KubeRay version (CRD files from a KubeRay
checkout or release):

    python deploy/crd/schema.py CRD_DIR          # writes deploy/crd/{rayjob,rayservice}.v1.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
MANIFESTS = {"rayjob": ("ray.io_rayjobs.yaml", HERE.parent / "rayjob.yaml"),
             "rayservice": ("ray.io_rayservices.yaml", HERE.parent / "rayservice.yaml")}
KUBERAY = "v1.7.0 (feeaf72f)"  # the CRDs the vendored files were pruned from
LEAF_KEYS = ("type", "enum", "format", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def _leaf(schema: dict) -> dict:
    out = {k: schema[k] for k in LEAF_KEYS if k in schema}
    if "anyOf" in schema:
        out["anyOf"] = [{k: s[k] for k in ("type",) if k in s} for s in schema["anyOf"]]
    if "type" not in out and "properties" in schema:
        out["type"] = "object"
    return out


def _stub(schema: dict) -> dict:
    """A field the manifest does not use: its type, and a mark when the CRD defines more below it."""
    out = _leaf(schema)
    if any(k in schema for k in ("properties", "items", "additionalProperties")):
        out["x-pruned"] = True
    return out


def prune(schema: dict, value: Any) -> dict:
    """The part of `schema` that checking `value` needs (see the module docstring)."""
    out = _leaf(schema)
    if isinstance(value, dict) and "properties" in schema:
        out["properties"] = {k: (prune(s, value[k]) if k in value else _stub(s)) for k, s in schema["properties"].items()}
        if "required" in schema:
            out["required"] = list(schema["required"])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        # one schema for every value: prune it for all of them at once
        out["additionalProperties"] = prune(schema["additionalProperties"], _union(list(value.values())))
    elif isinstance(value, list) and "items" in schema:
        out["items"] = prune(schema["items"], _union(value))
    return out


def _union(values: list) -> Any:
    """One value with every field any of `values` has (what pruning a shared schema needs)."""
    if values and all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _union([v[k] for v in values if k in v]) for k in keys}
    if values and all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    return values[0] if values else None


def _type_ok(schema: dict, v: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string") or "anyOf" in schema:
        return isinstance(v, (int, str)) and not isinstance(v, bool)
    t = schema.get("type")
    return {None: True, "object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str),
            "boolean": isinstance(v, bool), "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool)}.get(t, True)


def check(schema: dict, value: Any, path: str = "") -> list[str]:
    """Every problem of `value` against the (pruned) schema, as 'path: what' lines."""
    where = path or "<root>"
    if not _type_ok(schema, value):
        return [f"{where}: expected {schema.get('type', 'int-or-string')}, got {type(value).__name__} {value!r:.60}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{where}: missing required field {req!r}")
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if props is not None:
                if k not in props:
                    errors.append(f"{sub}: not a field the CRD defines (known: {', '.join(sorted(props))})")
                elif props[k].get("x-pruned") and isinstance(v, (dict, list)) and v:
                    errors.append(f"{sub}: the vendored schema stops here: run deploy/crd/schema.py again")
                else:
                    errors += check(props[k], v, sub)
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += check(schema["additionalProperties"], v, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += check(schema["items"], v, f"{path}[{i}]")
    return errors


def crd_schema(crd_file: Path, version: str = "v1") -> dict:
    crd = yaml.safe_load(Path(crd_file).read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def main(crd_dir: str) -> None:
    for name, (crd_name, manifest) in MANIFESTS.items():
        schema = crd_schema(Path(crd_dir) / crd_name)
        pruned = prune(schema, yaml.safe_load(manifest.read_text()))
        pruned["x-source"] = f"KubeRay {crd_name}, version v1 (pruned by deploy/crd/schema.py)"
        pruned["x-source"] += f"; KubeRay {KUBERAY}"
        (HERE / f"{name}.v1.json").write_text(json.dumps(pruned, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {len(json.dumps(pruned))} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
