"""Specification of Dockerfile.sidecar and Dockerfile.webhook, checked without a Docker engine:
pinned base, non-root numeric user, exec-form entrypoint on a module that runs, and a dependency
install that succeeds in a fresh venv and covers every import of the package it ships."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sidecar.ports import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"sidecar": REPO / "Dockerfile.sidecar", "webhook": REPO / "Dockerfile.webhook"}
EXACT_PYTHON = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: line continuations joined, comments dropped, global ARG defaults
    substituted into FROM (the subset of the Dockerfile grammar these files use)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            assert stages, f"{keyword} before FROM in {path.name}"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def entry_module(image: str) -> str:
    entrypoint = exec_form(parse(IMAGES[image])[-1].last("ENTRYPOINT"))
    assert entrypoint[:2] == ["python", "-m"] and len(entrypoint) == 3, entrypoint
    return entrypoint[2]


def webhook_deployment_container() -> dict[str, object]:
    dep = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    container: dict[str, object] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


# ---------------------------------------------------------------------------------------------
# Static checks


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_as_a_numeric_non_root_user(image: str) -> None:
    user = parse(IMAGES[image])[-1].last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid == "" or (gid.isdigit() and int(gid) != 0), user


@pytest.mark.parametrize("image", IMAGES)
def test_every_stage_starts_from_an_exactly_pinned_slim_python(image: str) -> None:
    stages = parse(IMAGES[image])
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base not in names:
            assert EXACT_PYTHON.match(stage.base), stage.base


@pytest.mark.parametrize("image", IMAGES)
def test_build_is_multi_stage_on_one_base_so_the_venv_interpreter_exists(image: str) -> None:
    stages = parse(IMAGES[image])
    assert len(stages) >= 2
    assert stages[0].base == stages[-1].base
    copied = stages[-1].all("COPY")
    assert any(c.startswith(f"--from={stages[0].name} /opt/venv ") for c in copied), copied


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_is_the_package_module_in_exec_form(image: str) -> None:
    module = entry_module(image)
    assert module == image
    assert (REPO / module / "__main__.py").is_file()
    sources = [shlex.split(c)[0] for stage in parse(IMAGES[image]) for c in stage.all("COPY")]
    assert f"{module}/" in sources, "the module's source is copied into the image"


@pytest.mark.parametrize("image", IMAGES)
def test_nothing_at_run_time_needs_a_shell(image: str) -> None:
    final = parse(IMAGES[image])[-1]
    assert final.all("RUN") == [], "the final stage only copies"
    for keyword in ("ENTRYPOINT", "CMD"):
        for args in final.all(keyword):
            exec_form(args)


@pytest.mark.parametrize("image", IMAGES)
def test_every_copied_source_exists(image: str) -> None:
    for stage in parse(IMAGES[image]):
        for args in stage.all("COPY"):
            words = shlex.split(args)
            if words[0].startswith("--from="):
                continue
            for src in words[:-1]:
                assert (REPO / src).exists(), src


def test_proxy_image_exposes_the_proxy_ports() -> None:
    exposed = {int(p) for e in parse(IMAGES["sidecar"])[-1].all("EXPOSE") for p in e.split()}
    assert exposed == {OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT}


def test_webhook_image_exposes_the_ports_its_deployment_declares() -> None:
    exposed = {int(p) for e in parse(IMAGES["webhook"])[-1].all("EXPOSE") for p in e.split()}
    ports = webhook_deployment_container()["ports"]
    assert isinstance(ports, list)
    assert exposed == {p["containerPort"] for p in ports}


@pytest.mark.parametrize("image", IMAGES)
def test_requirements_are_exact_pins(image: str) -> None:
    lines = [
        line.strip()
        for line in (REPO / "requirements" / f"{image}.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", line), line


def test_the_webhook_image_runs_on_uvloop_as_its_benchmark_does() -> None:
    """python -m webhook falls back to asyncio's loop without uvloop: the image must not quietly lose it."""
    pins = (REPO / "requirements" / "webhook.txt").read_text()
    assert re.search(r"^uvloop==", pins, re.M) and re.search(r"^httptools==", pins, re.M)


# ---------------------------------------------------------------------------------------------
# The entry points run (with the project's venv, from the source tree as in the image's /app)


