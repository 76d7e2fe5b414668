"""Shared fixtures: the environment, a PerSeg-layout sample of bundled photos, randomly
initialised SAM models, concepts fitted on the sample, the sample as a small lake, and a
loopback S3 endpoint.

Helpers that tests import (the CLI runners, sample tools, reference oracles) are plain
modules beside this file or beside the tests that use them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bundled_sample import make_bundled_perseg
from cli_tools import ACCESS_KEY, SECRET_KEY, run_cli
from ray_turns import RAY_TURN, SHARED_RAY, turn_if
from jobs.pipeline.session import local_threads
from sample_tools import load_pair

# Torch threads: PERSAM_TEST_THREADS if set; under pytest-xdist (`make test`: two workers)
# the cores shared among the workers as among local actors (session.local_threads), for each
# worker and, through OMP_NUM_THREADS, for every process it starts (CLIs, Ray workers;
# local_threads caps the actors' threads at it).
# Two workers of two threads each on two cores spin against each other (docs/performance.md).
# The same count everywhere also keeps a local run's rows equal to a Ray actor's bit for bit.
def _test_threads() -> int | None:
    if "PERSAM_TEST_THREADS" in os.environ:
        return int(os.environ["PERSAM_TEST_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return local_threads(workers) if workers else None


_THREADS = _test_threads()
if _THREADS is not None:
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

BROKEN = ("broken.jpg", "zero.png")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (make test): modules handed out by lanes (xdist_lanes.py)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist_lanes import LaneScheduling

    return LaneScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    """Note each module's last slow test, after which its shared Ray stops (SharedRay)."""
    last: dict[str, str] = {}
    for item in items:
        if item.get_closest_marker("slow") is not None:
            last[item.nodeid.split("::")[0]] = item.nodeid
    SHARED_RAY.last_slow = set(last.values())


@pytest.fixture(scope="session", autouse=True)
def _shared_ray(tmp_path_factory):
    """The product's `start_ray`, for every job this process runs: SharedRay's (ray_turns.py)."""
    from jobs.pipeline import session

    if "PYTEST_XDIST_WORKER" in os.environ:
        RAY_TURN.path = tmp_path_factory.getbasetemp().parent / "ray-turn.lock"
    real_start = session.start_ray
    patch = pytest.MonkeyPatch()
    patch.setattr(session, "start_ray", lambda: SHARED_RAY.start(real_start))
    yield
    patch.undo()
    SHARED_RAY.stop()


@pytest.fixture(scope="module", autouse=True)
def _shared_ray_stops_with_the_module(_shared_ray):
    yield
    SHARED_RAY.stop()


@pytest.fixture(autouse=True)
def _ray_for_jobs(request, _shared_ray):
    """`own_ray` for the test's jobs; after the module's last slow test, the shared Ray stops."""
    SHARED_RAY.own = request.node.get_closest_marker("own_ray") is not None
    yield
    SHARED_RAY.test_ends(request.node.nodeid)


@pytest.fixture(scope="module", autouse=True)
def _ray_process_modules_take_turns(request, _shared_ray):
    """A module marked `ray_processes` holds the Ray turn while it runs (its child processes
    start Ray where this process cannot see it, its fixtures too)."""
    with turn_if(request.node.get_closest_marker("ray_processes") is not None):
        yield


@pytest.fixture(autouse=True)
def _ray_process_tests_take_turns(request, _shared_ray):
    """A test marked `ray_processes` holds the Ray turn while it runs (re-entrant: in a module
    so marked, the module's turn already covers it)."""
    with turn_if(request.node.get_closest_marker("ray_processes") is not None):
        yield


# ---------------------------------------------------------------------------- environment


@pytest.fixture(scope="session", autouse=True)
def _no_cluster():
    """Every job here runs on an embedded local Ray (or `--runner local`), never on a cluster
    a developer's shell points RAY_ADDRESS at. Session scope: module fixtures run jobs too."""
    patch = pytest.MonkeyPatch()
    patch.delenv("RAY_ADDRESS", raising=False)
    yield
    patch.undo()


