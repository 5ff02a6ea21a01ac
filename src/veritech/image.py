"""Build the cyclone container image on a host that cannot pull base images.

The docker backend runs every instance from a cyclone image. Users with
internet access build it from ``docker/cyclone/Dockerfile``; this module builds
the same image where no registry is reachable, from parts the host can make:

1. a minimal Debian bookworm root file system, made with ``debootstrap`` from
   the mirror the host's apt already uses, imported as a base image and cached
   under a tag derived from its recipe, so it is made once per host;
2. the project's wheel and the wheels of all its dependencies, fetched on the
   host for CPython 3.11 on manylinux (bookworm's python3 is 3.11, so they fit);
3. ``docker build --network none`` of a generated Dockerfile on that base: a
   virtual environment with the wheels installed, a non-root user, and
   ``cyclone serve`` as the entry point.

Everything goes through the docker CLI: building is a one-off, blocking job
whose output is best read as the CLI prints it (logged at DEBUG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import veritech
from veritech.errors import VeritechError

logger = logging.getLogger("veritech.image")

DEFAULT_IMAGE = "veritech/cyclone"
DEFAULT_TAG = veritech.__version__
BASE_IMAGE = "veritech/bookworm-base"

SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
# python3-venv brings ensurepip, so the venv can install wheels without network.
# No ca-certificates: nothing in the container may open a network connection.
BASE_PACKAGES = ("python3", "python3-venv")
# Bump when the base recipe changes in a way the inputs above do not show.
BASE_RECIPE_VERSION = 1

CYCLONE_UID = 10001
VENV = "/opt/cyclone"
# Oldest glibc the manylinux wheels may ask for is the one bookworm ships.
BOOKWORM_GLIBC_MINOR = 36

# Parts of the debootstrapped tree that a cyclone never reads: apt's caches,
# documentation, and what Docker replaces at run time anyway.
_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)
_RUNTIME_FILES = ("etc/hostname", "etc/resolv.conf", "etc/hosts")

_TAIL_LINES = 30
# Marks the throw-away first build stage, which the classic builder keeps as
# an untagged image; pruned by this label after every build.
_STAGE_LABEL = "veritech.build-stage"


class ImageBuildError(VeritechError):
    """A step of the image build failed; ``step`` names it, ``output`` ends it."""

    def __init__(self, step: str, message: str, output: str = "") -> None:
        super().__init__(f"{step}: {message}" + (f"\n{output}" if output else ""))
        self.step = step
        self.output = output


def image_exists(ref: str) -> bool:
    """Whether the local Docker engine has an image called ``ref``."""
    return _image_id(ref) is not None


def _image_id(ref: str) -> str | None:
    result = subprocess.run(
        [_docker(), "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def build_image(tag: str | None = None, *, rebuild_base: bool = False) -> str:
    """Build the cyclone image without pulling anything; return its reference.

    ``tag`` is a full reference (``name:tag``), a bare tag for ``DEFAULT_IMAGE``,
    or None for ``DEFAULT_IMAGE:DEFAULT_TAG``. The base image is reused when
    present unless ``rebuild_base`` is set.
    """
    ref = _reference(tag)
    started = time.monotonic()
    logger.info("building %s", ref)

    # 1. The base image: made once per host, then reused.
    base = ensure_base_image(rebuild=rebuild_base)
    previous = _image_id(ref)

    with tempfile.TemporaryDirectory(prefix="veritech-image-") as scratch:
        context = Path(scratch)

        # 2. Wheels of the project and everything it needs, fetched on the host.
        wheels = context / "wheels"
        _collect_wheels(_project_root(), wheels)

        # 3. The image itself, built with no network at all.
        (context / "Dockerfile").write_text(_cyclone_dockerfile(base))
        logger.info("building image %s from %s", ref, base)
        _run(
            "docker build",
            [
                _docker(),
                "build",
                "--network",
                "none",
                "--force-rm",
                "--label",
                "org.opencontainers.image.title=cyclone",
                "--label",
                f"org.opencontainers.image.version={veritech.__version__}",
                "--label",
                f"veritech.base-image={base}",
                "--tag",
                ref,
                str(context),
            ],
            # The classic builder: it needs no buildx plugin and honours
            # --network none for every RUN step.
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )

    # 4. Drop what the build left behind: the install stage's image (wheels
    #    and pip, ~200 MB) and the image this tag named before, unless a
    #    container still uses it (then docker refuses and it stays).
    if previous is not None and previous != _image_id(ref):
        logger.info("removing the previous %s (%s)", ref, previous[:19])
        subprocess.run(
            [_docker(), "image", "rm", previous], capture_output=True, check=False
        )
    _run(
        "docker image prune",
        [_docker(), "image", "prune", "--force", "--filter", f"label={_STAGE_LABEL}"],
    )

    logger.info("built %s in %.0f s", ref, time.monotonic() - started)
    return ref


def ensure_base_image(*, rebuild: bool = False) -> str:
    """Return the bookworm base image, debootstrapping it if it is missing."""
    ref = f"{BASE_IMAGE}:{base_tag()}"
    if not rebuild and image_exists(ref):
        logger.info("reusing base image %s", ref)
        return ref
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap", "making the base image needs root")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap", "debootstrap is not installed")

    mirror = apt_mirror()
    started = time.monotonic()
    logger.info("making base image %s from %s (a few minutes)", ref, mirror)
    with tempfile.TemporaryDirectory(prefix="veritech-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"

        # 1. A minimal Debian with python3 and nothing the image does not use.
        _run(
            "debootstrap",
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
        )
        _prune_rootfs(rootfs)

        # 2. Packed with numeric owners so host user names cannot leak in.
        tarball = Path(scratch) / "rootfs.tar"
        _run(
            "tar",
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
        )

        # 3. Imported as an image with the usual Debian defaults.
        _run(
            "docker import",
            [
                _docker(),
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["/bin/bash"]',
                "--message",
                f"debootstrap --variant=minbase {SUITE} from {mirror}",
                str(tarball),
                ref,
            ],
        )
    logger.info("made base image %s in %.0f s", ref, time.monotonic() - started)
    return ref


def base_tag() -> str:
    """Tag of the base image: a digest of its recipe, so a change rebuilds it."""
    recipe = {
        "suite": SUITE,
        "variant": "minbase",
        "packages": sorted(BASE_PACKAGES),
        "prune": list(_PRUNE),
        "version": BASE_RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    return f"{SUITE}-{digest.hexdigest()[:12]}"


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt uses for bookworm, or Debian's own."""
    for uri, suites in _apt_sources(etc_apt):
        if SUITE in suites and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    logger.info("no %s mirror in %s; using %s", SUITE, etc_apt, FALLBACK_MIRROR)
    return FALLBACK_MIRROR


