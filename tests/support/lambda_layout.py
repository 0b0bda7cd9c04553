"""The Lambda Python runtime's view of a function, emulated on this machine.

In Lambda a function's handler is imported with its CodeUri directory first on sys.path
(/var/task), then the layers' python/ directories (/opt/python), then the runtime's own
packages (boto3, botocore, s3transfer) and the standard library. Here:

- `build_layers` builds both layers from the project's own definitions (the hashed lock,
  layers/deployhealth/Makefile) and emulates the runtime's SDK with copies of .venv's
  boto3, botocore and s3transfer;
- `invoke` runs one function in a fresh interpreter that sees exactly that path (no
  site-packages, no PYTHONPATH, no tests directory), imports its handler as Lambda does and
  calls it with events and a context;
- `unmet_requirements` checks that the distributions on that path satisfy each other's
  requirements as Lambda's Python 3.12 on arm64 would evaluate their markers.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "layers" / "dependencies" / "requirements.txt"
LIBRARY_MAKEFILE = ROOT / "layers" / "deployhealth" / "Makefile"

LAMBDA_PYTHON = "3.12"
# What Lambda's python3.12 runtime provides and the dependencies layer must not ship.
RUNTIME_SDK = ("boto3", "botocore", "s3transfer")
# PEP 508 marker values of the Lambda runtime the template names (python3.12, arm64).
LAMBDA_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.0",
    "os_name": "posix",
    "platform_machine": "aarch64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.0",
    "python_version": "3.12",
    "sys_platform": "linux",
}

BUILD_TIMEOUT = 600  # pip may have to download every wheel of the lock on a cold cache
MAKE_TIMEOUT = 300


def run(args: Sequence[str | Path], *, timeout: float, cwd: Path | None = None) -> str:
    """Run a build command; fail with its output. Returns its standard output."""
    command = [str(a) for a in args]
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(command)} took over {timeout} s:\n{exc.stderr}") from None
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done.stdout + done.stderr


def find_python(version: str) -> str | None:
    """An interpreter of this version that actually runs (a pyenv shim may not), or None."""
    pyenv = Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(str(p) for p in pyenv),
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ]
    for candidate in candidates:
        if not candidate or not Path(candidate).exists():
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


# --- the layers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    """The python/ directories of both layers and the emulated runtime SDK, as built."""

    library: Path
    dependencies: Path
    runtime: Path
    # The interpreter the library's bytecode was compiled with (None: no Python 3.12 here).
    bytecode_python: str | None
    make_output: str

    @property
    def path(self) -> list[Path]:
        """What Lambda puts on sys.path after the function's own directory, in order."""
        return [self.library, self.dependencies, self.runtime]


def build_layers(dest: Path) -> Layers:
    """Build both layers into `dest` as `sam build` would, and the emulated runtime SDK."""
    dependencies = dest / "dependencies" / "python"
    run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
            "--disable-pip-version-check", "--require-hashes", "-r", LOCK,
            "--target", dependencies,
        ],
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    # SAM copies the layer's ContentUri (src/) to a scratch directory and runs make there.
    scratch = dest / "library-scratch"
    shutil.copytree(ROOT / "src", scratch, ignore=shutil.ignore_patterns("*.egg-info"))
    artifacts = dest / "library"
    python = find_python(LAMBDA_PYTHON)
    make = ["make", "--no-print-directory", "-f", LIBRARY_MAKEFILE]
    make += ["build-DeployHealthLibraryLayer", f"ARTIFACTS_DIR={artifacts}"]
    if python is not None:
        make.append(f"LAYER_PYTHON={python}")
    output = run(make, cwd=scratch, timeout=MAKE_TIMEOUT)
    runtime = dest / "runtime"
    copy_runtime_sdk(runtime)
    return Layers(artifacts / "python", dependencies, runtime, python, output)


def copy_runtime_sdk(dest: Path) -> None:
    """Copies of this interpreter's boto3, botocore and s3transfer with their dist-info."""
    dest.mkdir(parents=True)
    for name in RUNTIME_SDK:
        dist = importlib.metadata.distribution(name)
        tops = {PurePath(str(f)).parts[0] for f in dist.files or ()}
        for top in sorted(tops - {"..", "bin"}):
            source = Path(str(dist.locate_file(top)))
            if source.is_dir():
                shutil.copytree(source, dest / top)
            elif source.is_file():
                shutil.copy2(source, dest / top)


