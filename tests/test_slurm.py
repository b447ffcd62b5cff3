"""The workflow on a real (local, single-node) SLURM cluster, through the executor plugin.

A session fixture starts munged + slurmctld + slurmd from the Debian packages (slurm-wlm,
munge) with a configuration generated into a temporary folder (tests/slurm/cluster.py) and
stops them at the end. The tiny demo runs with the shipped profile (workflow/profiles/slurm)
and the scheduler's own records are checked: one job per rule instance with the CPUs, memory
and time limit Snakemake computed, SLURM logs in place, results identical to a local run.
A drill makes a job exceed its memory (killed by SLURM, retried with more memory) and one
fail for good; a GPU run shows the GPU request in the scheduler's record.

No slurmdbd: `sacct` needs a database for job accounting, so the finished-job records come
from the job-completion log (JobCompType=jobcomp/filetxt, read by `sacct --completion`) and
`scontrol show job` (slurmctld keeps finished jobs for MinJobAge=3600 s); the plugin's
status queries use squeue (--slurm-status-command squeue).

Skipped where the SLURM binaries are absent (a user's machine), except under CI=true, where
that is a failure: the CI script installs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm.cluster import LocalSlurm, missing_binaries  # noqa: E402
from test_workflow import REPO, TINY_CONFIG, _write_workdir  # noqa: E402

pytestmark = pytest.mark.slow

PROFILE = REPO / "workflow" / "profiles" / "slurm"
PARTITION = "local"
# Tables the pipeline writes deterministically (same seed, same thread count).
COMPARED = [
    "targets/sample_table.tsv",
    "targets/sepsis_vs_control/condition_effects.tsv",
    "targets/sepsis_vs_control/composition.tsv",
    "targets/contrasts.tsv",
    "qc/qc_summary.tsv",
]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    reason = None
    if missing:
        reason = f"SLURM test cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        reason = "SLURM test cluster needs root (slurmd runs as SlurmdUser=root)"
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2, partition=PARTITION)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not any(cluster.alive().values()), f"SLURM daemons left running: {cluster.alive()}"


def _profile_defaults() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())["default-resources"]


def _slurm_snakemake(
    cluster,
    workdir: Path,
    *args: str,
    snakefile: Path | None = None,
    configfile: Path | None = None,
    timeout: int = 900,
):
    """Snakemake with the shipped SLURM profile on the test cluster.

    Overrides: the local partition (on the command line --default-resources replaces the
    profile's whole default-resources, so its mem_mb and runtime are passed again), 2 jobs and
    2 cores (threads per job are capped at --cores), squeue status checks, quick first check.
    """
    defaults = dict(_profile_defaults(), slurm_partition=PARTITION)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(workdir),
    ]
    if configfile is not None or snakefile is None:
        cmd += ["--configfile", str(configfile or workdir / "config.yaml")]
    cmd += [
        "--workflow-profile",
        str(PROFILE),
        "--jobs",
        "2",
        "--cores",
        "2",
        "--default-resources",
        *[f"{k}={v}" for k, v in defaults.items()],
        "--slurm-no-account",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-keep-successful-logs",
        *args,
    ]
    env = cluster.env(dict(os.environ, PYTHONUNBUFFERED="1"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _submissions(log: str) -> list[dict]:
    """Each SLURM submission in a Snakemake log: rule, wildcards, threads, resources, id, log."""
    blocks: dict[str, dict] = {}
    current: dict | None = None
    subs = []
    for line in log.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            current = {"rule": m.group(1), "threads": 1, "resources": {}}
            continue
        if line and not line.startswith(" "):
            current = None  # the block's indented lines are over (e.g. "Error in rule ...")
        if current is not None:
            s = line.strip()
            if s.startswith("jobid:"):
                current["jobid"] = s.split(":", 1)[1].strip()
                blocks[current["jobid"]] = current
            elif s.startswith("threads:"):
                current["threads"] = int(s.split(":", 1)[1])
            elif s.startswith("log:"):
                current["logs"] = [x.strip() for x in s.split(":", 1)[1].split(",")]
            elif s.startswith("wildcards:"):
                current["wildcards"] = s.split(":", 1)[1].strip()
            elif s.startswith("resources:"):
                for item in s.split(":", 1)[1].split(", "):
                    k, _, v = item.strip().partition("=")
                    current["resources"][k] = v
        m = re.match(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", line)
        if m:
            sub = dict(blocks[m.group(1)], slurm_id=m.group(2), slurm_log=Path(m.group(3)))
            subs.append(sub)
    return subs


def _job_stats(log: str) -> dict[str, int]:
    """Snakemake's `Job stats` table: jobs per rule."""
    table = log.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def _failure_report(res, work: Path) -> str:
    logs = "\n".join(
        f"--- {p}\n{p.read_text()[-1500:]}"
        for p in sorted(work.rglob("*.log"))
        if "slurm_logs" in str(p) or "/logs/" in str(p)
    )
    return f"{res.stderr[-5000:]}\n{logs[-8000:]}"


@pytest.fixture(scope="module")
def slurm_and_local_runs(slurm_cluster, tiny_run_started, tmp_path_factory):
    """The tiny demo through SLURM, and the same config run locally alongside (the session's
    one tiny-demo run, ``conftest.tiny_run_started``, which the end-to-end checks of
    test_workflow.py read too; the SLURM run spends most of its time waiting on the
    scheduler)."""
    work = _write_workdir(tmp_path_factory.mktemp("slurm_run"))
    t0 = time.time()
    try:
        res = _slurm_snakemake(slurm_cluster, work)
    finally:
        local = tiny_run_started.wait()
    elapsed = time.time() - t0
    if res.returncode != 0:
        pytest.fail(f"SLURM run failed:\n{_failure_report(res, work)}")
    return {"work": work, "local": local, "log": res.stdout + res.stderr, "elapsed": elapsed}


def test_every_rule_instance_is_one_slurm_job_with_its_resources(
    slurm_cluster, slurm_and_local_runs
):
    run = slurm_and_local_runs
    log, work = run["log"], run["work"]
    subs = _submissions(log)
    stats = _job_stats(log)
    expected = {rule: n for rule, n in stats.items() if rule != "all"}  # `all` is local
    submitted: dict[str, int] = {}
    for s in subs:
        submitted[s["rule"]] = submitted.get(s["rule"], 0) + 1
    assert submitted == expected, (submitted, expected)
    assert len({s["slurm_id"] for s in subs}) == len(subs)

    records = {r["JobId"]: r for r in slurm_cluster.completed_jobs()}
    for s in subs:
        rec = records[s["slurm_id"]]  # the job-completion log of the scheduler
        ctl = slurm_cluster.show_job(s["slurm_id"])  # slurmctld's record of the job
        where = f"{s['rule']} {s.get('wildcards', '')} (SLURM job {s['slurm_id']})"
        assert rec["JobState"] == "COMPLETED", where
        assert rec["Partition"] == PARTITION, where
        assert int(rec["ProcCnt"]) == s["threads"], where
        assert f"mem={s['resources']['mem_mb']}M" in rec["Tres"], (where, rec["Tres"])
        assert int(rec["TimeLimit"]) == int(s["resources"]["runtime"]), where
        assert ctl["Comment"].startswith(f"rule_{s['rule']}"), (where, ctl.get("Comment"))
        assert "gpu" not in rec["Tres"] and "gpu" not in ctl.get("TresPerJob", ""), where
        # the SLURM log of each job is in place and is that job's
        assert s["slurm_log"].is_file() and s["slurm_log"].name == f"{s['slurm_id']}.log", where
        assert work in s["slurm_log"].parents and f"rule_{s['rule']}" in str(s["slurm_log"])
        assert Path(ctl["StdOut"]) == s["slurm_log"], where

    by_rule = {s["rule"]: s for s in subs}
    # profile values reach the scheduler: runtime per rule, threads capped at --cores 2
    assert int(records[by_rule["integrate"]["slurm_id"]]["TimeLimit"]) == 360
    assert int(records[by_rule["qc_sample"]["slurm_id"]]["TimeLimit"]) == 60
    assert int(records[by_rule["integrate"]["slurm_id"]]["ProcCnt"]) == 2
    # memory: the stage's measured footprint at the job's cells (sepsis_sc.store.stage_mem_mb,
    # 2000 MB floor for 1,600 cells) and sample_mem_mb (2000 MB floor)
    from sepsis_sc.store import h5ad_cells, stage_mem_mb

    cells = h5ad_cells([work / "results" / "tiny" / "qc" / "merged.h5ad"])
    assert (
        cells
        and f"mem={stage_mem_mb('integrate', cells)}M"
        in records[by_rule["integrate"]["slurm_id"]]["Tres"]
    )
    assert "mem=2000M" in records[by_rule["integrate"]["slurm_id"]]["Tres"]
    assert "mem=2000M" in records[by_rule["qc_sample"]["slurm_id"]]["Tres"]
    # every job's own rule log is in place too
    for s in subs:
        assert s.get("logs"), s["rule"]
        for rule_log in s["logs"]:
            assert (work / rule_log).is_file(), (s["rule"], rule_log)

    # sacct itself can read the job-completion log (no database)
    res = slurm_cluster.run(
        "sacct",
        "--completion",
        "--parsable2",
        "--noheader",
        "--format=JobID,State,AllocCPUS,Timelimit",
        check=False,
    )
    assert res.returncode == 0, res.stderr
    ids = {line.split("|")[0] for line in res.stdout.splitlines()}
    assert {s["slurm_id"] for s in subs} <= ids
    print(f"\nSLURM run + local run (in parallel): {run['elapsed']:.0f} s")
    print(res.stdout)


def test_slurm_outputs_match_a_local_run(slurm_and_local_runs):
    slurm_res = slurm_and_local_runs["work"] / "results" / "tiny"
    local_res = slurm_and_local_runs["local"] / "results" / "tiny"
    for rel in COMPARED:
        a, b = (slurm_res / rel).read_bytes(), (local_res / rel).read_bytes()
        assert a == b, f"{rel} differs between the SLURM and the local run"
    prov = yaml.safe_load((slurm_res / "provenance.yaml").read_text())
    assert prov["integration"]["device"] == "cpu"


DRILL_SNAKEFILE = """
# Failure drill (test-only): nothing of the pipeline. `hungry` holds 1 GB (plus the ~0.15 GB
# of the Snakemake process in the job step); attempt 1 asks for 800 MB and is killed by SLURM,
# attempt 2 for 1600 MB. `doomed` always asks for too little; it writes part of its output first.
rule all:
    input: "hungry.txt", "doomed.txt"

rule hungry:
    output: "hungry.txt"
    log: "logs/hungry.log"
    resources: mem_mb=lambda wc, attempt: 800 * attempt, runtime=5
    shell: "python3 -c 'import time; a = b\\"x\\" * (1000 * 2**20); time.sleep(4)' && echo {resources.mem_mb} > {output}"

rule doomed:
    output: "doomed.txt"
    log: "logs/doomed.log"
    resources: mem_mb=lambda wc, attempt: 400 * attempt, runtime=5
    shell: "echo partial > {output}; python3 -c 'import time; a = b\\"x\\" * (1500 * 2**20); time.sleep(4)'"
"""


def test_memory_drill_retries_with_more_memory_and_fails_cleanly(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(DRILL_SNAKEFILE)
    res = _slurm_snakemake(
        slurm_cluster, tmp_path, "--keep-going", snakefile=tmp_path / "Snakefile", timeout=400
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, "the doomed job should fail the run"
    subs = _submissions(out)
    records = {r["JobId"]: r for r in slurm_cluster.completed_jobs()}
    hungry = [s for s in subs if s["rule"] == "hungry"]
    doomed = [s for s in subs if s["rule"] == "doomed"]
    # profile retries: 1 -> two attempts each, memory doubled on the second
    assert [s["resources"]["mem_mb"] for s in hungry] == ["800", "1600"], out[-3000:]
    assert [s["resources"]["mem_mb"] for s in doomed] == ["400", "800"], out[-3000:]
    assert [records[s["slurm_id"]]["JobState"] for s in hungry] == ["FAILED", "COMPLETED"]
    assert [records[s["slurm_id"]]["JobState"] for s in doomed] == ["FAILED", "FAILED"]
    for s in [hungry[0], *doomed]:
        assert "exceeded memory limit" in s["slurm_log"].read_text(), s["slurm_log"]
    assert "mem=1600M" in records[hungry[1]["slurm_id"]]["Tres"]
    assert (tmp_path / "hungry.txt").read_text().strip() == "1600"
    # failed for good: a clear message naming the rule, the SLURM job and its log, and the
    # partly written output is removed
    assert "Error in rule doomed" in out
    assert f"SLURM-job '{doomed[-1]['slurm_id']}' failed" in out
    assert str(doomed[-1]["slurm_log"]) in out
    assert not (tmp_path / "doomed.txt").exists(), "half-written output left behind"


def test_gpu_request_reaches_the_scheduler(slurm_cluster, slurm_and_local_runs):
    """resources.gpu: true -> the scVI job is submitted with --gpus=1 (the test node has one
    count-only GPU, so it runs; scVI itself finds no CUDA and trains on CPU)."""
    work = slurm_and_local_runs["work"]
    cfg = dict(TINY_CONFIG, resources={"gpu": True})
    (work / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    res = _slurm_snakemake(
        slurm_cluster,
        work,
        "--forcerun",
        "integrate",
        "--verbose",
        "results/tiny/integrate/integration.yaml",
        configfile=work / "gpu.yaml",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, _failure_report(res, work)
    subs = _submissions(out)  # one, or two if attempt 1 failed (retries: 1)
    assert subs and {s["rule"] for s in subs} == {"integrate"}, [s["rule"] for s in subs]
    for s in subs:
        assert s["resources"]["gpu"] == "1"
        ctl = slurm_cluster.show_job(s["slurm_id"])
        assert ctl["TresPerJob"] == "gres:gpu:1", ctl
    assert ctl["JobState"] == "COMPLETED"
    # the sbatch calls Snakemake made (logged with --verbose)
    sbatch = [line for line in out.splitlines() if line.startswith("sbatch call: sbatch ")]
    assert len(sbatch) == len(subs) and all("--gpus=1" in c for c in sbatch), sbatch


KILL_SNAKEFILE = """
rule all:
    input: "slow.txt"

rule slow:
    output: "slow.txt"
    resources: runtime=5
    shell: "sleep 10 && echo done > {output}"
"""


def test_killed_run_is_unlocked_and_resumed(slurm_cluster, tmp_path):
    """Snakemake killed (SIGKILL) while its job runs: the job is cancelled by hand, the next
    run refuses the locked folder, `--unlock` frees it and the rerun completes."""
    (tmp_path / "Snakefile").write_text(KILL_SNAKEFILE)
    snakefile = tmp_path / "Snakefile"
    defaults = dict(_profile_defaults(), slurm_partition=PARTITION)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile),
        "--directory",
        str(tmp_path),
        "--workflow-profile",
        str(PROFILE),
        "--jobs",
        "1",
        "--cores",
        "1",
        "--default-resources",
        *[f"{k}={v}" for k, v in defaults.items()],
        "--slurm-no-account",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
    ]
    proc = subprocess.Popen(
        cmd, env=slurm_cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    job_id = None
    deadline = time.time() + 120
    while time.time() < deadline and job_id is None:
        res = slurm_cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i %k", check=False)
        for line in res.stdout.splitlines():
            jid, comment = line.split(maxsplit=1)
            if comment.startswith("rule_slow"):
                job_id = jid
        time.sleep(1)
    proc.kill()
    proc.communicate(timeout=30)
    assert job_id is not None, "the slow job never started"
    slurm_cluster.run("scancel", job_id)

    res = _slurm_snakemake(slurm_cluster, tmp_path, snakefile=snakefile, timeout=120)
    assert res.returncode != 0 and "cannot be locked" in res.stdout + res.stderr
    res = _slurm_snakemake(slurm_cluster, tmp_path, "--unlock", snakefile=snakefile, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _slurm_snakemake(slurm_cluster, tmp_path, snakefile=snakefile, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "slow.txt").read_text().strip() == "done"
