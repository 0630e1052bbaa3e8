"""Fixtures that build the image and run the real compose stack with podman (see tests/containers/README.md).

Engine: rootful podman, driven by docker-compose through podman's Docker-compatible socket. Podman does
not run healthchecks by itself here (no systemd timers), so the fixtures run the container's real
healthcheck with ``podman healthcheck run`` in a bounded loop.

Everything is torn down at the end, also on failure: ``docker-compose down -v`` for the project and the
podman API service stopped by the pid this module started. Every command has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = "gradcheck-ci"
IMAGE = "localhost/gradcheck-svc:latest"
DEPS_IMAGE = "localhost/gradcheck-svc-deps:cache"  # keeps the torch + dependencies layer cached
TESTS_IMAGE = "localhost/gradcheck-svc-tests:latest"
BASE_IMAGE = "localhost/gradcheck-base:bookworm"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'
PROFILES = ("--profile", "replicas", "--profile", "tests", "--profile", "gpu")

# Bounds, in seconds.
BUILD_TIMEOUT = 900  # a cold build: base ~1 min, torch + deps ~2-3 min
HEALTHY_TIMEOUT = 120
COMMAND_TIMEOUT = 180

TIMINGS: dict[str, float] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """No container engine: a failure in CI (never a silent skip there), a skip elsewhere."""
    if _in_ci():
        pytest.fail(f"container test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[phase] = TIMINGS.get(phase, 0.0) + time.monotonic() - start


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Engine:
    """Runs podman and docker-compose with the environment this machine needs."""

    env: dict[str, str]
    compose: list[str]
    workdir: Path
    log: Path
    host_port: int = 50051
    image: str = IMAGE
    profiles: tuple[str, ...] = PROFILES

    timed = staticmethod(timed)

    @staticmethod
    def json_line(text: str) -> dict[str, Any]:
        """The last line of ``text`` that is a JSON object."""
        for line in reversed(text.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no JSON line in output:\n{_tail(text)}")

    def run(
        self,
        cmd: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
        try:
            proc = subprocess.run(
                list(cmd),
                env=self.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
        with self.log.open("a") as log:
            log.write(proc.stdout + proc.stderr + f"[exit {proc.returncode}]\n")
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{_tail(proc.stdout)}\n"
                f"--- stderr\n{_tail(proc.stderr)}"
            )
        return proc

    def podman(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], **kw)  # type: ignore[arg-type]

    def dc(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run([*self.compose, "-f", str(COMPOSE_FILE), "-p", PROJECT, *args], **kw)  # type: ignore[arg-type]

    def container_ids(self, service: str) -> list[str]:
        out = self.dc("ps", "-q", service).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def inspect(self, container: str, template: str) -> str:
        return self.podman("inspect", "--format", template, container).stdout.strip()

    def hostname(self, container: str) -> str:
        return self.inspect(container, "{{.Config.Hostname}}")

    def wait_healthy(self, service: str, count: int = 1, timeout: float = HEALTHY_TIMEOUT) -> list[str]:
        """Run each container's own healthcheck until all of ``count`` are healthy; return their ids."""
        deadline = time.monotonic() + timeout
        healthy: set[str] = set()
        last = ""
        while True:
            ids = self.container_ids(service)
            for cid in ids:
                if cid in healthy:
                    continue
                state = self.inspect(cid, "{{.State.Status}}")
                if state not in ("running", "created", "configured", "initialized"):
                    logs = self.podman("logs", "--tail", "80", cid, check=False)
                    raise AssertionError(
                        f"{service} container {cid[:12]} is {state}, not running\n"
                        f"{_tail(logs.stdout + logs.stderr)}"
                    )
                probe = self.podman("healthcheck", "run", cid, check=False, timeout=60)
                last = (probe.stdout + probe.stderr).strip()
                if probe.returncode == 0:
                    healthy.add(cid)
            if len(ids) >= count and healthy.issuperset(ids):
                return ids
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{service}: {len(healthy)} of {count} container(s) healthy after {timeout:.0f} s; "
                    f"last healthcheck said: {last!r}"
                )
            time.sleep(2)

    def published(self, service: str, index: int) -> tuple[str, int]:
        """The host address of container ``index`` (1-based) of ``service``'s port 50051."""
        out = self.dc("port", f"--index={index}", service, "50051").stdout.strip()
        host, _, port = out.rpartition(":")
        host = host if host not in ("", "0.0.0.0", "::", "[::]") else "127.0.0.1"
        return host, int(port)


