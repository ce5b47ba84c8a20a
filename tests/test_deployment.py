"""The deployment files agree with the project: docker-compose.yml, the Dockerfiles and .dockerignore.

No docker engine is needed: the files are parsed and every path, setting name, port, route and module they
refer to is checked against the code (``service.settings.Settings``, the app's routes, ``__main__`` modules).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

from service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SERVICE_DOCKERFILE = ROOT / "docker" / "service.Dockerfile"
TRAINER_DOCKERFILE = ROOT / "docker" / "trainer.Dockerfile"
ENV_PREFIX = Settings.model_config["env_prefix"]
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# ----------------------------------------------------------------------------------------------- parsing


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        out = cls(path)
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            keyword, _, rest = line.partition(" ")
            out.instructions.append((keyword.upper(), rest.strip()))
        assert not pending, f"{path.name} ends inside a continued line"
        return out

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{self.path.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            words = shlex.split(rest)
            if words and "=" not in words[0]:  # legacy form: ENV NAME value
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(word.split("=", 1) for word in words)
        return env

    def copies(self) -> list[tuple[list[str], str]]:
        """``(sources, destination)`` of each COPY/ADD from the build context (not ``--from`` a stage)."""
        result = []
        for rest in self.all("COPY") + self.all("ADD"):
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            result.append((words[:-1], words[-1]))
        return result

    def workdir(self) -> str:
        return self.last("WORKDIR")


def exec_form(rest: str) -> list[str]:
    """The argv of an exec-form (JSON) or shell-form instruction argument."""
    return json.loads(rest) if rest.lstrip().startswith("[") else shlex.split(rest)


def healthcheck_cmd(rest: str) -> list[str]:
    """The command of ``HEALTHCHECK [OPTIONS] CMD ...``."""
    _, sep, command = rest.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {rest}"
    return exec_form(command)


def probe_url(argv: list[str]) -> str:
    """The URL a healthcheck command fetches."""
    urls = re.findall(r"https?://[^\s'\"]+", " ".join(argv))
    assert len(urls) == 1, f"expected one URL in the healthcheck {argv}"
    return urls[0]


def python_module(argv: list[str]) -> str:
    """``python -m MODULE ...`` -> ``MODULE``."""
    assert argv[0] in ("python", "python3") and argv[1] == "-m", f"expected python -m MODULE, got {argv}"
    return argv[2]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def interpolate(value: object) -> object:
    """A compose value with ``${NAME:-default}`` replaced by its default (what runs with nothing set)."""
    if not isinstance(value, str):
        return value
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def setting_env_names() -> set[str]:
    return {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}


def module_exists(module: str) -> bool:
    """Whether ``python -m module`` finds code in the project (a package's ``__main__`` or a module)."""
    base = ROOT.joinpath(*module.split("."))
    return (base / "__main__.py").is_file() or base.with_suffix(".py").is_file()


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops ``path`` (or a folder above it) from the build context (last rule wins)."""
    path = path.strip("/").removeprefix("./")
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern.replace("**/", "")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            result = not negate
    return result


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def segmenter(compose) -> dict:
    return compose["services"]["segmenter"]


@pytest.fixture(scope="module")
def service_df() -> Dockerfile:
    return Dockerfile.parse(SERVICE_DOCKERFILE)


@pytest.fixture(scope="module")
def trainer_df() -> Dockerfile:
    return Dockerfile.parse(TRAINER_DOCKERFILE)


def compose_env(spec: dict) -> dict[str, object]:
    env = spec.get("environment") or {}
    if isinstance(env, list):  # - NAME=value / - NAME (passed through)
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


# ------------------------------------------------------------------------------------------ Dockerfiles


class TestDockerfiles:
    @pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, TRAINER_DOCKERFILE], ids=lambda p: p.name)
    def test_copied_paths_exist_and_reach_the_build_context(self, path):
        patterns = dockerignore_patterns()
        copies = Dockerfile.parse(path).copies()
        assert copies
        for sources, _ in copies:
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies {source}, which the project lacks"
                assert not ignored(source, patterns), f"{path.name} copies {source}, which .dockerignore drops"

    @pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, TRAINER_DOCKERFILE], ids=lambda p: p.name)
    def test_runs_as_a_non_root_user(self, path):
        user = Dockerfile.parse(path).last("USER").split(":")[0]
        assert user not in ("root", "0")

    @pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, TRAINER_DOCKERFILE], ids=lambda p: p.name)
    def test_env_names_are_real_settings(self, path):
        env = Dockerfile.parse(path).env()
        ours = {name for name in env if name.startswith(ENV_PREFIX)}
        assert ours <= setting_env_names(), f"unknown settings: {sorted(ours - setting_env_names())}"

    def test_service_image_env_values_are_valid_settings(self, service_df, monkeypatch):
        for name, value in service_df.env().items():
            if name.startswith(ENV_PREFIX):
                monkeypatch.setenv(name, value)
        settings = Settings()
        assert str(settings.models_dir) == service_df.env()["BRATS_MODELS_DIR"]

    def test_service_image_ships_the_models_where_the_settings_look(self, service_df):
        models_dir = service_df.env()["BRATS_MODELS_DIR"]
        workdir = service_df.workdir()
        destinations = {
            str(Path(workdir, dest)) if not dest.startswith("/") else dest.rstrip("/")
            for sources, dest in service_df.copies()
            if sources == ["models"]
        }
        assert destinations == {models_dir}

    def test_service_image_is_cuda12_with_cudnn_and_onnxruntime_gpu(self, service_df):
        base = service_df.last("FROM")
        assert re.match(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn[0-9]*-runtime-", base), base
        assert "onnxruntime-gpu" in " ".join(service_df.all("RUN"))

    def test_service_cmd_port_matches_expose_and_healthcheck(self, service_df):
        cmd = exec_form(service_df.last("CMD"))
        assert python_module(cmd) == "service" and module_exists("service")
        assert option(cmd, "--host") == "0.0.0.0"
        port = option(cmd, "--port")
        assert service_df.last("EXPOSE").split("/")[0] == port
        url = urlsplit(probe_url(healthcheck_cmd(service_df.last("HEALTHCHECK"))))
        assert url.hostname in ("127.0.0.1", "localhost") and str(url.port) == port
        assert url.path == "/readyz"

    def test_healthcheck_needs_only_python(self, service_df):
        argv = healthcheck_cmd(service_df.last("HEALTHCHECK"))
        assert argv[0] == "python" and "urllib.request" in argv[-1]
        compile(argv[-1], "<healthcheck>", "exec")

    def test_trainer_entrypoint_module_exists(self, trainer_df):
        assert python_module(exec_form(trainer_df.last("ENTRYPOINT"))) == "training"
        assert module_exists("training")


# ------------------------------------------------------------------------------- the service image's security


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (``a && b; c | d``), each as its argv (quotes respected)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def pip_installs(df: Dockerfile) -> list[list[str]]:
    """The arguments after ``pip install`` of every pip install in ``df``'s RUN lines."""
    found = []
    for run in df.all("RUN"):
        for argv in shell_commands(run):
            words = argv[2:] if argv[:2] == ["python", "-m"] else argv
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


class TestServiceImageSecurity:
    def test_runs_as_a_numeric_non_root_user_that_the_image_creates(self, service_df):
        # numeric, so that the runtime (Kubernetes runAsNonRoot, docker --user checks) can tell it is not root
        uid, _, gid = service_df.last("USER").partition(":")
        assert uid.isdigit() and int(uid) != 0, f"USER {uid} is not a numeric non-root uid"
        assert not gid or (gid.isdigit() and int(gid) != 0)
        created = [argv for run in service_df.all("RUN") for argv in shell_commands(run) if argv[0] == "useradd"]
        assert any(option(argv, "--uid") == uid for argv in created), f"no useradd --uid {uid}"
        keywords = [kw for kw, _ in service_df.instructions]
        last_user = max(i for i, kw in enumerate(keywords) if kw == "USER")
        assert last_user > max(i for i, kw in enumerate(keywords) if kw == "FROM"), "the final stage sets its user"

    def test_models_belong_to_root_and_are_read_only(self, service_df):
        models_dir = service_df.env()["BRATS_MODELS_DIR"]
        kinds = [kw for kw, _ in service_df.instructions]
        copy_at = [
            i for i, (kw, rest) in enumerate(service_df.instructions)
            if kw in ("COPY", "ADD") and shlex.split(rest)[-2:-1] == ["models"]
        ]
        assert len(copy_at) == 1, "the models are copied once"
        flags = [w for w in shlex.split(service_df.instructions[copy_at[0]][1]) if w.startswith("--")]
        assert not any(f.startswith(("--chown", "--chmod")) for f in flags), f"models copied with {flags}"
        user_at = kinds.index("USER")
        assert copy_at[0] < user_at, "the models are copied before the image switches to its user"
        read_only = [
            i for i, (kw, rest) in enumerate(service_df.instructions)
            if kw == "RUN" and any(
                argv[:3] == ["chmod", "-R", "a-w"] and models_dir in argv[3:] for argv in shell_commands(rest)
            )
        ]
        assert read_only and copy_at[0] < read_only[0] < user_at, f"no chmod -R a-w {models_dir} before USER"
        for run in service_df.all("RUN"):
            for argv in shell_commands(run):
                assert argv[0] != "chown", f"RUN {run}: nothing in the image changes owner"

    def test_compose_mounts_the_models_read_only_on_a_read_only_container(self, segmenter):
        assert segmenter["read_only"] is True
        models_dir = compose_env(segmenter)["BRATS_MODELS_DIR"]
        modes = {v.split(":")[1]: v.split(":")[2:] for v in segmenter["volumes"] if isinstance(v, str)}
        assert modes[models_dir] == ["ro"]
        assert str(segmenter.get("user", "10001")).split(":")[0] not in ("0", "root")
        assert not segmenter.get("privileged", False)

    def test_installs_the_locked_versions_and_nothing_else(self, service_df):
        lock = "requirements/service.txt"
        assert any(lock in sources for sources, _ in service_df.copies()), f"the image does not copy {lock}"
        installs = pip_installs(service_df)
        assert installs, "the image installs nothing"
        for args in installs:
            # every install is a requirements file (exact pins) or the project without dependencies
            assert "-r" in args or "--no-deps" in args, f"pip install {' '.join(args)} resolves versions freely"
        project = [args for args in installs if "." in args]
        assert project and all("--no-deps" in args for args in project)
        assert all(not a.startswith(("-e", "--upgrade", "-U")) for args in installs for a in args)

    def test_onnxruntime_gpu_is_exactly_the_locked_onnxruntime(self, service_df, tmp_path):
        """Run the image's own commands that derive its requirements from the lock, and read what they make."""
        (tmp_path / "requirements").mkdir()
        lock = ROOT / "requirements" / "service.txt"
        (tmp_path / "requirements" / "service.txt").write_bytes(lock.read_bytes())
        [run] = [r for r in service_df.all("RUN") if "requirements/service.txt" in r]
        commands = [c.strip() for c in run.split("&&")]
        installs = [c for c in commands if c.startswith("pip install")]
        assert len(installs) == 1
        prepare = [c for c in commands[: commands.index(installs[0])]]
        script = " && ".join(prepare).replace("/tmp/", f"{tmp_path}/")
        subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=30)
        installed = Path(option(shlex.split(installs[0]), "-r").replace("/tmp/", f"{tmp_path}/"))
        pins = read_pins(installed if installed.is_absolute() else tmp_path / installed)
        locked = read_pins(lock)
        assert "onnxruntime" not in pins
        assert pins.pop("onnxruntime-gpu") == locked.pop("onnxruntime")
        assert pins == locked