def _apt_sources(etc_apt: Path) -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) of every enabled binary source, one-line and deb822 style."""
    files = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.glob("*.list")) + sorted(parts.glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            yield from _deb822_sources(text)
        else:
            yield from _one_line_sources(text)


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    for line in text.splitlines():
        # deb [arch=amd64 signed-by=...] URI SUITE COMPONENT...
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]


def _deb822_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            yield uri, suites


def _prune_rootfs(rootfs: Path) -> None:
    for relative in _PRUNE:
        directory = rootfs / relative
        if directory.is_dir():
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    # Docker mounts its own /dev, /proc, /sys and these files into a container.
    for relative in ("dev", "proc", "sys"):
        for child in (rootfs / relative).iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for relative in _RUNTIME_FILES:
        (rootfs / relative).unlink(missing_ok=True)


def _collect_wheels(project: Path, wheels: Path) -> None:
    """Put the project's wheel and all its dependencies' wheels into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

    # 1. The project itself, from the source tree.
    logger.info("building the veritech wheel from %s", project)
    _run("pip wheel", [*pip, "wheel", "--no-deps", "-w", str(wheels), str(project)])
    built = sorted(wheels.glob("veritech-*.whl"))
    if not built:
        raise ImageBuildError("pip wheel", f"no veritech wheel in {wheels}")

    # 2. Its dependencies, for the container's interpreter and libc rather than
    #    the host's: binary only, so nothing is compiled against host libraries.
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 37)]
    platforms += [f"manylinux2014_{arch}", f"manylinux2010_{arch}"]
    platforms += [f"manylinux1_{arch}"]
    logger.info("downloading dependency wheels for cp311 %s", arch)
    _run(
        "pip download",
        [
            *pip,
            "download",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--abi",
            "abi3",
            "--abi",
            "none",
            *[arg for name in platforms for arg in ("--platform", name)],
            "-d",
            str(wheels),
            str(built[-1]),
        ],
    )


def _cyclone_dockerfile(base: str) -> str:
    # Two stages: the wheels and pip itself stay in the first, so the image
    # holds only the installed environment. The nats-server binary that a
    # dependency of the veritech package ships is never started by cyclone.
    return f"""\
# Generated by veritech.image; see docs/image.md.
FROM {base} AS install
LABEL {_STAGE_LABEL}=install
COPY wheels /wheels
RUN python3 -m venv {VENV} \\
 && {VENV}/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /wheels veritech=={veritech.__version__} \\
 && {VENV}/bin/pip uninstall --yes --quiet pip setuptools \\
 && rm -f {VENV}/bin/nats-server

FROM {base}
COPY --from=install {VENV} {VENV}
RUN echo 'cyclone:x:{CYCLONE_UID}:{CYCLONE_UID}:cyclone:/tmp:/usr/sbin/nologin' \\
      >> /etc/passwd \\
 && echo 'cyclone:x:{CYCLONE_UID}:' >> /etc/group
ENV PATH={VENV}/bin:/usr/local/bin:/usr/bin:/bin \\
    HOME=/tmp \\
    LANG=C.UTF-8 \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1
USER {CYCLONE_UID}:{CYCLONE_UID}
WORKDIR /tmp
ENTRYPOINT ["cyclone", "serve"]
"""


def _reference(tag: str | None) -> str:
    if tag is None:
        return f"{DEFAULT_IMAGE}:{DEFAULT_TAG}"
    # A colon after the last slash separates name and tag; a bare word is a tag.
    if ":" in tag.rpartition("/")[2] or "/" in tag:
        return tag
    return f"{DEFAULT_IMAGE}:{tag}"


def _project_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "veritech"' not in pyproject.read_text():
        raise ImageBuildError(
            "pip wheel",
            "building the image needs the veritech source tree "
            f"(no pyproject.toml at {root}); run it from a checkout",
        )
    return root


def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise ImageBuildError("docker", "the docker CLI is not on PATH")
    return docker


def _run(step: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
    """Run one build command, its output logged at DEBUG; raise on failure."""
    logger.debug("running %s", " ".join(argv))
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            text = line.rstrip()
            tail.append(text)
            logger.debug("%s: %s", step, text)
    if process.returncode != 0:
        raise ImageBuildError(
            step, f"exited with code {process.returncode}", "\n".join(tail)
        )