# ----------------------------------------------------------------------------- the machine


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def debian_mirror(sources: Path = DEBIAN_SOURCES) -> tuple[str, str]:
    """(mirror URI, suite) of the machine's main Debian archive, from its deb822 sources file."""
    if not sources.is_file():
        raise FileNotFoundError(f"{sources} not found: cannot tell which Debian mirror to bootstrap from")
    for stanza in re.split(r"\n\s*\n", sources.read_text()):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        suites = fields.get("suites", "").split()
        uris = fields.get("uris", "").split()
        if "deb" in fields.get("types", "deb").split() and uris and suites:
            plain = [s for s in suites if "-" not in s and "/" not in s]
            if plain:
                return uris[0], plain[0]
    raise ValueError(f"{sources}: no 'deb' stanza with a plain suite (such as bookworm)")


def find_links() -> Path | None:
    """The local wheel folder pip is configured with (``pip config list``: find-links), if any."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    candidates = []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith(".find-links"):
            candidates.extend(value.strip().strip("'\"").split())
    if os.environ.get("PIP_FIND_LINKS"):
        candidates.extend(os.environ["PIP_FIND_LINKS"].split())
    for candidate in candidates:
        path = Path(candidate.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-*.whl")):
            return path
    return None


def torch_spec(wheels: Path) -> str:
    """``torch==<version>`` of the CPython 3.11 Linux torch wheel in ``wheels`` (the base's Python)."""
    for wheel in sorted(wheels.glob("torch-*-cp311-*linux*x86_64.whl")):
        return f"torch=={wheel.name.split('-')[1]}"
    raise AssertionError(f"{wheels} holds no CPython 3.11 x86_64 Linux torch wheel")


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise AssertionError("no free TCP port")


def _unmount_below(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def build_base_image(engine: Engine) -> None:
    """A minimal Debian with python3 + venv, bootstrapped from this machine's own mirror."""
    if engine.podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        unavailable("debootstrap is not installed (apt-get install debootstrap)")
    mirror, suite = debian_mirror()
    rootfs = engine.workdir / "rootfs"
    try:
        engine.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip",
                suite,
                str(rootfs),
                mirror,
            ],
            timeout=600,
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        archive = engine.workdir / "rootfs.tar"
        engine.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], timeout=300)
        engine.podman("import", str(archive), BASE_IMAGE, timeout=300)
        archive.unlink()
    finally:
        _unmount_below(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)


def build_images(engine: Engine, base: str, wheels: Path | None) -> None:
    args = [
        "build",
        "--format",
        "docker",
        "--network=host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-f",
        str(ROOT / "Dockerfile"),
    ]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        args += ["-v", f"{ca}:{ca}:ro"]
    if wheels is not None:
        args += [
            "-v",
            f"{wheels}:/wheels:ro",
            "--build-arg",
            "PIP_FIND_LINKS=/wheels",
            "--build-arg",
            f"TORCH_SPEC={torch_spec(wheels)}",
        ]
    for name in ("TORCH_SPEC", "TORCH_INDEX_URL"):
        if os.environ.get(f"GRADCHECK_{name}"):
            args += ["--build-arg", f"{name}={os.environ[f'GRADCHECK_{name}']}"]
    for target, tag in (("deps", DEPS_IMAGE), ("runtime", IMAGE), ("tests", TESTS_IMAGE)):
        engine.podman(*args, "--target", target, "-t", tag, str(ROOT), timeout=BUILD_TIMEOUT)
    # Drop what earlier builds of this Dockerfile left untagged (only images carrying its stage label).
    engine.podman("image", "prune", "-f", "--filter", "label=io.gradcheck-svc.stage", check=False)


