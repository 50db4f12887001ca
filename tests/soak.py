"""A mixed soak of real processes on one project, index, storage and store.

Three launchers compute overlapping runs and read each one back; other processes loop
``machinable reindex``, ``push --all``, ``verify``, and ``evict --where`` followed by
``pull --all``. Each launch logs the token it wrote into its run. Afterwards the checks
are the issue's invariants: no command failed, nothing printed a traceback, a final
``verify`` is clean, every run was computed once, and every run's bytes are the ones
its launch wrote (after any number of evictions and fetches).

Used by tests/test_soak.py (a short soak in CI) and benchmarks/bench_soak.py (longer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

SOAKRUN = '''
import os
import secrets

from pydantic import BaseModel
from machinable import Interface


class Soakrun(Interface):
    class Config(BaseModel):
        i: int = 0

    def __call__(self):
        token = secrets.token_hex(16)
        self.save_file("result.json", {"i": self.config.i, "token": token, "pid": os.getpid()})
        self.save_file("data/blob.bin", os.urandom(4096 + 512 * self.config.i).hex())
        line = f"{self.uuid} {token}\\n".encode()
        fd = os.open(self.project.path / "launches.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one short line: atomic with O_APPEND
        finally:
            os.close(fd)
'''

LAUNCHER = '''
import json, random, sys, time
from machinable import get
from machinable.errors import NotMountedError

seed, seconds, runs, go = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
import os
while not os.path.exists(go):
    time.sleep(0.01)
deadline = time.time() + seconds
rng = random.Random(seed)
reads = evicted = launches = 0
while launches < 3 or time.time() < deadline:
    launches += 1
    run = get("soakrun", {"i": rng.randrange(runs)}).launch()
    try:
        value = run.load_file("result.json")
    except NotMountedError:
        evicted += 1  # evicted by another process: its copy is in the store
        continue
    if value is None:
        raise SystemExit(f"load_file of cached run {run.uuid} returned None")
    print(json.dumps({"uuid": run.uuid, "token": value["token"]}), flush=True)
    reads += 1
print(json.dumps({"reads": reads, "evicted": evicted}), flush=True)
'''


@dataclass
class SoakResult:
    """What the soak saw: failed commands, launches, reads, and the final checks."""

    failures: list[str] = field(default_factory=list)
    commands: dict[str, int] = field(default_factory=dict)
    launches: dict[str, set[str]] = field(default_factory=dict)
    reads: list[tuple[str, str]] = field(default_factory=list)
    final_verify: str = ""
    seconds: float = 0.0

    def problems(self, project: Path) -> list[str]:
        """Every violated invariant, as a readable line (empty when the soak was clean)."""
        found = list(self.failures)
        for uuid, tokens in sorted(self.launches.items()):
            if len(tokens) != 1:
                found.append(f"run {uuid} was computed {len(tokens)} times")
        for uuid, token in self.reads:
            if self.launches.get(uuid) != {token}:
                found.append(f"a reader saw token {token} for run {uuid}, launched as {self.launches.get(uuid)}")
        storage = project / "storage"
        for uuid, tokens in sorted(self.launches.items()):
            path = storage / uuid / "result.json"
            if not path.is_file():
                found.append(f"run {uuid} is not here after the final pull")
                continue
            token = json.loads(path.read_text())["token"]
            if {token} != tokens:
                found.append(f"run {uuid} holds token {token}, its launch wrote {sorted(tokens)}")
        return found


def _machinable(project: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "machinable", "-q", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_LOOPER = '''
import os, subprocess, sys, time
seconds, go = float(sys.argv[1]), sys.argv[2]
commands = [c.split("\\x1f") for c in sys.argv[3:]]
while not os.path.exists(go):
    time.sleep(0.01)
deadline = time.time() + seconds
n = 0
while n == 0 or time.time() < deadline:
    for args in commands:
        done = subprocess.run([sys.executable, "-m", "machinable", "-q", *args], capture_output=True, text=True)
        print("\\x1e".join([str(done.returncode), " ".join(args), done.stdout, done.stderr]) + "\\x1d", flush=True)
        n += 1
'''


def run_soak(project: Path, store: str, seconds: float, *, runs: int = 24, launchers: int = 3) -> SoakResult:
    """Run the soak in ``project`` (which must be the cwd's project) against ``store``."""
    from conftest import write_module

    write_module(project, "soakrun", SOAKRUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = SoakResult()
    started = time.time()
    go = project.parent / "soak.go"
    launcher = project.parent / "soak_launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    looper = project.parent / "soak_looper.py"
    looper.write_text(textwrap.dedent(_LOOPER))
    half = runs // 2
    loops = {
        "reindex": [["reindex"]],
        "push": [["push", "--all", "--to", store]],
        "verify": [["verify"]],
        "evict-pull": [["evict", "--where", f"config.i < {half}"], ["pull", "--all"]],
    }
    children: list[tuple[str, subprocess.Popen]] = []
    for seed in range(launchers):
        children.append(
            (
                f"launcher {seed}",
                subprocess.Popen(
                    [sys.executable, str(launcher), str(seed), str(seconds), str(runs), str(go)],
                    cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ),
            )
        )
    for name, commands in loops.items():
        children.append(
            (
                name,
                subprocess.Popen(
                    [sys.executable, str(looper), str(seconds), str(go), *("\x1f".join(c) for c in commands)],
                    cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ),
            )
        )
    time.sleep(3.0)  # every child has imported and waits at the barrier
    go.touch()
    for name, child in children:
        out, err = child.communicate(timeout=seconds + 600)
        if child.returncode != 0 or "Traceback" in err:
            result.failures.append(f"{name} exited {child.returncode}: {err[-2000:]}")
        if name.startswith("launcher"):
            for line in out.splitlines():
                item = json.loads(line)
                if "uuid" in item:
                    result.reads.append((item["uuid"], item["token"]))
            result.commands[name] = len(out.splitlines())
            continue
        records = [r for r in out.split("\x1d") if r.strip()]
        result.commands[name] = len(records)
        for record in records:
            code, command, stdout, stderr = record.lstrip("\n").split("\x1e")
            bad_verify = command == "verify" and code == "1" and "Traceback" not in stderr
            if (code != "0" and not bad_verify) or "Traceback" in stdout + stderr:
                result.failures.append(f"`machinable {command}` exited {code}: {(stdout + stderr)[-1500:]}")
            elif bad_verify:
                # verify runs amid launches and evictions; only the final pass must be
                # clean, but a problem it reports mid-soak is kept for the reader.
                result.commands["verify problems"] = result.commands.get("verify problems", 0) + 1
    # Settle: everything back here, then one clean pass.
    for args in (["push", "--all", "--to", store], ["pull", "--all"], ["reindex"]):
        done = _machinable(project, env, *args)
        if done.returncode != 0:
            result.failures.append(f"final `machinable {' '.join(args)}` exited {done.returncode}: {done.stderr[-1500:]}")
    final = _machinable(project, env, "verify")
    result.final_verify = final.stdout + final.stderr
    if final.returncode != 0:
        result.failures.append(f"the final verify is not clean: {result.final_verify[-2000:]}")
    log = project / "launches.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        uuid, token = line.split()
        result.launches.setdefault(uuid, set()).add(token)
    result.seconds = time.time() - started
    return result