def _ray_sessions() -> set[str]:
    """The session folders of every local Ray started on this machine (Ray's temporary root:
    RAY_TMPDIR, else TMPDIR, else /tmp); each is named ..._<pid of the driver that started it>."""
    root = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
    try:
        return {entry.name for entry in os.scandir(root) if entry.name.startswith("session_2")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def _slow_work_only_in_slow_tests(request):
    """A test that starts Ray (in this process or in a child process it starts), runs a job on
    this process's shared Ray, or builds the real vit_b architecture carries the `slow` mark (`make test-quick` leaves out exactly
    those): it fails otherwise. One whose child processes start Ray is marked `ray_processes`,
    or its module is (they take turns with the other worker's Rays). A Ray that another
    process on the machine started (another test run) is not this test's."""
    slow = request.node.get_closest_marker("slow") is not None
    if "vit_b_sam" in request.fixturenames and not slow:
        pytest.fail(f"{request.node.nodeid} builds vit_b (vit_b_sam) but is not marked slow", pytrace=False)
    from persam_core.modeling import sam_family

    before, children, built = _ray_sessions(), set(), []
    real_init, real_vit_b = subprocess.Popen.__init__, sam_family.BUILDERS["vit_b"]

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        children.add(str(self.pid))

    def build_vit_b():
        if torch.empty(0).device.type != "meta":  # a skeleton (keys and shapes) costs nothing
            built.append("vit_b")
        return real_vit_b()

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "__init__", init)
    patch.setitem(sam_family.BUILDERS, "vit_b", build_vit_b)
    try:
        yield
    finally:
        patch.undo()
    if built and not slow:
        pytest.fail(f"{request.node.nodeid} builds vit_b but is not marked slow", pytrace=False)
    drivers = {name: name.rsplit("_", 1)[-1] for name in _ray_sessions() - before}
    started = sorted(name for name, pid in drivers.items() if pid in children or pid == str(os.getpid()))
    if started and not slow:
        pytest.fail(f"{request.node.nodeid} started Ray ({started[0]}) but is not marked slow", pytrace=False)
    used_shared_ray, SHARED_RAY.used = SHARED_RAY.used, False  # set by module fixtures' jobs too
    if used_shared_ray and not slow:
        pytest.fail(f"{request.node.nodeid} ran a job on Ray but is not marked slow", pytrace=False)
    in_children = sorted(name for name, pid in drivers.items() if pid in children)
    if in_children and request.node.get_closest_marker("ray_processes") is None:
        pytest.fail(f"{request.node.nodeid} ran Ray in a child process ({in_children[0]}) but neither it nor its "
                    "module is marked ray_processes", pytrace=False)


# ---------------------------------------------------------------------------- sample data and models


@pytest.fixture(scope="session")
def perseg_sample(tmp_path_factory) -> Path:
    """Root of a PerSeg-layout sample (Images/<concept>/NN.jpg, Annotations/<concept>/NN.png):
    concepts cat, duck_toy and colorful_sneaker, shots 00-02 each. Made from photos that
    scikit-image ships (bundled_sample.py), so a clone needs no file from elsewhere;
    $PERSAM_SAMPLE_DATA runs the same tests on another sample of that layout (PerSeg's own)."""
    override = os.environ.get("PERSAM_SAMPLE_DATA")
    if override:
        path = Path(override)
        if not ((path / "Images").is_dir() and (path / "Annotations").is_dir()):
            pytest.fail(f"PERSAM_SAMPLE_DATA={override}: no Images/ and Annotations/ folders there; point it at a "
                        "PerSeg-layout sample or unset it to use the bundled photos", pytrace=False)
        return path
    return make_bundled_perseg(tmp_path_factory.mktemp("perseg-sample"))


@pytest.fixture(scope="session")
def tiny_sam():
    from persam_core.modeling.models import build_random

    return build_random("tiny", 0)


@pytest.fixture(scope="session")
def tiny_sam2():
    """SAM 2 (sam2's SAM2Base) with a shrunken Hiera trunk: SAM 2's real code paths, fast."""
    from persam_core.modeling.models import build_random

    return build_random("tiny_sam2", 0)


