"""Pipeline schedules, the simulator against [V3] Table 2, and the multi-process executor."""

import json
import multiprocessing
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from dsv3lite.pipeline import (Op, Schedule, build_schedule, cal_diff, check, run_pipeline,
                               simulate, table2, table2_bubble)
from dsv3lite.pipeline.__main__ import main
from dsv3lite.pipeline.check import (GRAD_COS_DIFF_MAX, check_args, make_microbatches,
                                     make_model)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "dualpipe_orders.json"
OFFICIAL = json.loads(FIXTURE.read_text())


def _official_mismatches(case: str) -> list[str]:
    """Where our schedule differs from the order recorded from deepseek-ai/DualPipe's own
    step() for ``case`` ('<name>:<ranks>:<micro-batches>'), training and forward-only."""
    name, ranks, mb = case.split(":")
    s = build_schedule(name, int(ranks), int(mb))
    want = OFFICIAL["cases"][case]
    found = []
    for r in range(s.n_ranks):
        if [op.key() for op in s.orders[r]] != want["train"][r]:
            found.append(f"rank {r} train")
        if s.part_keys(r, forward_only=True) != want["forward_only"][r]:
            found.append(f"rank {r} forward-only")
    return found


def test_official_orders_fixture_says_where_it_came_from():
    assert OFFICIAL["repository"] == "https://github.com/deepseek-ai/DualPipe"
    assert OFFICIAL["commit"] == "3da1bbea53606543d7f5f232338fc58096db30e3"
    assert OFFICIAL["script"] == "tests/fixtures/make_dualpipe_orders.py"
    assert (FIXTURE.parent / "make_dualpipe_orders.py").exists()
    cases = {tuple(k.split(":")[:2]) for k in OFFICIAL["cases"]}
    assert {("dualpipe", str(r)) for r in (2, 4, 6, 8, 10)} <= cases
    assert {("dualpipev", str(r)) for r in range(1, 9)} <= cases
    assert FIXTURE.stat().st_size < 1_000_000


@pytest.mark.parametrize("case", sorted(OFFICIAL["cases"]))
def test_dualpipe_orders_equal_the_official_code(case):
    """Every rank's op list, op for op (pairs, deferred W's, micro-batches, stages), is
    the one deepseek-ai/DualPipe's step() ran; and its forward-only step's forwards."""
    assert _official_mismatches(case) == []


def test_official_order_comparison_fails_on_a_wrong_schedule(monkeypatch):
    """Two plausible mistakes, each caught: deferred W's run newest first instead of
    FIFO, and the middle ranks' first main-phase step paired like the others."""
    from dsv3lite.pipeline import schedules

    def lifo(self):
        b = self.deferred.pop()
        self.order.append(Op("W", b.direction, b.microbatch, b.stage, b.batch))

    with monkeypatch.context() as m:
        m.setattr(schedules._RankBuilder, "weight", lifo)
        assert _official_mismatches("dualpipe:8:20") != []
        assert _official_mismatches("dualpipev:4:20") != []
    phases = schedules._dualpipe_phases
    monkeypatch.setattr(schedules, "_dualpipe_phases",
                        lambda rb, *a, unpaired_first: phases(rb, *a, unpaired_first=False))
    assert _official_mismatches("dualpipe:4:10") == ["rank 1 train", "rank 2 train"]
    assert _official_mismatches("dualpipev:2:4") == ["rank 1 train"]


def test_op_keys_name_what_each_op_computes():
    s = build_schedule("dualpipe", 4, 10)
    assert [op.key() for op in s.orders[0][:7]] == [
        "F:s0:m0", "F:s0:m1", "F:s0:m2", "F:s3:m5", "B:s3:m5:zb", "W:s3:m5", "F:s3:m6"]
    assert s.orders[0][7].key() == "FB(F:s0:m3|B:s3:m6)"
    assert s.part_keys(0)[7:9] == ["F:s0:m3", "B:s3:m6"]
    assert all(k.startswith("F:") for k in s.part_keys(0, forward_only=True))


CASES = [("1f1b", 1, 3), ("1f1b", 4, 8), ("zb1p", 4, 7), ("zb1p", 3, 3), ("dualpipe", 2, 4),
         ("dualpipe", 4, 10), ("dualpipe", 8, 20), ("dualpipe", 6, 14), ("dualpipev", 1, 2),
         ("dualpipev", 3, 7), ("dualpipev", 4, 20)]


