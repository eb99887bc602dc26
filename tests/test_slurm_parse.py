"""SLURM's outputs read without a cluster (recorded squeue/sacct lines), array syntax, and the sbatch
command line and task script a submission would use (never run here)."""

from __future__ import annotations

import os
from pathlib import Path

from gridsearch.slurm.gateway import ArrayRequest, sbatch_argv, script
from gridsearch.slurm.parse import TaskState, compact, expand, merge, parse_sacct, parse_squeue, split
from gridsearch.spec import ExecutorSpec

SQUEUE = """\
239_[2-9%2]|239|239|2-9%2|PENDING|JobArrayTaskLimit|name
239_0|247|239|0|RUNNING|None|name
236_2|244|236|2|FAILED|NonZeroExitCode|name
238_1|238|238|1|FAILED|JobLaunchFailure|name
237|237|237|N/A|CANCELLED|DependencyNeverSatisfied|name
235_0|241|235|0|TIMEOUT|TimeLimit|name
"""
SACCT = """\
24_0|30|COMPLETED|0:0
24_2|32|FAILED|1:0
27_[2-9%2]|27|PENDING|0:0
27_0|35|CANCELLED by 0|0:0
"""


def test_parse_squeue_recorded_lines() -> None:
    s = parse_squeue(SQUEUE)
    assert s[("239", 5)] == TaskState("PENDING", "JobArrayTaskLimit", explicit=False)
    assert s[("239", 0)].live and s[("239", 0)].explicit
    assert s[("236", 2)].failed and not s[("236", 2)].dependency_failed
    assert s[("238", 1)].failed
    assert s[("237", None)].dependency_failed and s[("237", None)].failed
    assert s[("235", 0)].state == "TIMEOUT" and s[("235", 0)].failed
    assert ("239", 1) not in s


def test_parse_sacct_first_word_and_ranges() -> None:
    s = parse_sacct(SACCT)
    assert s[("24", 0)].ok
    assert s[("24", 2)].state == "FAILED"
    assert s[("27", 0)].state == "CANCELLED"  # 'CANCELLED by 0'
    assert s[("27", 9)] == TaskState("PENDING", "", explicit=False)


def test_merge_rules() -> None:
    sq = parse_squeue("239_[2-3]|239|239|2-3|PENDING|Dependency|n\n239_0|247|239|0|COMPLETED|None|n\n"
                      "237|237|237|N/A|CANCELLED|DependencyNeverSatisfied|n\n")
    # sacct listing an array as one COMPLETED plain job (right after submission): not trusted
    sa = parse_sacct("239|239|COMPLETED|0:0\n50_0|60|COMPLETED|0:0\n50_1|61|FAILED|1:0\n"
                     "51_0|70|COMPLETED|0:0\n")
    m = merge(sq, sa, {"239": [0, 1, 2, 3], "237": [0, 1], "50": [0, 1], "51": [0, 1], "99": [0]})
    assert m[("239", 0)].ok
    assert m[("239", 1)].state == "CANCELLED"  # left the range while the array is still shown
    assert m[("239", 2)].state == "PENDING"
    assert all(m[("237", i)].dependency_failed for i in (0, 1))  # a whole array cancelled as one row
    assert m[("50", 0)].ok and m[("50", 1)].state == "FAILED"  # squeue forgot them, sacct did not
    assert m[("51", 0)].state == "UNKNOWN"  # sacct lists only part of the array: not trusted
    assert m[("99", 0)].state == "UNKNOWN"