def _help(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_module_answers_help(image: str) -> None:
    result = _help(entry_module(image))
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_proxy_default_command_answers_help() -> None:
    # The image's CMD is what the injector runs (args ["run"]).
    cmd = exec_form(parse(IMAGES["sidecar"])[-1].last("CMD"))
    result = _help("sidecar", *cmd)
    assert result.returncode == 0, result.stderr


def test_webhook_command_of_the_deployment_answers_help() -> None:
    args = webhook_deployment_container()["args"]
    assert isinstance(args, list)
    result = _help("webhook", args[0])
    assert result.returncode == 0, result.stderr
    for flag in (a for a in args if a.startswith("--")):
        assert flag in result.stdout, f"{flag} is passed by the Deployment"


def test_webhook_install_command_used_by_kind_answers_help() -> None:
    result = _help("webhook", "install")
    assert result.returncode == 0, result.stderr
    assert "--namespaces" in result.stdout


# ---------------------------------------------------------------------------------------------
# The builder's pip install, replayed in a fresh venv (slow: installs ~30 wheels from the local cache)


@dataclass
class Installed:
    python: Path
    install: subprocess.CompletedProcess[str]
    check: subprocess.CompletedProcess[str] | None


def _builder_pip_args(image: str) -> list[str]:
    """The arguments of the builder's `pip install`, with files it COPY'd mapped back to the repo."""
    builder = parse(IMAGES[image])[0]
    copied = {
        shlex.split(c)[-1]: shlex.split(c)[0] for c in builder.all("COPY") if not c.startswith("--from")
    }
    for run in builder.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if len(words) > 2 and words[0].endswith("/pip") and words[1] == "install":
                return [str(REPO / copied[w]) if w in copied else w for w in words[2:]]
    raise AssertionError(f"no pip install in the builder of {image}")


@pytest.fixture(scope="module", params=list(IMAGES))
def image_venv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Installed]:
    image: str = request.param
    venv = tmp_path_factory.mktemp(f"venv-{image}")
    # No pip of its own (ensurepip costs ~5 s a venv) and no bytecode: the test's pip installs into it
    # (`--python`) with the builder's own arguments, which is what decides whether the install resolves.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--no-compile", *_builder_pip_args(image)], capture_output=True, text=True, timeout=300
    )
    check = None
    if install.returncode == 0:
        check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    return image, Installed(python, install, check)


@pytest.mark.slow
def test_builder_pip_install_succeeds_in_a_fresh_venv(image_venv: tuple[str, Installed]) -> None:
    _, env = image_venv
    assert env.install.returncode == 0, env.install.stdout[-2000:] + env.install.stderr[-2000:]
    assert env.check is not None and env.check.returncode == 0, env.check and env.check.stdout


@pytest.mark.slow
def test_installed_requirements_cover_every_module_of_the_package(
    image_venv: tuple[str, Installed], tmp_path: Path
) -> None:
    image, env = image_venv
    assert env.install.returncode == 0, "install failed (see the install test)"
    # Exactly the directories the Dockerfile copies into the image's /app: an import of a package
    # the image lacks (the other one, say) or of a dependency missing from the requirements fails here.
    app = tmp_path / "app"
    dockerfile = (REPO / f"Dockerfile.{image}").read_text()
    copied = re.findall(r"^COPY (\w+)/ /app/\1/$", dockerfile, re.M)
    assert image in copied, f"Dockerfile.{image} does not copy {image}/ into /app"
    for directory in copied:
        shutil.copytree(REPO / directory, app / directory, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({image!r})\n"
        f"names = [m.name for m in pkgutil.walk_packages(pkg.__path__, {image + '.'!r})]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = subprocess.run(
        [str(env.python), "-I", "-c", f"import sys; sys.path.insert(0, {str(app)!r})\n" + script],
        cwd=app, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) >= 5
    help_run = subprocess.run(
        [str(env.python), "-m", image, "--help"], cwd=app, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(app), "PATH": str(env.python.parent)},
    )  # fmt: skip
    assert help_run.returncode == 0, help_run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# e2e/kind.sh builds and loads what the manifests run

KIND = REPO / "e2e" / "kind.sh"


def test_kind_script_is_shellcheck_clean(require_tool: Callable[[str, str], str]) -> None:
    shellcheck = require_tool("shellcheck", "apt-get install shellcheck")
    result = subprocess.run([shellcheck, str(KIND)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_kind_script_is_strict_bash() -> None:
    text = KIND.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(KIND)], timeout=30).returncode == 0


def test_kind_script_builds_and_loads_every_image_the_manifests_run() -> None:
    text = KIND.read_text()
    version = re.search(r'^VERSION="([^"]+)"', text, re.M)
    assert version
    built = {
        value.replace("${VERSION}", version.group(1))
        for value in re.findall(r'^\w+_IMAGE="([^"]+)"', text, re.M)
    }
    injector = yaml.safe_load(
        yaml.safe_load((REPO / "manifests" / "injector-config.yaml").read_text())["data"]["config.yaml"]
    )
    used = {injector["image"], str(webhook_deployment_container()["image"])}
    for path in (REPO / "manifests" / "examples").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "Job"):
                used |= {c["image"] for c in doc["spec"]["template"]["spec"]["containers"]}
    assert used <= built
    assert "kind load docker-image" in text
    assert "-m webhook install --namespaces default | kubectl apply -f -" in text


def test_kind_script_builds_the_proxy_and_webhook_from_their_dockerfiles() -> None:
    text = KIND.read_text()
    assert 'docker build -f Dockerfile.sidecar -t "$PROXY_IMAGE" .' in text
    assert 'docker build -f Dockerfile.webhook -t "$WEBHOOK_IMAGE" .' in text