@pytest.mark.parametrize("name, ranks, mb", CASES)
def test_every_microbatch_runs_F_then_B_then_W_once_per_stage(name, ranks, mb):
    s = build_schedule(name, ranks, mb)
    seen = {}
    for rank, order in enumerate(s.orders):
        for pos, op in enumerate(order):
            for part in op.parts():
                key = (part.kind, part.batch, part.stage)
                assert key not in seen, f"{key} runs twice"
                seen[key] = (rank, pos, part)
                assert part.stage in s.stages_of(rank)
                assert s.stage_rank(part.stage, part.batch) == rank
    for b in range(mb):
        for stage in range(s.n_stages):
            rank_f, pos_f, _ = seen[("F", b, stage)]
            rank_b, pos_b, b_op = seen[("B", b, stage)]
            assert rank_f == rank_b and pos_f <= pos_b  # <=: an FB pair holds both
            if b_op.split:
                rank_w, pos_w, _ = seen[("W", b, stage)]
                assert rank_w == rank_b and pos_w > pos_b
            else:
                assert ("W", b, stage) not in seen
    n_w = sum(k[0] == "W" for k in seen)
    assert len(seen) == 2 * mb * s.n_stages + n_w
    if name == "1f1b":
        assert n_w == 0
    # cross-rank dependencies: the simulator finds an order that respects them all
    # (it raises on a deadlock), and no op starts before its input exists
    t = simulate(s)
    end = {(p.kind, p.batch, p.stage): e.end for e in t.events for p in e.op.parts()}
    for e in t.events:
        for p in e.op.parts():
            if p.kind == "F" and p.stage > 0:
                assert e.start >= end[("F", p.batch, p.stage - 1)]
            if p.kind == "B" and p.stage < s.n_stages - 1:
                assert e.start >= end[("B", p.batch, p.stage + 1)]


def test_zero_bubble_W_runs_in_fifo_order():
    for name, ranks, mb in CASES:
        for order in build_schedule(name, ranks, mb).orders:
            split = [(op.batch, op.stage) for o in order for op in o.parts()
                     if op.kind == "B" and op.split]
            ws = [(op.batch, op.stage) for op in order if op.kind == "W"]
            assert ws == split


def test_dualpipe_pairs_never_defer_W():
    for name in ("dualpipe", "dualpipev"):
        for order in build_schedule(name, 4, 20).orders:
            assert all(not op.backward.split for op in order if op.kind == "FB")


