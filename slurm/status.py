"""`tunefleet status OUTPUT_DIR`: where a SLURM run stands, read from its files and `scontrol`.

The job id is the one `tunefleet slurm --submit` recorded in `<output_dir>/slurm-job.json`; in
the dependency mode the chain is followed through the job logs ("submitted job N to continue").
State and restarts come from `scontrol show job -o` while SLURM remembers the job (MinJobAge),
else from the log; the newest complete checkpoint from its manifest; samples done, the time per
step and the ETA from `metrics.jsonl`, the total steps from `plan.json`. No torch is imported.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import (
    FINAL_DIR,
    METRICS_FILE,
    PLAN_FILE,
    RESOLVED_RECIPE,
    SLURM_JOB_FILE,
    read_json,
    read_metrics,
    training_rows,
    write_json,
)
from tunefleet.launch.core.rundir import move_aside

JOB_FILE = SLURM_JOB_FILE

_CONTINUED = re.compile(r"tunefleet: submitted job (\d+) to continue")
_STARTED = re.compile(r"tunefleet: job (\d+) on \S+, restart (\d+)")


def read_jobs(out: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The jobs recorded in `<out>/slurm-job.json`, and why they could not be read (a torn file)."""
    data, problem = read_json(out / JOB_FILE)
    if (
        problem is None
        and data is not None
        and not (isinstance(data, dict) and isinstance(data.get("jobs"), list))
    ):
        problem = f"{JOB_FILE} does not hold a list of jobs"
    return (list(data["jobs"]) if problem is None and data is not None else []), problem


def record_job(out: Path, entry: dict[str, Any]) -> None:
    """Append a submitted job to `<out>/slurm-job.json` (written atomically). A torn file is kept
    beside it (`slurm-job.json.unreadable-<time>`) and a new one started."""
    jobs, problem = read_jobs(out)
    if problem is not None:
        kept = move_aside(out / JOB_FILE, "unreadable")
        print(f"note: {problem}; kept as {kept.name}, starting a new {JOB_FILE}")
    write_json(out / JOB_FILE, {"jobs": [*jobs, entry]})