def test_array_syntax_split_and_script_have_no_secret(tmp_path: Path) -> None:
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert expand("[2-9%2]") == list(range(2, 10)) and expand("1,4-5") == [1, 4, 5]
    assert split(list(range(1, 2500)), 1001) == [
        (0, list(range(1, 1001))), (1001, list(range(0, 1001))), (2002, list(range(0, 498)))]
    os.environ["PGPASSWORD"] = "s3cret-value"
    try:
        spec = ExecutorSpec(kind="slurm", partition="debug", account="mylab", setup=["module load x"],
                            max_parallel=3, sbatch_args=["--qos=normal"])
        req = ArrayRequest("gs-x-link", "link", [0, 1, 2, 4], 1001, ["--stage", "link"], tmp_path,
                           tmp_path, after=["11", "12"])
        argv = sbatch_argv(req, spec)
        body = script(req, spec.setup)
    finally:
        del os.environ["PGPASSWORD"]
    assert "--array=0-2,4%3" in argv and "--dependency=afterok:11:12" in argv
    assert "--kill-on-invalid-dep=yes" in argv and "--partition=debug" in argv
    assert "--account=mylab" in argv and "--qos=normal" in argv
    assert "--time=01:00:00" in argv and f"--output={tmp_path}/link-%A_%a.log" in argv
    assert "module load x" in body and "$((SLURM_ARRAY_TASK_ID + 1001))" in body
    assert "s3cret" not in " ".join(argv) + body
    many = script(ArrayRequest("gs-x-link", "link", [0, 1], 3, [], tmp_path, per_task=4, last=9), [])
    assert "--batch $((SLURM_ARRAY_TASK_ID * 4 + 3)) --count 4 --last 9" in many


# What `status` reads: squeue -h -t all -o '%i|%A|%F|%K|%T|%r|%j' for the sweep's names (SLURM 22.05:
# a pending range as 1210_[3-9%4], each started task on its own line, a plain job as N/A).
QUEUE = """\
1200|1200|1200|N/A|PENDING|Priority|gs-t-abc123-driver
1201|1201|1201|N/A|RUNNING|None|gs-t-abc123-server
1210_[3-9%4]|1210|1210|3-9%4|PENDING|JobArrayTaskLimit|gs-t-abc123-segment
1210_0|1211|1210|0|RUNNING|None|gs-t-abc123-segment
1210_1|1212|1210|1|RUNNING|None|gs-t-abc123-segment
1210_2|1213|1210|2|COMPLETED|None|gs-t-abc123-segment
1214_[0-8%4]|1214|1214|0-8%4|PENDING|Dependency|gs-t-abc123-link
1220_[0-4,7]|1220|1220|0-4,7|PENDING|QOSMaxJobsPerUserLimit|gs-t-abc123-link
1220_5|1221|1220|5|PENDING|ReqNodeNotAvail, UnavailableNodes:node[01-02]|gs-t-abc123-link
1220_6|1222|1220|6|COMPLETING|None|gs-t-abc123-link
1190_0|1191|1190|0|COMPLETED|None|gs-t-abc123-solve
"""


def test_parse_queue_sums_each_jobs_live_tasks_with_reasons() -> None:
    from gridsearch.slurm.parse import QueuedJob, parse_queue

    jobs = {q.job_id: q for q in parse_queue(QUEUE)}
    assert list(jobs) == ["1200", "1201", "1210", "1214", "1220"]  # 1190 has only finished tasks
    assert jobs["1200"] == QueuedJob("1200", "gs-t-abc123-driver", False, {"PENDING": 1}, {"Priority": 1})
    assert jobs["1201"] == QueuedJob("1201", "gs-t-abc123-server", False, {"RUNNING": 1}, {})
    seg = jobs["1210"]
    assert seg.array and (seg.running, seg.pending) == (2, 7) and seg.reasons == {"JobArrayTaskLimit": 7}
    assert jobs["1214"].states == {"PENDING": 9} and jobs["1214"].reasons == {"Dependency": 9}
    link = jobs["1220"]
    assert link.states == {"PENDING": 7, "COMPLETING": 1}
    assert link.reasons == {"QOSMaxJobsPerUserLimit": 6, "ReqNodeNotAvail, UnavailableNodes:node[01-02]": 1}
    assert parse_queue("") == [] and parse_queue("garbage\n") == []
    assert parse_queue("7_[0-1]|7|7|0-1|PENDING|(Resources)|n\n")[0].reasons == {"Resources": 2}