# ---------------------------------------------------------------------------------------------- lock files


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file -> {normalised name: version}; anything else fails."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin name==version"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in pins, f"{path.name} pins {name} twice"
        pins[name] = match.group(2)
    return pins


def project_requirements(*extras: str) -> list:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return [Requirement(spec) for spec in specs]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


LOCKS = {
    "requirements/lock.txt": ("service", "train", "dev"),
    "requirements/service.txt": ("service",),
}


class TestLocks:
    @pytest.mark.parametrize("path", list(LOCKS))
    def test_says_how_it_is_regenerated(self, path):
        lines = (ROOT / path).read_text().splitlines()
        header = " ".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])
        assert lines[0].startswith("#") and "make lock" in header

    @pytest.mark.parametrize("path, extras", list(LOCKS.items()))
    def test_pins_every_declared_dependency_within_its_range(self, path, extras):
        pins = read_pins(ROOT / path)
        for requirement in project_requirements(*extras):
            name = normalised(requirement.name)
            assert name in pins, f"{path} lacks {requirement.name}"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{path} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
            )

    @pytest.mark.parametrize("path", list(LOCKS))
    def test_closed_under_the_installed_dependency_metadata(self, path):
        """Every dependency of every pinned package (as the installed copy of that version declares it) is
        pinned too: nothing is left for pip to choose."""
        from importlib import metadata

        from packaging.requirements import Requirement

        pins = read_pins(ROOT / path)
        checked = 0
        for name, version in pins.items():
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            if dist.version != version:
                continue
            checked += 1
            for spec in dist.requires or []:
                requirement = Requirement(spec)
                if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                    continue
                assert normalised(requirement.name) in pins, f"{path}: {name} needs {requirement.name}, not pinned"
        assert checked >= len(pins) // 2, "the environment does not hold the locked versions; run make setup"

    def test_service_lock_is_the_tested_versions_without_training_or_dev_tools(self):
        service, full = read_pins(ROOT / "requirements/service.txt"), read_pins(ROOT / "requirements/lock.txt")
        for name, version in service.items():
            assert full.get(name) == version, f"the image would run {name} {version}, the tests {full.get(name)}"
        for name in ("torch", "monai", "onnx", "nilearn", "pytest", "pip-audit", "schemathesis"):
            assert name not in service, f"requirements/service.txt holds {name}, which the service does not need"
        assert "brats-seg" not in service and "brats-seg" not in full

    def test_every_pin_is_a_version_pypi_serves(self):
        """No local version label (2.13.0+cpu lives only on PyTorch's own index): a fresh machine with PyPI
        alone must resolve the lock (`make lock-check` resolves it for each Python the README names)."""
        for path in ("requirements/lock.txt", "requirements/service.txt"):
            pins = read_pins(ROOT / path)
            local = {name: version for name, version in pins.items() if "+" in version}
            assert not local, f"{path}: {local}"
        assert read_pins(ROOT / "requirements/lock.txt")["torch"] == "2.13.0"

    def test_the_pythons_named_are_the_ones_checked(self):
        makefile = (ROOT / "Makefile").read_text()
        pythons = re.search(r"^LOCK_PYTHONS\s*:=\s*(.+)$", makefile, re.M).group(1).split()
        lowest = min(pythons, key=lambda v: tuple(int(p) for p in v.split(".")))
        assert f'requires-python = ">={lowest}"' in (ROOT / "pyproject.toml").read_text()
        assert f"Python {lowest}+" in (ROOT / "README.md").read_text()

    def test_run_installs_only_what_the_service_needs(self):
        makefile = (ROOT / "Makefile").read_text()
        run = re.search(r"^run:(.*)$", makefile, re.M).group(1).split()
        assert run == ["service-setup"]
        assert "-c $(LOCK) -e '.[service]'" in re.search(
            r"^\$\(VENV\)/\.installed-service:.*?\n\n", makefile, re.M | re.S).group(0)

    def test_setup_installs_with_the_lock_as_constraints(self):
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(r"^LOCK\s*:=\s*requirements/lock\.txt$", makefile, re.M)
        stamp = re.search(r"^\$\(VENV\)/\.installed:(.*)$", makefile, re.M)
        assert stamp and "$(LOCK)" in stamp.group(1).split()
        assert "-c $(LOCK) -e '.[service,train,dev,bench]'" in makefile