def top_level_names(directory: Path) -> set[str]:
    """The importable top-level names a sys.path directory provides."""
    names = set()
    for entry in directory.iterdir():
        if entry.name in ("__pycache__", "bin") or entry.suffix in (".dist-info", ".egg-info"):
            continue
        if entry.is_dir():
            names.add(entry.name)
        elif entry.suffix in (".py", ".so", ".pyc"):
            names.add(entry.name.split(".")[0])
    return names


# --- the functions --------------------------------------------------------------------


@dataclass(frozen=True)
class LambdaFunction:
    """One AWS::Serverless::Function of the template, as written."""

    name: str
    code_uri: str
    handler: str
    props: dict[str, Any]

    @property
    def module(self) -> str:
        return self.handler.rpartition(".")[0]

    @property
    def family(self) -> str | None:
        """The check family of functions/checks/<family>/, else None."""
        parts = PurePath(self.code_uri).parts
        return parts[2] if parts[:2] == ("functions", "checks") and len(parts) == 3 else None


def functions_of(template: dict[str, Any]) -> dict[str, LambdaFunction]:
    out = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            props = resource["Properties"]
            out[name] = LambdaFunction(name, props["CodeUri"], props["Handler"], props)
    return out


# The runtime's side of an invocation, stdlib only (it runs on the emulated path alone):
# set sys.path as Lambda does, import the handler module, call it once per event (one warm
# execution environment), and report what happened to the file named in the spec.
BOOTSTRAP = r"""
import json, sys, time, traceback
spec = json.loads(sys.stdin.read())
stdlib = list(sys.path)  # -I -S: nothing but the standard library
sys.path[:] = spec["path"] + stdlib
out = {"sys_path": list(sys.path), "stdlib": stdlib, "answers": [], "error": None}
try:
    import importlib
    name, _, attr = spec["handler"].rpartition(".")
    module = importlib.import_module(name)
    out["module_file"] = getattr(module, "__file__", None)
    handler = getattr(module, attr)

    class LambdaContext:
        def __init__(self, n):
            c = spec["context"]
            self.function_name = c["function_name"]
            self.function_version = "$LATEST"
            self.invoked_function_arn = c["invoked_function_arn"]
            self.memory_limit_in_mb = c["memory_limit_in_mb"]
            self.aws_request_id = "%s-%d" % (c["request_id"], n)
            self.log_group_name = c["log_group_name"]
            self.log_stream_name = c["log_stream_name"]
            self._deadline = time.monotonic() + c["timeout"]

        def get_remaining_time_in_millis(self):
            return max(0, int((self._deadline - time.monotonic()) * 1000))

    for n, event in enumerate(spec["events"]):
        out["answers"].append(handler(event, LambdaContext(n)))
except BaseException:
    out["error"] = traceback.format_exc()
finally:
    out["modules"] = {
        k: m.__file__ for k, m in list(sys.modules.items()) if getattr(m, "__file__", None)
    }
    with open(spec["result"], "w") as f:
        json.dump(out, f, default=repr)
"""


@dataclass
class Invocation:
    """What one emulated execution environment did."""

    function: str
    returncode: int | None
    stdout: str
    stderr: str
    answers: list[Any] = field(default_factory=list)
    error: str | None = None
    module_file: str | None = None
    sys_path: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    def describe(self) -> str:
        """For assertion messages: the error, and the ends of the child's output."""
        return (
            f"{self.function}: exit {self.returncode}\n"
            f"--- error\n{self.error}\n"
            f"--- stderr (last 4000 characters)\n{self.stderr[-4000:]}\n"
            f"--- stdout (last 4000 characters)\n{self.stdout[-4000:]}"
        )

    def foreign_modules(self) -> dict[str, str]:
        """Modules the child loaded from anywhere but its sys.path (site-packages, say)."""
        roots = [Path(p) for p in self.sys_path]
        return {
            name: path
            for name, path in self.modules.items()
            if not any(Path(path).is_relative_to(root) for root in roots)
        }


def copy_code(function: LambdaFunction, dest: Path) -> Path:
    """The function's CodeUri as `sam build` packages it (/var/task), outside the repository."""
    code = dest / function.name
    if not code.exists():
        shutil.copytree(
            ROOT / function.code_uri, code, ignore=shutil.ignore_patterns("__pycache__")
        )
    return code


