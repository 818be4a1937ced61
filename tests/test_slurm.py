"""The workflow on a REAL one-node Slurm cluster (tests/slurm/start.sh), through `sbatch`.

What it checks, with `snakemake --profile profiles/slurm-test` and the tiny preset:

* the DAG runs as Slurm jobs, one per Snakemake job, each allocated what Snakemake asked for:
  `gpu=1` -> `gres/gpu=1` in sacct's ReqTRES and AllocTRES (training and CAM inference, on
  partition `gpu`), no GPU for the others (partition `debug`), threads -> CPUs, mem_mb -> memory,
  all under account `ci`;
* deleting one stage's final output reruns only that stage, as a single new Slurm job;
* a training job cancelled with `scancel` mid-training fails the run, leaves no output that looks
  complete (no model file, no CAM shard without its `complete` attribute) but keeps its epoch
  checkpoint, and the next invocation resumes from it (the rule log says "resuming from"; the
  step log has every step exactly once).

The tiny preset's whole DAG runs (data -> classifier -> CAMs -> CRF / IRN -> DeepLab -> tables, ~27
jobs; each Slurm job costs a few seconds of its own: two Snakemake start-ups plus status-check
rounds). WSSS_SLURM_TEST_QUICK=1 runs only `--until seed_eval dataset_stats` (data, classifier
training, CAM shards, seed evaluation: ~7 jobs) for a quicker look while working on this file.

Needs root: start.sh installs Debian's Slurm packages and starts munge, MariaDB, slurmdbd,
slurmctld and slurmd on localhost; stop.sh stops exactly those daemons at the end of the session.
Without root, or where the packages cannot be installed, or on a machine with its own Slurm
configuration, the tests are skipped with the reason -- unless the environment variable CI is set
(CI=true), where they must run and fail loudly instead. The fake GPUs are scheduled for real but
the jobs run on the CPU; CPU and memory limits are not enforced (no cgroups).
"""

from __future__ import annotations

import csv
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import job_counts

# one pytest-xdist worker runs the whole file (`--dist loadfile` in pyproject.toml): its session
# fixtures own the Slurm daemons and the one DAG run the tests share
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PROFILE = REPO / "profiles" / "slurm-test"
START = REPO / "tests" / "slurm" / "start.sh"
STOP = REPO / "tests" / "slurm" / "stop.sh"

QUICK = os.environ.get("WSSS_SLURM_TEST_QUICK", "") not in ("", "0")
UNTIL = ["--until", "seed_eval", "dataset_stats"] if QUICK else []
# training and inference rules (gpu=1) among the jobs the run submits
GPU_RULES = {"train_classifier", "cam_shard"}
if not QUICK:
    GPU_RULES |= {"train_irn", "irn_masks_shard", "train_deeplab", "deeplab_predict_shard"}
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
# start.sh exit codes meaning "this machine cannot host the test cluster" (not "start.sh is broken")
UNAVAILABLE = {
    3: "the Slurm packages are not installed and cannot be installed",
    4: "this machine has its own Slurm configuration (/etc/slurm/slurm.conf), left untouched",
}
# `timeout` exits 124 after its SIGINT; if snakemake is still busy 120 s later, `timeout -k` KILLs
# its whole process group, itself included (-9 as seen from here)
TIMED_OUT = {124, 137, -9}
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(reason: str):
    """Skip on a developer machine; in CI (CI=true) the Slurm test is required, so fail."""
    if IN_CI:
        pytest.fail(f"CI is set but the Slurm integration test cannot run: {reason}", pytrace=False)
    pytest.skip(f"Slurm integration test skipped: {reason} (with CI=true this is an error)")