def step_times_s(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds per optimizer step between consecutive logged steps of the latest attempt
    (`elapsed_s` restarts at every start, so a drop marks a new attempt)."""
    attempt: list[dict[str, Any]] = []
    for row in rows:
        if attempt and row.get("elapsed_s", 0) < attempt[-1].get("elapsed_s", 0):
            attempt = []
        attempt.append(row)
    times = []
    for a, b in zip(attempt, attempt[1:], strict=False):
        if b["step"] > a["step"] and "elapsed_s" in a and "elapsed_s" in b:
            times.append((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]))
    return times


def parse_scontrol(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` from `scontrol show job -o` (values may hold spaces and `=`)."""
    pairs = re.findall(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s[A-Za-z][\w/:.]*=|$)", line.strip())
    return dict(pairs)


def scontrol_job(job_id: str) -> dict[str, str] | None:
    """What SLURM knows about a job, or None (no scontrol, or the job is forgotten)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        result = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    return parse_scontrol(result.stdout.splitlines()[0])


def _log_path(entry: dict[str, Any], job_id: str) -> Path:
    return Path(entry["output"].replace("%j", job_id).replace("%x", entry.get("job_name", "")))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def job_chain(entry: dict[str, Any]) -> list[str]:
    """The submitted job and the successors it submitted (dependency mode), oldest first."""
    chain = [str(entry["job_id"])]
    while len(chain) < 10_000:
        found = _CONTINUED.findall(_read(_log_path(entry, chain[-1])))
        if not found or found[-1] in chain:
            break
        chain.append(found[-1])
    return chain


RUN_FILES = (RESOLVED_RECIPE, PLAN_FILE, METRICS_FILE, SLURM_JOB_FILE, FINAL_DIR)
"""What a tunefleet output directory holds once a run or a job has started."""


def read_status(out: str | Path) -> dict[str, Any]:
    """Everything `tunefleet status` shows, as a JSON-serialisable dict."""
    out = Path(out).expanduser().absolute()
    if not out.is_dir():
        raise TunefleetError(f"{str(out)!r} is not a directory", "pass the output_dir of a run")
    if not any((out / name).exists() for name in RUN_FILES) and not ckpt.checkpoint_dirs(out):
        raise TunefleetError(
            f"{str(out)!r} is not a tunefleet run: it holds none of {', '.join(RUN_FILES)} and no checkpoint",
            "pass the output_dir of a run (its recipe's output_dir), e.g. runs/demo-slurm",
        )
    status: dict[str, Any] = {"output_dir": str(out), "finished": (out / FINAL_DIR).is_dir(), "job": None}
    jobs, jobs_problem = read_jobs(out)
    status["unreadable"] = [jobs_problem] if jobs_problem else []
    if jobs:
        entry = jobs[-1]
        chain = job_chain(entry)
        current = chain[-1]
        info = scontrol_job(current)
        started = _STARTED.findall(_read(_log_path(entry, current)))
        log_restart = int(started[-1][1]) if started else 0
        restarts = int(info["Restarts"]) if info and info.get("Restarts", "").isdigit() else log_restart
        if entry.get("restart") == "dependency":
            restarts = len(chain) - 1 + (restarts if info else 0)
        state = info.get("JobState") if info else None
        status["job"] = {
            "job_id": current,
            "chain": chain,
            "submissions": len(jobs),
            "restart_mode": entry.get("restart"),
            "state": state or ("COMPLETED (forgotten by SLURM)" if status["finished"] else "unknown"),
            "reason": info.get("Reason") if info else None,
            "nodes": info.get("NodeList") if info else None,
            "run_time": info.get("RunTime") if info else None,
            "time_limit": info.get("TimeLimit") if info else None,
            "exit_code": info.get("ExitCode") if info else None,
            "restarts": restarts,
            "log": str(_log_path(entry, current)),
        }
    scanned = ckpt.scan(out)  # the checkpoint a restart would continue from (the one rule)
    status["checkpoint"] = None
    status["checkpoints_passed_over"] = scanned.note()
    if scanned.usable is not None:
        manifest = ckpt.read_manifest(scanned.usable)
        status["checkpoint"] = {
            "path": str(scanned.usable),
            "step": manifest.step,
            "samples_seen": manifest.samples_seen,
            "save_s": manifest.save_s,
            "world_size": manifest.world_size,
            "created": manifest.created,
        }
    plan, plan_problem = read_json(out / PLAN_FILE)
    if plan_problem is not None or not isinstance(plan, dict):
        status["unreadable"] += [plan_problem] if plan_problem else []
        plan = {}
    rows = training_rows(read_metrics(out))
    step = rows[-1]["step"] if rows else (status["checkpoint"] or {}).get("step", 0)
    samples = rows[-1].get("samples_seen") if rows else (status["checkpoint"] or {}).get("samples_seen", 0)
    total_steps = plan.get("total_steps")
    global_batch = plan.get("global_batch_size")
    times = step_times_s(rows)
    s_per_step = statistics.median(times) if times else None
    eta_s = None
    if s_per_step is not None and total_steps and not status["finished"]:
        eta_s = round(max(0, total_steps - step) * s_per_step, 1)
    status["progress"] = {
        "step": step,
        "total_steps": total_steps,
        "samples_seen": samples,
        "total_samples": total_steps * global_batch if total_steps and global_batch else None,
        "s_per_step": round(s_per_step, 3) if s_per_step is not None else None,
        "eta_s": 0.0 if status["finished"] else eta_s,
    }
    return status


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render_status(status: dict[str, Any]) -> str:
    rows = [("output", status["output_dir"])]
    job = status["job"]
    if job is None:
        rows.append(("job", f"none recorded (no {JOB_FILE}: submit with `tunefleet slurm ... --submit`)"))
    else:
        where = f" on {job['nodes']}" if job["nodes"] and job["nodes"] != "(null)" else ""
        run = f", run time {job['run_time']} of {job['time_limit']}" if job["run_time"] else ""
        reason = f" ({job['reason']})" if job["reason"] and job["reason"] != "None" else ""
        rows.append(("job", f"{job['job_id']} {job['state']}{reason}{where}{run}"))
        chain = f"; chain {' -> '.join(job['chain'])}" if len(job["chain"]) > 1 else ""
        rows.append(("restarts", f"{job['restarts']} ({job['restart_mode']} mode{chain})"))
        rows.append(("log", job["log"]))
    c = status["checkpoint"]
    rows.append(
        (
            "checkpoint",
            f"{Path(c['path']).name}: step {c['step']}, {c['samples_seen']:,} samples, saved in {c['save_s']} s "
            f"by {c['world_size']} process(es)"
            if c
            else "none complete yet",
        )
    )
    if status.get("checkpoints_passed_over"):
        rows.append(("passed over", status["checkpoints_passed_over"]))
    p = status["progress"]
    total = f" of {p['total_steps']}" if p["total_steps"] else ""
    samples = f" of {p['total_samples']:,}" if p["total_samples"] else ""
    rows.append(("progress", f"step {p['step']}{total}, {p['samples_seen'] or 0:,}{samples} samples done"))
    if status["finished"]:
        rows.append(("ETA", "finished (final/ holds the adapter)"))
    elif p["eta_s"] is not None:
        rows.append(
            (
                "ETA",
                f"~{_duration(p['eta_s'])} of training left at {p['s_per_step']} s/step "
                "(from the last logged step)",
            )
        )
    else:
        rows.append(("ETA", "unknown until two steps of this attempt are logged"))
    for problem in status.get("unreadable", []):
        rows.append(("unreadable", f"{problem}; shown without it"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
