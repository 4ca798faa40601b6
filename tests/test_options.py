"""Options: one set of frozen dataclasses, built alike from CLI flags and LocalCluster keywords, each
value checked with an error that names it; the old names of the CPU/GPU offload (split_mode,
split_ratio, --split-mode, --split-ratio, stats["split_..."]) still work and say they are
deprecated."""

from __future__ import annotations

import dataclasses

import pytest

from launcher.cli import build_parser, comm_options, rank_options
from tpi.config import ConfigError
from tpi.options import (
    Collective,
    CommOptions,
    MemoryOptions,
    OffloadMode,
    OffloadOptions,
    PayloadName,
    RankOptions,
    choices,
    from_keywords,
)
from tpi.stats import RankStats

pytestmark = pytest.mark.unit


def test_the_cli_and_the_keywords_build_the_same_options():
    args = build_parser().parse_args(["run", "--prompt", "x", "--threads", "2", "--memory-budget", "1GB", "--window",
                                      "3", "--device", "cpu", "--offload-mode", "rows", "--offload-share", "0.25",
                                      "--collective", "ring", "--payload", "bfloat16", "--step-timeout", "9"])
    ranks, comm = from_keywords(3, threads=2, memory_budget="1GB", window=3, offload_mode="rows", offload_share=0.25,
                                collective="ring", payload="bfloat16", step_timeout=9.0)
    assert rank_options(args) == ranks[0] == ranks[2]
    assert comm_options(args, "run") == comm
    assert rank_options(args).offload == OffloadOptions("cpu", None, "rows", 0.25)


def test_value_sets_are_the_literal_types():
    parser = build_parser()
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["serve"]._actions}
    assert tuple(actions["collective"].choices) == choices(Collective) == ("star", "ring", "tree", "gloo", "auto")
    assert tuple(actions["payload"].choices) == choices(PayloadName)
    assert tuple(actions["offload_mode"].choices) == choices(OffloadMode) == ("blocks", "rows")


def test_a_budget_per_rank():
    ranks, _ = from_keywords(3, memory_budget=["1GB", None, "2GiB"])
    assert [r.memory.budget_bytes for r in ranks] == [10**9, None, 2 << 30]
    with pytest.raises(ConfigError, match=r"memory_budget has 2 values; expected one per rank, 3"):
        from_keywords(3, memory_budget=["1GB", "1GB"])


@pytest.mark.parametrize("build,match", [
    (lambda: MemoryOptions(memory_budget="lots"), "memory_budget='lots'"),
    (lambda: MemoryOptions(window=0), "window=0"),
    (lambda: OffloadOptions(device="tpu"), "device='tpu'"),
    (lambda: OffloadOptions(mode="cols"), "offload_mode='cols': expected one of blocks, rows"),
    (lambda: OffloadOptions(share=1.5), "offload_share=1.5"),
    (lambda: OffloadOptions(gpu_memory_budget="x"), "gpu_memory_budget='x'"),
    (lambda: CommOptions(collective="mesh"), "collective='mesh': expected one of star, ring, tree, gloo, auto"),
    (lambda: CommOptions(payload="q4"), "payload='q4'"),
    (lambda: CommOptions(collective="gloo", payload="q8"), "q8 cannot be summed by gloo"),
    (lambda: CommOptions(step_timeout=0), "step_timeout=0"),
    (lambda: RankOptions(threads=0), "threads=0"),
    (lambda: RankOptions(max_context=0), "max_context=0"),
    (lambda: from_keywords(1, thread=2), "unknown option 'thread'"),
])
def test_bad_values_are_refused_by_name(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RankOptions().threads = 4


def test_old_offload_names_still_work_and_say_they_are_deprecated(capsys):
    with pytest.warns(DeprecationWarning) as warned:
        ranks, _ = from_keywords(1, split_mode="rows", split_ratio=0.3)
    assert [str(w.message) for w in warned] == ["split_mode is deprecated: use offload_mode",
                                                "split_ratio is deprecated: use offload_share"]
    assert ranks[0].offload.mode == "rows" and ranks[0].offload.share == 0.3
    args = build_parser().parse_args(["run", "--prompt", "x", "--split-mode", "rows", "--split-ratio", "0.4"])
    assert rank_options(args).offload.mode == "rows" and rank_options(args).offload.share == 0.4
    assert "--split-ratio is deprecated: use --offload-share" in capsys.readouterr().err
    stats = RankStats(0, 1, 1, 0, 0.0, 0.0, 0, 0, 0, 0.0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1,
                      offload_mode="rows", offload_share=0.4, offload_tune_s=2.0)
    with pytest.warns(DeprecationWarning):
        assert stats["split_ratio"] == 0.4 and stats["split_mode"] == "rows" and stats["split_tune_s"] == 2.0
    assert RankStats.from_wire(stats.to_wire()) == stats
    with pytest.raises(ValueError, match="stats: peak_rss_bytes='x': expected int"):
        RankStats.from_wire({**stats.to_wire(), "peak_rss_bytes": "x"})
