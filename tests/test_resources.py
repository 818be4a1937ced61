"""Resource requests: the helpers in wsss/workflow/resources.py and what every rule declares.

Rules state what a job needs (threads, mem_mb, runtime in minutes, and gpu=1 on training and
inference rules); a Slurm profile adds where it runs (profiles/slurm). The Slurm executor plugin
turns these into sbatch flags (threads -> --cpus-per-task, mem_mb -> --mem, runtime -> -t,
gpu -> --gpus), so a missing or misspelt resource silently becomes a wrong request:
`gpus=1` (plural) is ignored at submission and the job then fails on a node without a GPU.

Two sources are checked: the rule declarations themselves (the text of Snakefile and rules/*.smk,
the only place that says whether `threads:` was written), and the resources Snakemake evaluates
per job in dry-runs of the default DAG of each dataset, at `--attempt 1` and `--attempt 2`.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wsss.workflow import resources as res

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
ACTIONS = {"script", "shell", "run", "wrapper", "notebook", "cwl", "template_engine"}
# the env of training and inference jobs (envs/torch.yaml: classifier, CAMs, IRN, DeepLab)
GPU_ENV = "envs/torch.yaml"
# where a job runs is the profile's business, never a rule's (profiles/slurm/config.yaml)
SITE_RESOURCES = {
    "slurm_account",
    "slurm_partition",
    "gpu_model",
    "gres",
    "constraint",
    "qos",
    "slurm_extra",
    "cpus_per_task",
    "cpus_per_gpu",
    "mem_mb_per_cpu",
    "nodes",
    "tasks",
    "clusters",
}
# names Snakemake or the plugin would not read as a GPU request
GPU_MISSPELLINGS = {"gpus", "nvidia_gpu", "gpu_count", "num_gpus", "ngpus"}
DATASETS = ["synthetic", "voc12", "coco14"]


# ---------------------------------------------------------------- wsss/workflow/resources.py


def test_first_attempt_asks_for_the_base_value():
    assert res.scaled(8000, 1) == 8000
    assert res.scaled(240, 1, factor=2.0) == 240


def test_scaled_grows_with_every_attempt_and_rounds_up():
    mem = [res.scaled(8000, a) for a in range(1, 6)]
    assert mem == [8000, 12000, 18000, 27000, 40500]
    assert all(isinstance(v, int) for v in mem)
    assert res.scaled(3, 2) == 5  # 4.5 rounded up: never less than asked
    assert res.scaled(1001, 3) == 2253  # 2252.25 rounded up
    assert [res.scaled(60, a, factor=2.0) for a in (1, 2, 3)] == [60, 120, 240]


@pytest.mark.parametrize("attempt", [0, -1, -5])
def test_attempt_below_one_is_rejected(attempt):
    with pytest.raises(ValueError, match=f"attempt must be >= 1, got {attempt}"):
        res.scaled(1000, attempt)
    with pytest.raises(ValueError, match="attempt"):
        res.mem_mb(1000)(None, attempt)
    with pytest.raises(ValueError, match="attempt"):
        res.runtime(60)(None, attempt)


def test_resource_callables_grow_with_attempt():
    mem, runtime = res.mem_mb(8000), res.runtime(240)
    assert [mem(None, a) for a in (1, 2, 3)] == [8000, 12000, 18000]
    assert [runtime(None, a) for a in (1, 2, 3)] == [240, 480, 960]


@pytest.mark.parametrize("make", [res.mem_mb, res.runtime])
def test_resource_callables_take_only_arguments_snakemake_passes(make):
    """Snakemake calls resource functions by parameter name; other names raise at DAG time."""
    params = list(inspect.signature(make(100)).parameters)
    assert params[0] == "wildcards" and set(params) <= {"wildcards", "input", "threads", "attempt"}
    assert "attempt" in params


# ---------------------------------------------------------------- rule declarations (text)


@dataclass
class RuleDecl:
    name: str  # the rule name, or a regex for names built at parse time (f"download_{_archive}")
    where: str
    directives: dict = field(default_factory=dict)  # directive -> its text

    @property
    def has_action(self) -> bool:
        return bool(ACTIONS & set(self.directives))

    def resource_keys(self) -> dict:
        """``name -> expression`` of the resources: block."""
        body = self.directives.get("resources", "")
        return {m.group(1): m.group(2).strip().rstrip(",") for m in re.finditer(r"^\s*(\w+)\s*=\s*(.+)$", body, re.M)}

    def matches(self, rule_name: str) -> bool:
        return re.fullmatch(self.name, rule_name) is not None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def parse_rules(path: Path) -> list:
    """Every ``rule``/``checkpoint`` block of a (snakefmt-formatted) Snakemake file, with its
    directives. An anonymous ``rule:`` takes its name from its ``name:`` directive; an f-string
    name becomes a regex with ``.+`` for each ``{...}``."""
    lines = path.read_text().splitlines()
    decls = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:rule|checkpoint)(?:\s+(\w+))?\s*:\s*$", line)
        if not m:
            continue
        indent = _indent(line)
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and _indent(nxt) <= indent:
                break
            block.append(nxt)
        body = [b for b in block if b.strip() and not b.strip().startswith("#")]
        if not body:
            continue
        dir_indent = _indent(body[0])
        directives, current = {}, None
        for b in body:
            dm = re.match(r"^(\w+):\s*(.*)$", b.strip()) if _indent(b) == dir_indent else None
            if dm:
                current = dm.group(1)
                directives[current] = dm.group(2)
            elif current is not None:
                directives[current] += "\n" + b
        name = m.group(2)
        if name is None:
            raw = directives.get("name", "").strip()
            sm = re.fullmatch(r"""f?(["'])(.+)\1""", raw)
            assert sm, f"{path.name}:{i + 1}: anonymous rule without a readable name: directive ({raw!r})"
            name = sm.group(2)
            name = re.escape(re.sub(r"\{[^}]*\}", "\0", name)).replace("\0", ".+")
        decls.append(RuleDecl(name, f"{path.relative_to(REPO)}:{i + 1}", directives))
    return decls


@pytest.fixture(scope="module")
def declared() -> list:
    decls = [d for f in RULE_FILES for d in parse_rules(f)]
    assert decls, "no rules found"
    return decls


def test_rule_parser_reads_a_known_rule(declared):
    """The parser itself: train_classifier as written in rules/classifier.smk."""
    (train,) = [d for d in declared if d.name == "train_classifier"]
    assert train.has_action and train.directives["threads"].strip().isdigit()
    keys = train.resource_keys()
    assert (
        keys["gpu"] == "1" and keys["mem_mb"].startswith("res.mem_mb(") and keys["runtime"].startswith("res.runtime(")
    )
    assert "../envs/torch.yaml" in train.directives["conda"]
    downloads = [d for d in declared if d.matches("download_voc2012_trainval")]
    assert len(downloads) == 1 and downloads[0].name != "download_voc2012_trainval"


def test_every_rule_declares_threads_mem_and_runtime(declared):
    missing = []
    for d in declared:
        if not d.has_action:
            continue  # e.g. `all`: never submitted as a job
        keys = d.resource_keys()
        lacks = [k for k in ("threads",) if k not in d.directives] + [k for k in ("mem_mb", "runtime") if k not in keys]
        if lacks:
            missing.append(f"{d.where} rule {d.name}: no {', '.join(lacks)}")
    assert not missing, "\n".join(missing)


def test_memory_and_runtime_grow_with_attempt_in_every_rule(declared):
    """Also rules outside the default DAGs (checked numerically below): mem_mb and runtime must be
    functions of `attempt` -- the helpers of wsss/workflow/resources.py, or an expression using it."""
    constant = []
    for d in declared:
        keys = d.resource_keys()
        for k, helper in (("mem_mb", "res.mem_mb("), ("runtime", "res.runtime(")):
            if d.has_action and k in keys and not (keys[k].startswith(helper) or "attempt" in keys[k]):
                constant.append(f"{d.where} rule {d.name}: {k}={keys[k]} (use {helper}...))")
    assert not constant, "\n".join(constant)


def test_training_and_inference_rules_request_gpu_1(declared):
    torch_rules = [d for d in declared if d.has_action and GPU_ENV in d.directives.get("conda", "")]
    assert {"train_classifier", "cam_shard"} <= {d.name for d in torch_rules}
    wrong = [
        f"{d.where} rule {d.name}: gpu={d.resource_keys().get('gpu')}"
        for d in torch_rules
        if d.resource_keys().get("gpu") != "1"
    ]
    assert not wrong, "rules in the torch env must declare resources gpu=1:\n" + "\n".join(wrong)


def test_no_rule_misspells_gpu_or_sets_site_resources(declared):
    bad = []
    for d in declared:
        keys = set(d.resource_keys())
        if keys & GPU_MISSPELLINGS:
            bad.append(f"{d.where} rule {d.name}: {sorted(keys & GPU_MISSPELLINGS)} (the resource is `gpu`)")
        if keys & SITE_RESOURCES:
            bad.append(f"{d.where} rule {d.name}: {sorted(keys & SITE_RESOURCES)} belong in profiles/slurm")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- evaluated per job (dry-runs)


def dry_run(workdir: Path, dataset: str, attempt: int) -> dict:
    """``rule -> [resources of each job]`` of the default DAG, as ``snakemake -n`` prints them.
    No profile applies (--workflow-profile none, SNAKEMAKE_PROFILE unset): the rules' own requests."""
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--attempt",
        str(attempt),
        "--workflow-profile",
        "none",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--config",
        f"dataset={{name: {dataset}}}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    jobs: dict = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule is not None:
            jobs.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in m.group(1).split(", ")))
            rule = None
    assert jobs, f"no jobs in the dry-run of {dataset}:\n{proc.stdout[-3000:]}"
    return jobs


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    """``(dataset, attempt) -> rule -> [resources]``; six dry-runs, three at a time."""
    keys = [(d, a) for d in DATASETS for a in (1, 2)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(dry_run, tmp_path_factory.mktemp(f"dry-{k[0]}-{k[1]}"), *k) for k in keys}
        return {k: f.result() for k, f in futures.items()}