def clean_env() -> dict:
    """The test's environment without Slurm job variables (pytest may itself run inside a job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_"))}


def run_script(script: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def slurm_owner():
    """An exclusive lock on this machine's test cluster: two processes running this file at once
    (two pytest runs, or xdist workers that split the file) would install, start and stop the same
    daemons under each other. The second one fails here, saying why."""
    lock = open(tempfile.gettempdir() + "/wsss-slurm-test.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        pytest.fail(
            "another process runs the Slurm integration test on this machine (a second pytest run, or "
            "xdist workers splitting tests/test_slurm.py: run it with `--dist loadfile`)",
            pytrace=False,
        )
    yield
    lock.close()


@pytest.fixture(scope="session")
def slurm(slurm_owner):
    """A running one-node Slurm cluster (partitions debug, gpu; account ci; 2 fake GPUs)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        cannot_run("needs root (tests/slurm/start.sh installs and starts the Slurm daemons)")
    if shutil.which("timeout") is None:
        cannot_run("needs coreutils' `timeout`")
    try:
        proc = run_script(START, timeout=900)
    except subprocess.TimeoutExpired:
        run_script(STOP, timeout=300)
        pytest.fail("tests/slurm/start.sh did not finish within 900 s", pytrace=False)
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if proc.returncode in UNAVAILABLE:
        cannot_run(f"{UNAVAILABLE[proc.returncode]}:\n{log}")
    if proc.returncode != 0:
        run_script(STOP, timeout=300)
        pytest.fail(f"tests/slurm/start.sh failed ({proc.returncode}):\n{log}", pytrace=False)
    yield
    stop = run_script(STOP, timeout=300)
    assert stop.returncode == 0, f"tests/slurm/stop.sh failed:\n{stop.stdout}\n{stop.stderr}"


# ---------------------------------------------------------------- running snakemake, reading Slurm


def snakemake_cmd(workdir: Path, *args: str, limit: int) -> list:
    """`snakemake --profile profiles/slurm-test` in ``workdir``, under `timeout -s INT`: SIGINT makes
    snakemake cancel its Slurm jobs before exiting (SIGTERM would leave it waiting for them)."""
    return [
        "timeout",
        "-s",
        "INT",
        "-k",
        "120",
        str(limit),
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(PROFILE),
        "--configfile",
        str(workdir / "config.yaml"),
    ]


def snakemake(workdir: Path, *args: str, limit: int = 900) -> str:
    """Run it to the end; returns its log (stdout and stderr)."""
    cmd = snakemake_cmd(workdir, *args, limit=limit)
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode in TIMED_OUT:
        pytest.fail(f"snakemake ran past {limit} s (rc {proc.returncode}):\n{proc.stdout[-8000:]}", pytrace=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-10000:]}"
    return proc.stdout


def write_config(workdir: Path, **classifier) -> None:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["classifier"].update(classifier)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def submitted(output: str) -> dict:
    """Slurm job id -> the Snakemake job behind it (rule, threads, resources, output, log), from the
    job descriptions snakemake logs and the plugin's "Job N has been submitted with SLURM jobid M"."""
    jobs, current = {}, None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            current = {"rule": m.group(1), "threads": 1, "resources": {}, "output": [], "log": []}
            continue
        m = re.match(r"^\s+(jobid|threads|resources|output|log): (.*)$", line) if current is not None else None
        if not m:
            continue
        key, value = m.groups()
        if key == "jobid":
            jobs[value.strip()] = current
        elif key == "threads":
            current["threads"] = int(value)
        elif key == "resources":
            current["resources"] = dict(kv.split("=", 1) for kv in value.split(", "))
        else:
            current[key] = [v.split(" (")[0] for v in value.split(", ")]
    return {
        slurm_id: jobs[sm_id]
        for sm_id, slurm_id in re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", output, re.M)
    }


def rule_of(comment: str) -> str:
    """The plugin submits with --comment rule_<name>[_wildcards_<values>]."""
    assert comment.startswith("rule_"), f"not a job of the Snakemake Slurm plugin: comment {comment!r}"
    return comment[len("rule_") :].split("_wildcards_")[0]