@contextlib.contextmanager
def podman_service(engine: Engine) -> Iterator[None]:
    """``podman system service`` on a private socket; compose talks to it as DOCKER_HOST."""
    sock = engine.workdir / "podman.sock"
    with (engine.workdir / "podman-service.log").open("w") as out:
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            env=engine.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state = os.environ.get("GRADCHECK_CONTAINERS_STATE")
    if state:  # lets .ci/containers.sh stop it even if this process is killed
        Path(state, "podman-service.pid").write_text(str(proc.pid))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "podman system service did not start:\n"
                    + (engine.workdir / "podman-service.log").read_text()[-3000:]
                )
            time.sleep(0.2)
        engine.env["DOCKER_HOST"] = f"unix://{sock}"
        yield
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # stop exactly the service this fixture started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    missing = [tool for tool in ("podman",) if not shutil.which(tool)]
    compose = _compose_command()
    if compose is None:
        missing.append("docker-compose")
    if missing:
        unavailable(f"{' and '.join(missing)} not installed (apt-get install podman docker-compose)")
    if os.geteuid() != 0:
        unavailable("the container test runs rootful podman and needs root")
    assert compose is not None
    workdir = tmp_path_factory.mktemp("containers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    if not env.get("CONTAINERS_CONF"):
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    port = _free_port(50051)
    env.update(
        GRADCHECK_IMAGE=IMAGE,
        GRADCHECK_TESTS_IMAGE=TESTS_IMAGE,
        GRADCHECK_HOST_PORT=str(port),
        GRADCHECK_TEST_TARGET="server:50051",
        COMPOSE_HTTP_TIMEOUT="120",
    )
    for name in ("GRADCHECK_SERVER", "GRADCHECK_DEVICE"):
        env.pop(name, None)
    log = Path(os.environ.get("GRADCHECK_CONTAINERS_LOG") or workdir / "commands.log")
    log.write_text("")
    print(f"container test: commands and their output in {log}", file=sys.stderr)
    return Engine(env=env, compose=compose, workdir=workdir, log=log, host_port=port)


@pytest.fixture(scope="session")
def images(engine: Engine) -> str:
    """Build the runtime and tests images; return the runtime image's name."""
    base = os.environ.get("GRADCHECK_BASE_IMAGE", "")
    if not base:
        with timed("base image (debootstrap, cached after the first run)"):
            build_base_image(engine)
        base = BASE_IMAGE
    wheels = find_links()
    if wheels is None and not os.environ.get("GRADCHECK_TORCH_INDEX_URL"):
        unavailable("no local torch wheel folder (pip's find-links) and no $GRADCHECK_TORCH_INDEX_URL")
    with timed("image build (runtime + tests targets)"):
        build_images(engine, base, wheels)
    return IMAGE


@pytest.fixture(scope="session")
def stack(engine: Engine, images: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The compose project up with a healthy `server`; torn down afterwards whatever happened."""
    with podman_service(engine):
        try:
            engine.dc(*PROFILES, "down", "-v", "--remove-orphans", "--timeout", "5", check=False)
            with timed("compose up server + healthy"):
                engine.dc("up", "-d", "--no-build", "server")
                engine.wait_healthy("server")
            yield engine
        finally:
            with timed("compose down"):
                failed = request.session.testsfailed > 0
                if failed:
                    logs = engine.dc(*PROFILES, "logs", "--no-color", "--tail", "40", check=False)
                    print(f"--- compose logs\n{_tail(logs.stdout + logs.stderr, 200)}", file=sys.stderr)
                engine.dc(*PROFILES, "down", "-v", "--remove-orphans", "--timeout", "10", check=False)
                left = engine.podman(
                    "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "-q", check=False
                ).stdout.split()
                if left:
                    engine.podman("rm", "-f", *left, check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.write_sep("=", "container test timings")
    for phase, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{seconds:8.1f} s  {phase}")