@pytest.fixture(scope="session")
def vit_b_sam():
    from persam_core.modeling.models import build_random

    return build_random("vit_b", 0)


@pytest.fixture(scope="session")
def tiny_fingerprint(tiny_sam) -> str:
    """The fingerprint of `--model-type tiny --checkpoint random:0`."""
    from persam_core.modeling.models import model_fingerprint

    return model_fingerprint(tiny_sam, "tiny")


@pytest.fixture(scope="session")
def concept_tensors(perseg_sample, tiny_sam, tiny_fingerprint) -> dict:
    """PerSAM concepts (ConceptTensors on CPU) from each sample concept's 00 shot, computed in
    this process, plus a PerSAM-F one ("duck_f", fixed mask weights)."""
    from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
    from persam_core.persam import ConceptTensors
    from persam_core.modeling.predictor import encode_images
    from persam_core.modeling.resize import resize_longest_side

    made = {}
    for name in ("cat", "duck_toy", "colorful_sneaker"):
        image, mask = load_pair(perseg_sample, name, "00")
        cells = reference_cells(encode_images(tiny_sam, [resize_longest_side(image)]), [mask], ["mask"])
        feature, embedding = persam_targets(cells)
        made[name] = ConceptTensors.on(Concept(name, "persam", feature.numpy(), embedding.numpy(), tiny_fingerprint),
                                       "cpu")
        if name == "duck_toy":
            made["duck_f"] = ConceptTensors.on(Concept(
                "duck_f", "persam-f", persam_f_target_feature(cells).numpy(), embedding.numpy(), tiny_fingerprint,
                mask_weights=np.array([0.2, 0.3, 0.5], dtype=np.float32)), "cpu")
    return made


# ---------------------------------------------------------------------------- the sample as a lake


def _fit(sample: Path, concept: str, out: Path, *extra: str) -> Path:
    result = run_cli(["fit", "--model-type", "tiny", "--checkpoint", "random:0",
                      "--image", str(sample / "Images" / concept / "00.jpg"),
                      "--mask", str(sample / "Annotations" / concept / "00.png"),
                      "--name", concept, "--out", str(out), *extra])
    assert result.rc == 0, result.err
    return out


@pytest.fixture(scope="session")
def sample_lake(perseg_sample, tmp_path_factory) -> SimpleNamespace:
    """What the segment jobs here read: every sample image (copied: the sample is read-only,
    the copy need not be) plus two broken files, and the concepts cat (PerSAM) and duck_toy
    (PerSAM-F, 3 epochs) fitted by `persam fit` on their 00 shots with tiny random:0 weights.
    Tests read it, never change it."""
    root = tmp_path_factory.mktemp("lake")
    images = root / "images"
    for source in sorted((perseg_sample / "Images").rglob("*.jpg")):
        target = images / source.relative_to(perseg_sample / "Images")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (images / "broken.jpg").write_text("<html>this is not an image</html>\n")
    (images / "zero.png").write_bytes(b"")
    concepts = root / "concepts"
    concepts.mkdir()
    cat = _fit(perseg_sample, "cat", concepts / "cat.json", "--method", "persam")
    duck = _fit(perseg_sample, "duck_toy", concepts / "duck_toy.json", "--method", "persam-f", "--epochs", "3")
    good = sorted(str(p) for p in images.rglob("*.jpg") if p.name not in BROKEN)
    return SimpleNamespace(root=root, images=images, concepts=concepts, cat=cat, duck=duck, good_urls=good,
                           sample=perseg_sample)


@pytest.fixture(scope="session")
def tiny_concept(sample_lake) -> Path:
    """A PerSAM concept file fitted on the sample cat with tiny random:0 weights."""
    return sample_lake.cat


# ---------------------------------------------------------------------------- S3 on loopback


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto server) on 127.0.0.1."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch) -> dict:
    """The standard AWS variables, pointing s3fs (in this process and children) at moto."""
    values = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


@pytest.fixture()
def s3(s3_env):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()