@pytest.mark.parametrize("args, message", [
    (("dualpipe", 3, 12), "n_ranks=3 is invalid"),
    (("dualpipe", 4, 6), "n_microbatches=6 is invalid"),
    (("dualpipe", 4, 9), "n_microbatches=9 is invalid"),
    (("dualpipev", 2, 3), ">= 2 * n_ranks = 4"),
    (("1f1b", 4, 3), "n_microbatches=3 is invalid"),
    (("gpipe", 4, 8), "name='gpipe' is invalid"),
    (("zb1p", 0, 8), "n_ranks=0 is invalid"),
    (("zb1p", 2.0, 8), "n_ranks=2.0 is invalid"),
])
def test_bad_schedule_arguments_say_what_is_allowed(args, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        build_schedule(*args)


# ------------------------------------------------------------------- [V3] Table 2
@pytest.mark.parametrize("pp", [4, 8, 16])
def test_simulator_reproduces_table2_at_the_papers_costs(pp):
    """F = W = B/2 (a split backward-for-input costs what F and W cost): every formula
    of [V3] Table 2 holds on every rank."""
    for row in table2(pp, n_microbatches=2 * pp + 4):
        assert row["idle_min"] == row["idle_max"] == row["bubble_formula"], row
        assert row["peak_activations"] == row["activations_formula"], row
        assert row["param_copies"] == (2 if row["method"].startswith("dual") else 1)
        assert row["devices"] == (pp // 2 if row["method"] == "dualpipev" else pp)


@pytest.mark.parametrize("FB", [3.0, 2.5, 2.0])
def test_dualpipe_bubble_formula_is_the_middle_ranks_when_pairs_overlap(FB):
    """With F&B < F + B the outer ranks idle less than (PP/2−1)(F&B+B−3W); the middle
    ranks, which wait longest for the two directions to meet, idle exactly that."""
    pp = 8
    for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
        t = simulate(build_schedule(name, ranks, 20), 1.0, 2.0, 1.0, FB)
        formula = table2_bubble(name, pp, 1.0, 2.0, 1.0, FB)
        middle = ranks // 2 - 1 if name == "dualpipe" else ranks - 1
        assert max(t.idle) == pytest.approx(formula) == pytest.approx(t.idle[middle])
        assert min(t.idle) < formula or FB == 3.0


def test_1f1b_bubble_formula_holds_for_any_costs():
    for F, B in ((1.0, 2.0), (1.3, 2.9), (0.5, 0.7)):
        t = simulate(build_schedule("1f1b", 6, 13), F, B, 0.0)
        assert t.idle == pytest.approx([5 * (F + B)] * 6)
        assert t.makespan == pytest.approx((13 + 5) * (F + B))


GRID = [(F, B, W) for F in (0.5, 1.0, 1.5, 2.0) for B in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
        for W in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0) if W <= B]


def _formula_holds(name: str, ranks: int, mb: int, pp: int, costs) -> tuple[bool, bool]:
    """(the formula is the largest bubble, it is every rank's bubble)."""
    t = simulate(build_schedule(name, ranks, mb), *costs)
    f = table2_bubble(name, pp, *costs)
    return (max(t.idle) == pytest.approx(f, abs=1e-9),
            max(t.idle) - min(t.idle) == pytest.approx(0, abs=1e-9))


def test_zb1p_formula_holds_whenever_a_W_fits_the_gaps():
    """ZB1P's (PP−1)(F+B−2W) is every rank's bubble exactly when W <= F and
    W <= B − W, not only at 1:2:1; beyond that a W no longer fits the gap it fills."""
    for costs in GRID:
        F, B, W = costs
        for pp, mb in ((4, 9), (8, 20)):
            holds, even = _formula_holds("zb1p", pp, mb, pp, costs)
            assert (holds and even) == (W <= F and W <= B - W), (costs, pp)


def test_dualpipe_formula_needs_the_input_backward_to_cost_a_forward():
    """DualPipe's (PP/2−1)(F&B+B−3W), with F&B = F + B, is the simulated bubble of
    every rank when B − W = F and W <= F (1:2:1 is one such point; B = F with W = 0
    another), and of no rank otherwise, on this grid: far narrower than ZB1P's."""
    for costs in GRID:
        F, B, W = costs
        for name, ranks, pp in (("dualpipe", 8, 8), ("dualpipe", 4, 4), ("dualpipev", 4, 8)):
            holds, even = _formula_holds(name, ranks, 20, pp, costs)
            assert holds == (B - W == F and W <= F), (costs, name, ranks)
            assert even or not holds


def test_dualpipe_outer_ranks_pair_less_and_idle_less_when_pairs_overlap():
    """At 8 ranks and 20 micro-batches the outer ranks run the fewest F&B pairs; when a
    pair costs less than F + B they are busy longer, so they idle less."""
    s = build_schedule("dualpipe", 8, 20)
    assert [sum(op.kind == "FB" for op in o) for o in s.orders] == [9, 10, 11, 11, 11, 11, 10, 9]
    idle = simulate(s, 1.0, 2.0, 1.0, FB=2.5).idle
    assert idle[0] < idle[1] < idle[3] and idle == idle[::-1]


def test_deferred_W_memory_is_counted():
    """A deferred W keeps its Linears' inputs alive after its B freed the rest: 1F1B
    defers none, ZB1P's rank r holds r + 1 at once, DualPipe's middle ranks the most."""
    peak = {n: simulate(build_schedule(n, 8 if n != "dualpipev" else 4, 20)).peak_deferred_w
            for n in ("1f1b", "zb1p", "dualpipe", "dualpipev")}
    assert peak["1f1b"] == [0] * 8
    assert peak["zb1p"] == list(range(1, 9))
    assert peak["dualpipe"] == [1, 2, 3, 4, 4, 3, 2, 1]
    assert peak["dualpipev"] == [1, 2, 3, 4]


def test_dualpipe_bubble_does_not_grow_with_microbatches():
    idles = {mb: simulate(build_schedule("dualpipe", 8, mb)).idle for mb in (16, 24, 40)}
    assert idles[16] == idles[24] == idles[40]
    peaks = {mb: simulate(build_schedule("dualpipe", 8, mb)).peak_activations
             for mb in (16, 40)}
    assert peaks[16] == peaks[40] == [9] * 8


def test_dualpipe_hides_all_to_all_that_1f1b_pays_for():
    """comm = F: a lone chunk waits for its all-to-all, a pair overlaps it ([V3] Fig. 4)."""
    grow = {}
    for name in ("1f1b", "dualpipe"):
        base = simulate(build_schedule(name, 8, 20)).makespan
        grow[name] = simulate(build_schedule(name, 8, 20), comm=1.0).makespan - base
    # 1F1B pays it twice per micro-batch (its F and its B) on the critical path
    assert grow["1f1b"] >= 2 * 20 * 1.0
    assert grow["dualpipe"] < 0.5 * grow["1f1b"]


def test_simulator_rejects_bad_costs_and_detects_deadlock():
    s = build_schedule("1f1b", 2, 2)
    with pytest.raises(ValueError, match="F=-1"):
        simulate(s, F=-1)
    with pytest.raises(ValueError, match="W=3"):
        simulate(s, W=3)
    # rank 0 waits for a backward before running the forward it depends on
    bad = Schedule("1f1b", 2, 1, 2, ((Op("B", 0, 0, 0, 0), Op("F", 0, 0, 0, 0)),
                                     (Op("F", 0, 0, 1, 0), Op("B", 0, 0, 1, 0))))
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(bad)


# --------------------------------------------------------------------- executor
# Every schedule runs at its smallest size, and zb1p also with a middle rank (neither
# first nor last). The larger cases take 8-11 s each on a 2-core CPU and run with
# `make test SLOW=1`; chapter 6 also runs DualPipe on four processes in every book build.
_larger = pytest.mark.slow
EXECUTOR_CASES = [("1f1b", 2, 4), pytest.param("1f1b", 3, 4, marks=_larger),
                  ("zb1p", 2, 4), ("zb1p", 3, 4),
                  ("dualpipe", 2, 4), pytest.param("dualpipe", 4, 8, marks=_larger),
                  ("dualpipev", 1, 2), ("dualpipev", 2, 4),
                  pytest.param("dualpipev", 3, 6, marks=_larger)]


@pytest.mark.parametrize("name, ranks, mb", EXECUTOR_CASES)
def test_executor_step_equals_single_process_step(name, ranks, mb):
    report = check(name, ranks, mb)
    assert report.losses_bitwise_equal
    assert report.max_grad_cal_diff < GRAD_COS_DIFF_MAX == 1e-13  # [DP] examples' bound
    assert report.forward_only_losses_bitwise_equal
    assert report.trace_matches_schedule
    assert report.biases_equal and report.counts_equal
    result = report.pipeline
    # the trace is what ran: every part of the schedule, once, on the data it names
    assert result.trace_keys() == [result.schedule.part_keys(r) for r in range(ranks)]
    assert result.weight_grads_left == [0] * ranks
    # the bias update really moved the biases, from counts the ranks summed
    assert any(b.abs().sum() > 0 for b in result.biases.values())
    assert sum(float(c.sum()) for c in result.counts.values()) > 0
    # zero-bubble schedules really deferred Linear weight gradients to their W ops
    n_w = [sum(op.kind == "W" for op in order) for order in result.schedule.orders]
    assert [len(w) for w in result.weight_grads_per_w] == n_w
    assert all(n > 0 for w in result.weight_grads_per_w for n in w)
    if name != "1f1b":
        assert sum(n_w) > 0


def test_trace_records_what_ran_so_a_skipped_op_fails_the_check():
    """The executor passes over one W as if it had run it (the op list it looped over is
    unchanged): the recorded trace lacks that W, its group of weight gradients is left
    over, and the check fails; the losses, from the forwards, cannot see it."""
    schedule = build_schedule("dualpipev", 1, 2)
    at = next(i for i, op in enumerate(schedule.orders[0]) if op.kind == "W")
    report = check("dualpipev", 1, 2, fault={"rank": 0, "at_op": at, "kind": "skip"})
    assert not report.trace_matches_schedule and not report.ok
    assert report.losses_bitwise_equal
    assert report.max_grad_cal_diff > GRAD_COS_DIFF_MAX
    result = report.pipeline
    assert result.orders == schedule.order_strings()  # the list it looped over: intact
    skipped = schedule.orders[0][at].key()
    assert result.trace_keys()[0] == [k for k in schedule.part_keys(0) if k != skipped]
    assert result.weight_grads_left == [1]
    with pytest.raises(ValueError, match="rank 0 ran other work"):
        result.timeline()


def test_trace_check_compares_micro_batches_and_stages():
    """trace_matches_schedule compares what each part computed on: a trace whose W
    names the wrong micro-batch, or whose B did not defer, fails."""
    from dataclasses import replace

    from dsv3lite.pipeline.check import trace_matches_schedule
    from dsv3lite.pipeline.executor import Executed, PipelineResult

    s = build_schedule("dualpipev", 1, 2)
    exact = [[Executed(p.kind, p.stage, p.batch, p.kind == "B" and p.split)
              for op in s.orders[0] for p in op.parts()]]
    forward = [[e for e in exact[0] if e.kind == "F"]]

    def result(trace):
        return PipelineResult([], {}, {}, {}, trace, s.order_strings(), s,
                              forward_only_losses=[], forward_only_trace=forward,
                              weight_grads_left=[0])

    assert trace_matches_schedule(result(exact))
    w = next(i for i, e in enumerate(exact[0]) if e.kind == "W")
    assert not trace_matches_schedule(result([exact[0][:w] + [replace(exact[0][w], batch=0)]
                                              + exact[0][w + 1:]]))
    b = next(i for i, e in enumerate(exact[0]) if e.deferred)
    assert not trace_matches_schedule(result([exact[0][:b] + [replace(exact[0][b],
                                              deferred=False)] + exact[0][b + 1:]]))


def test_cal_diff():
    x = torch.randn(1000, dtype=torch.float64)
    assert cal_diff(x, x) == 0.0
    assert cal_diff(x, -x) == pytest.approx(2.0)
    assert 0 < cal_diff(x, x * (1 + 1e-6)) < 1e-12
    assert cal_diff(torch.zeros(3), torch.zeros(3)) == 0.0


def test_executor_fails_fast_naming_the_failed_rank():
    args = check_args(2, 0)
    model, mbs = make_model(args), make_microbatches(args, 4)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank 1 failed .*injected fault"):
        run_pipeline(build_schedule("1f1b", 2, 4), model, mbs, timeout_s=30,
                     fault={"rank": 1, "at_op": 1, "kind": "raise"})
    assert time.perf_counter() - start < 30


def test_executor_stops_a_hung_rank_and_names_it():
    args = check_args(4, 0)
    model, mbs = make_model(args), make_microbatches(args, 4)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_pipeline(build_schedule("dualpipev", 2, 4), model, mbs, timeout_s=4,
                     fault={"rank": 1, "at_op": 2, "kind": "hang"})
    assert time.perf_counter() - start < 60
    assert "rank 1" in str(info.value) and "Timed out" in str(info.value)
    assert not multiprocessing.active_children(), "a rank process was left behind"


def test_executor_rejects_a_model_too_shallow_for_the_stages():
    args = check_args(2, 0).replace(n_layers=2)
    with pytest.raises(ValueError, match="n_layers=2 is invalid"):
        run_pipeline(build_schedule("dualpipev", 2, 4), make_model(args),
                     make_microbatches(args, 4))


# -------------------------------------------------------------------------- CLI
def test_cli_simulate_json(capsys):
    assert main(["simulate", "--schedule", "dualpipe", "--ranks", "8", "--microbatches", "20",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schedule"] == "dualpipe" and data["ranks"] == 8
    assert data["idle"] == [6.0] * 8 and data["peak_activations"] == [9] * 8
    assert data["param_copies"] == 2 and len(data["orders"]) == 8
    assert data["orders"][0][:3] == ["F0:0", "F0:1", "F0:2"]


def test_cli_check_json():
    proc = subprocess.run([sys.executable, "-m", "dsv3lite.pipeline", "check", "--schedule",
                           "dualpipev", "--ranks", "1", "--microbatches", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["losses_bitwise_equal"] and data["trace_matches_schedule"]
    assert data["forward_only_losses_bitwise_equal"] and data["ok"]
    assert data["biases_equal"] and data["max_grad_cal_diff"] < 1e-13


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--schedule", "dualpipe", "--ranks", "3", "--microbatches", "8"],
     "--ranks=3 is invalid"),
    (["check", "--schedule", "zb2p", "--ranks", "2", "--microbatches", "8"],
     "--schedule='zb2p' is invalid"),
    (["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--F", "-1"],
     "F=-1.0 is invalid"),
    (["simulate", "--schedule", "1f1b", "--ranks", "2"], "required: --microbatches"),
    (["simulate", "--schedule", "1f1b", "--ranks", "two", "--microbatches", "4"],
     "invalid int value"),
])
def test_cli_errors_are_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_plot_timeline_draws_every_op():
    import matplotlib
    matplotlib.use("Agg")
    from dsv3lite.pipeline import plot_timeline

    t = simulate(build_schedule("dualpipe", 4, 10))
    fig = plot_timeline(t)
    ax = fig.axes[0]
    n_pairs = sum(e.op.kind == "FB" for e in t.events)
    # one box per op, two plus a black frame per pair
    assert len(ax.patches) == len(t.events) + 2 * n_pairs
    assert len(ax.get_yticklabels()) == 4