def _action_rules(declared, rule: str) -> bool:
    return any(d.matches(rule) and d.has_action for d in declared)


def test_every_job_requests_memory_and_runtime(evaluated, declared):
    bad = []
    for (dataset, attempt), jobs in evaluated.items():
        for rule, reqs in jobs.items():
            if not _action_rules(declared, rule):
                continue
            for r in reqs:
                for k in ("mem_mb", "runtime"):
                    if not r.get(k, "").isdigit() or int(r[k]) <= 0:
                        bad.append(f"{dataset} attempt {attempt}: {rule} {k}={r.get(k)}")
    assert not bad, "\n".join(bad)


def test_second_attempt_asks_for_more_memory_and_time(evaluated, declared):
    """`--retries` only helps a job killed for memory or time if the retry asks for more."""
    bad, seen = {}, set()
    for dataset in DATASETS:
        first, second = evaluated[(dataset, 1)], evaluated[(dataset, 2)]
        assert set(first) == set(second), (dataset, set(first) ^ set(second))
        for rule in first:
            if not _action_rules(declared, rule):
                continue
            seen.add(rule)
            for r1, r2 in zip(first[rule], second[rule]):
                for k in ("mem_mb", "runtime"):
                    if not int(r2[k]) > int(r1[k]):
                        bad[(rule, k)] = f"{rule}: {k} {r1[k]} at attempt 1, {r2[k]} at attempt 2"
    assert {"train_classifier", "cam_shard"} <= seen
    assert not bad, "use res.mem_mb(...) / res.runtime(...) of wsss/workflow/resources.py in:\n" + "\n".join(
        sorted(bad.values())
    )


def test_jobs_request_gpu_1_exactly_where_declared_and_no_site_settings(evaluated, declared):
    bad = []
    for (dataset, attempt), jobs in evaluated.items():
        for rule, reqs in jobs.items():
            torch = any(d.matches(rule) and GPU_ENV in d.directives.get("conda", "") for d in declared)
            for r in reqs:
                if torch and r.get("gpu") != "1":
                    bad.append(f"{dataset}: {rule} (torch env) gpu={r.get('gpu')}")
                if set(r) & (GPU_MISSPELLINGS | SITE_RESOURCES):
                    bad.append(f"{dataset}: {rule} has {sorted(set(r) & (GPU_MISSPELLINGS | SITE_RESOURCES))}")
    assert not bad, "\n".join(bad)
    gpu_jobs = {rule for jobs in evaluated.values() for rule, reqs in jobs.items() if any("gpu" in r for r in reqs)}
    assert {"train_classifier", "cam_shard"} <= gpu_jobs