def sacct(ids, timeout: float = 60) -> dict:
    """Accounting records of ``ids`` (allocations only): id -> rule, state, partition, account, TRES.
    slurmdbd records asynchronously, so poll until every id is there in a final state."""
    ids = list(ids)
    assert ids, "no Slurm job ids to look up"
    fields = ["JobID", "Comment", "State", "Partition", "Account", "ReqTRES", "AllocTRES"]
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), f"--format={','.join(fields)}"],
            capture_output=True,
            text=True,
            env=clean_env(),
            check=True,
        ).stdout
        recs = {}
        for line in out.splitlines():
            row = dict(zip(fields, line.split("|")))
            row["State"] = row["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            row["rule"] = rule_of(row["Comment"])
            recs[row["JobID"]] = row
        if set(recs) >= set(ids) and all(r["State"] in FINAL_STATES for r in recs.values()):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct has no final record of jobs {ids} after {timeout} s:\n{out}")
        time.sleep(1)


def tres_mem_mb(tres: str) -> int:
    """The mem= entry of a TRES string ("cpu=1,mem=8000M,node=1") in MB."""
    m = re.search(r"(?:^|,)mem=(\d+(?:\.\d+)?)([KMGT]?)", tres)
    assert m, f"no mem in TRES {tres!r}"
    return round(float(m.group(1)) * {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024**2}[m.group(2)])


def profile_partitions() -> tuple:
    """The default partition of profiles/slurm-test and its per-rule ones."""
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    per_rule = {r: v["slurm_partition"] for r, v in prof.get("set-resources", {}).items() if "slurm_partition" in v}
    return prof["default-resources"]["slurm_partition"], per_rule


def one_job(jobs: dict, rule: str) -> dict:
    (job,) = [j for j in jobs.values() if j["rule"] == rule]
    return job


def output_named(job: dict, name: str) -> str:
    (path,) = [f for f in job["output"] if Path(f).name == name]
    return path


def assert_nothing_looks_complete(workdir: Path, model: Path) -> None:
    """After an interrupted job: no model file, and every CAM shard present carries complete=True
    (wsss.cams writes a shard under a temporary name and sets the attribute last)."""
    import h5py
    import numpy as np

    assert not model.exists(), f"{model} exists although training was cancelled"
    for shard in (workdir / "results").rglob("*.h5"):
        with h5py.File(shard, "r") as f:
            complete = f.attrs.get("complete", None)
        assert isinstance(complete, (bool, np.bool_)) and bool(complete), (
            f"{shard} sits at a final output path without complete=True (got {complete!r})"
        )


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="session")
def tiny_run(slurm, tmp_path_factory):
    """The tiny preset's DAG, once, through sbatch: (workdir, snakemake log, its jobs, sacct records)."""
    workdir = tmp_path_factory.mktemp("slurm-tiny")
    write_config(workdir)
    output = snakemake(workdir, *UNTIL, limit=1500)
    jobs = submitted(output)
    assert jobs, f"no job went through sbatch:\n{output[-5000:]}"
    return workdir, output, jobs, sacct(jobs)


def test_dag_runs_through_sbatch_with_what_each_job_asked_for(tiny_run):
    workdir, output, jobs, recs = tiny_run
    # one Slurm job per Snakemake job (all but the action-less `all`), each completed, outputs there
    expected = {k: v for k, v in job_counts(output).items() if k != "all"}
    assert GPU_RULES <= set(expected), expected
    got: dict = {}
    for r in recs.values():
        got[r["rule"]] = got.get(r["rule"], 0) + 1
    assert got == expected, (expected, recs)
    assert set(jobs) == set(recs)
    default_partition, partitions = profile_partitions()
    for jid, r in recs.items():
        job = jobs[jid]
        assert job["rule"] == r["rule"], (job, r)
        assert r["State"] == "COMPLETED", r
        for f in job["output"]:
            assert (workdir / f).exists(), f"{f} of {job['rule']} (Slurm job {jid}) is missing"
        assert r["Account"] == "ci", r
        assert r["Partition"] == partitions.get(r["rule"], default_partition), r
        gpus = int(job["resources"].get("gpu", 0))
        for tres in (r["ReqTRES"], r["AllocTRES"]):
            assert (f"gres/gpu={gpus}" in tres) if gpus else ("gres/gpu" not in tres), (jid, job, r)
            assert f"cpu={job['threads']}" in tres, (jid, job, r)  # threads -> --cpus-per-task
        assert tres_mem_mb(r["ReqTRES"]) == int(job["resources"]["mem_mb"]), (jid, job, r)  # mem_mb -> --mem
    # the rules' own request, not the profile's: training and CAM inference ask for one GPU
    gpu_rules = {r["rule"] for r in recs.values() if "gres/gpu=1" in r["AllocTRES"]}
    assert GPU_RULES <= gpu_rules and all(partitions.get(r) == "gpu" for r in GPU_RULES), gpu_rules