# ------------------------------------------------------------------------------------------------ compose


class TestCompose:
    def test_build_files_exist(self, compose):
        for name, spec in compose["services"].items():
            if "build" not in spec:  # a published image (the PACS of the pacs profile)
                assert "image" in spec and ":" in spec["image"], f"{name}: neither build nor a pinned image"
                continue
            build = spec["build"]
            assert (ROOT / build["context"]).is_dir(), name
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name

    def test_segmenter_env_names_are_real_settings(self, segmenter):
        names = set(compose_env(segmenter))
        assert names and names <= setting_env_names(), f"unknown settings: {sorted(names - setting_env_names())}"

    def test_segmenter_env_defaults_are_valid_settings(self, segmenter, monkeypatch):
        for name in setting_env_names():
            monkeypatch.delenv(name, raising=False)
        for name, value in compose_env(segmenter).items():
            if value is not None:  # None: passed through from the host's shell
                monkeypatch.setenv(name, str(interpolate(value)))
        settings = Settings()
        assert settings.api_keys == []
        assert str(settings.tmp_dir) == "/tmp"

    def test_models_are_mounted_read_only_where_the_service_looks(self, segmenter):
        models_dir = compose_env(segmenter)["BRATS_MODELS_DIR"]
        mounts = [v.split(":") for v in segmenter["volumes"] if isinstance(v, str)]
        models = [m for m in mounts if m[1] == models_dir]
        assert len(models) == 1
        source, _, mode = models[0]
        assert (ROOT / source).resolve() == ROOT / "models" and (ROOT / source).is_dir()
        assert mode == "ro"

    def test_mount_sources_exist_or_are_generated_folders(self, compose):
        generated = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
        for name, spec in compose["services"].items():
            for volume in spec.get("volumes", []):
                source = volume.split(":")[0]
                if source in (compose.get("volumes") or {}):  # a named volume the compose file declares
                    continue
                assert source.startswith("./"), f"{name}: {volume} is not a bind mount of a project folder"
                folder = source.removeprefix("./").strip("/")
                assert (ROOT / folder).is_dir() or folder in generated, f"{name}: {source} is missing"

    def test_segmenter_command_port_healthcheck_agree_with_the_image(self, segmenter, service_df):
        command = segmenter.get("command")
        argv = exec_form(command) if isinstance(command, str) else command or exec_form(service_df.last("CMD"))
        assert python_module(argv) == "service" and module_exists("service")
        port = option(argv, "--port")
        assert [str(p) for p in segmenter["ports"]] == [f"127.0.0.1:{port}:{port}"]  # loopback by default
        test = segmenter["healthcheck"]["test"]
        assert test[0] == "CMD"
        assert probe_url(test[1:]) == probe_url(healthcheck_cmd(service_df.last("HEALTHCHECK")))

    def test_segmenter_runs_hardened_and_restarts(self, segmenter):
        assert segmenter["restart"] == "unless-stopped"
        assert segmenter["read_only"] is True
        tmpfs = [t.split(":")[0] for t in segmenter["tmpfs"]]
        assert "/tmp" in tmpfs
        assert compose_env(segmenter)["BRATS_TMP_DIR"] in tmpfs, "uploads must go to a writable tmpfs"
        assert "profiles" not in segmenter, "the service starts with a plain `docker compose up`"

    def test_segmenter_reserves_a_gpu(self, segmenter):
        devices = segmenter["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)

    def test_trainer_stays_behind_the_train_profile(self, compose, trainer_df):
        trainer = compose["services"]["trainer"]
        assert trainer["profiles"] == ["train"]
        assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
        argv = trainer.get("entrypoint") or exec_form(trainer_df.last("ENTRYPOINT"))
        assert python_module(argv) == "training" and module_exists("training")


# ---------------------------------------------------------------------------------------- the code side


def test_healthcheck_route_exists():
    from service.main import create_app

    app = create_app(Settings(models_dir=ROOT / "no-such-models"))
    paths = app.openapi()["paths"]
    assert {"/segment", "/models", "/metrics", "/healthz"} <= set(paths)
    assert "get" in paths["/readyz"]


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "no-models"])
def test_healthcheck_command_follows_readiness(tmp_path, ready):
    """The image's HEALTHCHECK command, pointed at a real server: healthy only once the models are loaded."""
    from tests.service.support import build_models, start_server

    models = build_models(tmp_path / "models") if ready else (tmp_path / "models")
    models.mkdir(exist_ok=True)
    argv = healthcheck_cmd(Dockerfile.parse(SERVICE_DOCKERFILE).last("HEALTHCHECK"))
    url = probe_url(argv)
    server = start_server(models, tmp_path)
    try:
        command = [sys.executable, *(a.replace(url, server.url + urlsplit(url).path) for a in argv[1:])]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    finally:
        server.stop()
    assert (result.returncode == 0) == ready, result.stderr


def test_service_module_takes_host_and_port():
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout


def test_dockerignore_keeps_secrets_and_data_out():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "data", "runs"):
        assert ignored(path, patterns), f".dockerignore should drop {path}"
    for path in ("pyproject.toml", "README.md", "service/client.py", "training/__main__.py", "models/unet.onnx"):
        assert not ignored(path, patterns), f".dockerignore drops {path}, which an image needs"


def test_dev_extra_has_pyyaml():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.lower().startswith("pyyaml") for dep in extras["dev"])
