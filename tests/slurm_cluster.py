"""A real SLURM cluster on this machine, for tests: munged + slurmctld + one slurmd per emulated node.

Debian's slurm-wlm 22.05 and munge, installed with apt when missing. Every daemon runs in the
foreground as a child of this process (so it is reaped, and stopped by PID, never by name) with
its own munge socket, ports, state and logs in a temporary directory; `slurmd -N nI` runs in its
own UTS namespace (`unshare -u`) so `hostname` inside a job prints the node name. The settings
are those measured in /work/shared/FACTS.md ("A real SLURM cluster on one machine").

    with slurm_cluster(nodes=4) as cluster:
        job_id = cluster.sbatch(script_text)
        cluster.wait(job_id, {"COMPLETED"}, timeout_s=60)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged"]
HOSTS_MARK = "# tunefleet test SLURM nodes"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
CPUS_PER_NODE = 2

SLURM_CONF = """\
ClusterName=tunefleet-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may run again after ~12 s instead of 121 s (set before start)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd in this sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=normal Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=high Nodes={nodelist} MaxTime=INFINITE State=UP PriorityTier=10
"""


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root, no apt, install failed)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when a program is missing."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test SLURM cluster needs root (daemons, /etc/hosts, munge user)")
    if all(shutil.which(p) for p in PROGRAMS):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{', '.join(PACKAGES)} are not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if result.returncode != 0 or missing:
        raise SlurmUnavailable(
            f"apt-get install {' '.join(PACKAGES)} failed (missing {missing}): {result.stderr.strip()[-500:]}"
        )


def ensure_hosts(names: Iterable[str]) -> None:
    """Make the node names resolve to 127.0.0.1 (idempotent: only missing names are added)."""
    hosts = Path("/etc/hosts")
    known = set()
    for line in hosts.read_text().splitlines():
        known.update(line.split("#", 1)[0].split()[1:])
    missing = [n for n in names if n not in known]
    if missing:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")


def parse_scontrol(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` from `scontrol show ... -o` (values may hold spaces and `=`)."""
    pairs = re.findall(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s[A-Za-z][\w/:.]*=|$)", line.strip())
    return dict(pairs)


@dataclass
class SlurmCluster:
    """A running test cluster; every client command runs with this cluster's SLURM_CONF."""

    root: Path
    nodes: list[str]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _scripts: int = 0

    def run(
        self, *argv: str, check: bool = True, timeout_s: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(argv),
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, script: str | os.PathLike, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a script (text, or the path of a file); returns the job id."""
        if isinstance(script, str) and script.startswith("#!"):
            self._scripts += 1
            path = self.root / "jobs" / f"job-{self._scripts}.sbatch"
            path.parent.mkdir(exist_ok=True)
            path.write_text(script)
            script = path
        result = self.run("sbatch", "--parsable", *args, str(script), env=env or self.env)
        return result.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o JOB` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return parse_scontrol(out.splitlines()[0]) if out.strip() else {}

    def wait(
        self, job_id: str, states: str | Iterable[str], timeout_s: float = 60, poll_s: float = 0.3
    ) -> dict[str, str]:
        """Wait until the job is in one of `states`; fail fast if it ends in another state."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        wrong_since: float | None = None
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in wanted:
                return info
            if state in TERMINAL_STATES:  # transient during a requeue: give it a moment
                wrong_since = wrong_since or time.monotonic()
                if time.monotonic() - wrong_since > 5:
                    break
            else:
                wrong_since = None
            time.sleep(poll_s)
        raise AssertionError(
            f"job {job_id} is {info.get('JobState')!r}, expected {sorted(wanted)}:\n"
            f"{info}\n--- job output ---\n{self.output(info)}"
        )

    def output(self, info: dict[str, str], *, tail: int | None = 4000) -> str:
        """The job's output file: its last `tail` characters (the whole file with None)."""
        path = info.get("StdOut")
        try:
            text = Path(path).read_text(errors="replace") if path else ""
            return text[-tail:] if tail else text
        except OSError:
            return ""

    def log(self, name: str = "slurmctld") -> str:
        """The tail of a daemon log (`slurmctld`, `slurmd-n1`, `munged`)."""
        path = self.root / "log" / (name if name.endswith(".out") else f"{name}.log")
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _write_conf(root: Path, nodes: list[str], munge_socket: Path) -> Path:
    node_lines = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} "
        f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN"
        for name in nodes
    )
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            root=root,
            ctld_port=_free_port(),
            munge_socket=munge_socket,
            node_lines=node_lines,
            nodelist=",".join(nodes),
        )
    )
    return conf