def test_deleting_a_final_output_reruns_only_its_stage(tiny_run):
    workdir, _, jobs, _ = tiny_run
    stats = workdir / output_named(one_job(jobs, "dataset_stats"), "stats.csv")
    stats.unlink()
    output = snakemake(workdir, *UNTIL)
    counts = job_counts(output)
    counts.pop("all", None)  # --until may leave the action-less target out of the table
    assert counts == {"dataset_stats": 1}, output[-5000:]
    recs = sacct(submitted(output))
    assert [(r["rule"], r["State"]) for r in recs.values()] == [("dataset_stats", "COMPLETED")], recs
    assert stats.exists()


def _squeue_job(rule: str) -> tuple:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, env=clean_env(), check=True
    ).stdout
    for line in out.splitlines():
        jid, comment, state = line.split("|")
        if comment.startswith("rule_") and rule_of(comment) == rule:
            return jid, state
    return None, None


def test_cancelled_training_leaves_no_complete_output_and_resumes(tiny_run, tmp_path):
    src, _, jobs, _ = tiny_run
    train = one_job(jobs, "train_classifier")
    model = tmp_path / output_named(train, "model.pt")
    work = model.parent / "work"
    rule_log = tmp_path / train["log"][0]
    # the finished run's data and results (mtimes kept), without its Slurm logs and locks
    for sub in ["data", "results", ".snakemake/metadata"]:
        shutil.copytree(src / sub, tmp_path / sub, symlinks=True)
    # eight epochs instead of two: a new config, so training reruns (from scratch: its work dir is
    # removed), with seven epochs (a few seconds even on a fast machine) between the first
    # checkpoint and the end to cancel it in
    write_config(tmp_path, epochs=8)
    shutil.rmtree(work)
    model.unlink()

    # first invocation: no retries, so the cancelled job fails the run instead of being resubmitted
    out_file = tmp_path / "first.out"
    with open(out_file, "w") as out:
        proc = subprocess.Popen(
            snakemake_cmd(tmp_path, "--until", "train_classifier", "--retries", "0", limit=600),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 540
        while not (work / "last.pt").exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"snakemake ended ({proc.returncode}) before the first checkpoint:\n{out_file.read_text()[-8000:]}",
                    pytrace=False,
                )
            assert time.monotonic() < deadline, f"no checkpoint after 540 s:\n{out_file.read_text()[-5000:]}"
            time.sleep(0.1)
        jid, state = _squeue_job("train_classifier")
        assert jid is not None and state == "RUNNING", (jid, state, out_file.read_text()[-5000:])
        assert not model.exists(), "training finished before it could be cancelled"
        subprocess.run(["scancel", jid], check=True, env=clean_env())
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a snakemake (and its jobs) behind
            proc.send_signal(2)
            proc.wait(timeout=180)
    first = out_file.read_text()
    assert rc != 0, f"snakemake succeeded although its training job was cancelled:\n{first[-5000:]}"
    assert job_counts(first) == {"train_classifier": 1}, first[-5000:]
    recs = sacct(submitted(first))
    assert [(r["rule"], r["State"]) for r in recs.values()] == [("train_classifier", "CANCELLED")], recs
    assert_nothing_looks_complete(tmp_path, model)
    assert (work / "last.pt").exists(), "the epoch checkpoint must survive the cancellation"

    # second invocation: resumes after the checkpointed epoch and finishes
    second = snakemake(tmp_path, "--until", "train_classifier", limit=600)
    recs = sacct(submitted(second))
    assert [(r["rule"], r["State"]) for r in recs.values()] == [("train_classifier", "COMPLETED")], recs
    assert model.exists()
    log = rule_log.read_text()
    m = re.search(r"resuming from \S+ after epoch \d+ \(step (\d+)\)", log)
    assert m, f"the rerun did not resume from the checkpoint:\n{log[-3000:]}"
    with open(work / "train_log.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert 0 < int(m.group(1)) < len(steps), (m.group(0), steps)
    assert steps == list(range(len(steps))), f"train_log.csv must hold every step once, in order: {steps}"
    # the declared copy next to the model (the rule's output) is the whole log, too
    assert (model.parent / "train_log.csv").read_text() == (work / "train_log.csv").read_text()