def lambda_environment(
    function: LambdaFunction, code: Path, layers: Layers, timeout: float, memory: int
) -> dict[str, str]:
    """The variables Lambda itself sets in a python3.12 execution environment."""
    name = f"deployhealth-{function.name}"
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "LAMBDA_TASK_ROOT": str(code),
        "LAMBDA_RUNTIME_DIR": str(layers.runtime),
        "_HANDLER": function.handler,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_python{LAMBDA_PYTHON}",
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(timeout)),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2025/01/15/[$LATEST]0123456789abcdef",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def invoke(
    function: LambdaFunction,
    code: Path,
    layers: Layers,
    env: Mapping[str, str],
    events: Iterable[dict[str, Any]],
    *,
    timeout: float,
    memory: int,
    workdir: Path,
) -> Invocation:
    """Run the function's handler on `events` in a fresh interpreter laid out as in Lambda.

    `timeout` is the function's own Timeout; the process gets a minute more for the cold
    start of an interpreter that compiles the library (its bytecode is Python 3.12's).
    """
    result = workdir / f"{function.name}-{len(list(workdir.glob('*.json')))}.json"
    name = f"deployhealth-{function.name}"
    spec = {
        "path": [str(code), *(str(p) for p in layers.path)],
        "handler": function.handler,
        "events": list(events),
        "result": str(result),
        "context": {
            "function_name": name,
            "invoked_function_arn": f"arn:aws:lambda:us-east-1:123456789012:function:{name}",
            "memory_limit_in_mb": memory,
            "request_id": f"{function.name}-req",
            "log_group_name": f"/aws/lambda/{name}",
            "log_stream_name": "2025/01/15/[$LATEST]0123456789abcdef",
            "timeout": timeout,
        },
    }
    # -I: no PYTHON* variables, no user site, no script directory on sys.path; -S: no
    # site-packages at all; -B: Lambda's /opt is read-only, and nothing may be left behind.
    command = [sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP]
    try:
        done = subprocess.run(
            command,
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=code,
            timeout=timeout + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return Invocation(
            function.name,
            None,
            _text(exc.stdout),
            _text(exc.stderr),
            error=f"no answer within {timeout + 60} s",
        )
    invocation = Invocation(function.name, done.returncode, done.stdout, done.stderr)
    if not result.exists():
        invocation.error = "the bootstrap wrote no result"
        return invocation
    report = json.loads(result.read_text())
    invocation.answers = report["answers"]
    invocation.error = report["error"]
    invocation.module_file = report.get("module_file")
    invocation.sys_path = report["sys_path"]
    invocation.modules = report["modules"]
    return invocation


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


# --- requirements ---------------------------------------------------------------------


def installed_distributions(paths: Sequence[Path]) -> dict[str, importlib.metadata.Distribution]:
    """Every distribution on `paths` by canonical name: the first one wins, as for imports."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions(path=[str(p) for p in paths]):
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return found


def _applies(requirement: Requirement, extra: str) -> bool:
    if requirement.marker is None:
        return extra == ""
    return requirement.marker.evaluate({**LAMBDA_MARKERS, "extra": extra})


def unmet(
    requirement: Requirement,
    who: str,
    installed: Mapping[str, importlib.metadata.Distribution],
) -> list[str]:
    """Why `requirement` (already known to apply) is not met on the path, or nothing."""
    target = installed.get(canonicalize_name(requirement.name))
    if target is None:
        return [f"{who} requires {requirement}, which is not installed"]
    problems = []
    if not requirement.specifier.contains(target.version, prereleases=True):
        problems.append(f"{who} requires {requirement}, but {target.version} is installed")
    for extra in sorted(requirement.extras):
        for text in target.requires or ():
            needed = Requirement(text)
            if needed.marker is not None and _applies(needed, extra) and not _applies(needed, ""):
                problems += unmet(needed, f"{who} (via {requirement.name}[{extra}])", installed)
    return problems


def unmet_requirements(
    installed: Mapping[str, importlib.metadata.Distribution],
    extra_requirements: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Every requirement of every installed distribution (and of `extra_requirements`,
    who -> requirement texts) that applies on Lambda's Python 3.12, arm64, and is not met."""
    problems = []
    wanted: list[tuple[str, str]] = [
        (f"{name} {dist.version}", text)
        for name, dist in installed.items()
        for text in dist.requires or ()
    ]
    for who, texts in (extra_requirements or {}).items():
        wanted += [(who, text) for text in texts]
    for who, text in wanted:
        requirement = Requirement(text)
        if _applies(requirement, ""):
            problems += unmet(requirement, who, installed)
    return problems