def _start_munged(root: Path) -> tuple[subprocess.Popen, Path]:
    import pwd

    munge = pwd.getpwnam("munge")
    mdir = root / "munge"
    mdir.mkdir()
    mdir.chmod(0o755)  # munged wants execute permission for all on its socket directory
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (mdir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = mdir / "munge.socket"
    with open(root / "log" / "munged.log", "wb") as out:
        proc = subprocess.Popen(
            [
                "munged",
                "--foreground",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={mdir}/munged.pid",
                f"--log-file={mdir}/munged.log",
                f"--seed-file={mdir}/munged.seed",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, sock


def _wait_for(condition, timeout_s: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                logs = cluster.log(name) + cluster.log(f"{name}.out")
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{logs}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}:\n{cluster.log()}")


def _stop(cluster: SlurmCluster) -> None:
    with contextlib.suppress(Exception):  # end jobs first so no slurmstepd outlives its slurmd
        cluster.run("scancel", "--user=root", check=False, timeout_s=10)
        deadline = time.monotonic() + 15
        while (
            time.monotonic() < deadline
            and cluster.run(
                "squeue", "-h", "-t", "RUNNING,COMPLETING", check=False, timeout_s=10
            ).stdout.strip()
        ):
            time.sleep(0.3)
    # slurmd first, then slurmctld, then munged (they talk to it until the end)
    order = [n for n in cluster.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
    for name in order:
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def slurm_cluster(nodes: int = 4) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and `nodes` slurmd (n1..nN, CPUs=2 each, partitions `normal` and
    `high` with partition-priority preemption); yield the cluster; stop everything by PID."""
    ensure_installed()
    names = [f"n{i}" for i in range(1, nodes + 1)]
    ensure_hosts(names)
    root = Path(tempfile.mkdtemp(prefix="tunefleet-slurm-"))
    root.chmod(0o755)  # munged (user munge) must reach its directory
    for sub in ("state", "spool", "run", "log", "jobs"):
        (root / sub).mkdir()
    cluster = SlurmCluster(root=root, nodes=names, env={})
    try:
        cluster.procs["munged"], sock = _start_munged(root)
        _wait_for(sock.exists, 10, "the munge socket", cluster)
        conf = _write_conf(root, names, sock)
        cluster.env = {**os.environ, "SLURM_CONF": str(conf)}
        with open(root / "log" / "slurmctld.out", "wb") as out:
            cluster.procs["slurmctld"] = subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(conf)],
                env=cluster.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for name in names:
            with open(root / "log" / f"slurmd-{name}.out", "wb") as out:
                cluster.procs[f"slurmd-{name}"] = subprocess.Popen(
                    [
                        "unshare",
                        "-u",
                        "sh",
                        "-c",
                        'hostname "$1" && exec slurmd -D -N "$1" -f "$2"',
                        "sh",
                        name,
                        str(conf),
                    ],
                    env=cluster.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )

        def all_idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout_s=10).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return len(states) == nodes and all(s == "idle" for s in states.values())

        _wait_for(all_idle, 30, "all nodes idle", cluster)
        yield cluster
    finally:
        _stop(cluster)
        if not os.environ.get("TUNEFLEET_KEEP_SLURM"):
            shutil.rmtree(root, ignore_errors=True)
