"""Tests of the optimizer-step benchmark's harness (bench/optim_step.py, bench/check.py):
the row table, the interleaved rounds, the JSON written as it goes, the comparison with a
baseline and a planted slowdown. Nothing here asserts on a measured time: where a test needs
times it runs the harness on a fake clock, on which each fake step costs a known amount.

    .venv/bin/python -m pytest bench/test_bench_optim.py

Not part of the test suite (tests/ only); ``make bench-check`` is the timed check.
"""

from __future__ import annotations

import functools
import inspect
import json
import types

import pytest
import torch

import fastlars
from bench import check, optim_step
from bench.optim_step import ROWS, VARIANT_OPTIONS, Row, fastlars_row
from fastlars.optim import lamb, lars

CPU = torch.device("cpu")
# options every optimizer has (docs/contract.md, "Options of both optimizers"): not variants
COMMON_OPTIONS = {"maximize", "backend", "master_weights", "skip_nonfinite", "capturable", "foreach", "fused",
                  "differentiable", "one_launch"}
CHOICES = {"ratio_denominator": lars.RATIO_DENOMINATORS, "zero_norm": lars.ZERO_NORM_RULES,
           "decay_mode": lamb.DECAY_MODES}


# ---------------------------------------------------------------------------- the table

@pytest.mark.parametrize("family", ["LARS", "LAMB"])
def test_every_variant_option_has_a_row_on_every_fused_backend(family):
    """Each keyword-only option of the optimizer (and every value of a choice) has a
    variant row on cpu, triton and cuda; a new option without a row fails here."""
    cls = getattr(fastlars, family)
    keyword_only = {name for name, p in inspect.signature(cls).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert keyword_only - COMMON_OPTIONS <= VARIANT_OPTIONS[family]
    for backend in ("cpu", "triton", "cuda"):
        variants = [r for r in ROWS if r.family == family and r.backend == backend and r.variant_of]
        assert {r.variant_of for r in variants} == {f"{family}[{backend}]"}
        covered = {k for r in variants for k in r.kwargs if k not in optim_step.OPTIMIZER_ARGS[family]
                   or r.kwargs[k] != optim_step.OPTIMIZER_ARGS[family][k]}
        assert VARIANT_OPTIONS[family] <= covered | {"one_launch"}, (backend, VARIANT_OPTIONS[family] - covered)
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        for option, choices in CHOICES.items():
            if option in VARIANT_OPTIONS[family]:
                tried = {r.kwargs[option] for r in variants if option in r.kwargs}
                assert tried == set(choices) - {defaults[option]}, (backend, option)


def test_labels_are_unique_and_name_their_options():
    labels = [r.label for r in ROWS]
    assert len(labels) == len(set(labels))
    row = fastlars_row("LAMB", "cpu", trust_bounds=(0.1, 10.0))
    assert row.label == "LAMB[cpu,trust_bounds=(0.1,10)]" and row.variant_of == "LAMB[cpu]"
    assert row.floor == "AdamW[torch,fused]" and row.kwargs["trust_bounds"] == (0.1, 10.0)
    bf16 = fastlars_row("LARS", "cpu", dtype=torch.bfloat16)
    assert bf16.label == "LARS[cpu,bfloat16]" and bf16.kwargs["master_weights"] and bf16.variant_of is None
    graph = fastlars_row("LARS", "triton", graph=True)
    assert graph.floor == "SGD[torch,fused,graph]" and graph.kwargs["capturable"] and graph.kwargs["skip_nonfinite"]


def test_rows_for_the_cpu_keep_every_cpu_row_and_say_why_others_are_left_out():
    rows, left_out = optim_step.rows_for(CPU, "resnet50", reference=False)
    labels = {r.label for r in rows}
    assert {"SGD[torch,fused]", "AdamW[torch,fused]", "LARS[foreach]", "LAMB[foreach]"} <= labels
    if "cpu" in fastlars.backends.usable_on("cpu"):
        assert {r.label for r in ROWS if r.backend == "cpu"} <= labels
    assert not any(r.graph or r.backend in ("triton", "cuda", "reference") for r in rows)
    assert any("LAMB[reference]" in line and "--no-reference" in line for line in left_out)
    assert any("LARS[triton,graph]" in line and "CUDA graphs" in line for line in left_out)
    assert len(rows) + len(left_out) == len(ROWS)


def test_a_row_whose_option_the_optimizer_lacks_is_left_out_saying_so():
    rows, left_out = optim_step.rows_for(CPU, "toy", table=[optim_step.floor("LARS"),
                                                            fastlars_row("LARS", "foreach", not_an_option=True)])
    assert [r.label for r in rows] == []  # the floor goes too: no row needs it
    assert any("does not accept not_an_option" in line for line in left_out)


def test_select_keeps_the_floors_the_selected_rows_need():
    rows, _ = optim_step.rows_for(CPU, "toy", select=r"^LAMB\[foreach\]$")
    assert [r.label for r in rows] == ["AdamW[torch,fused]", "LAMB[foreach]"]


def test_plant_specs():
    assert optim_step.parse_plants(["LAMB[cpu,trust_bounds=(0.1,10)]=1.5", "toy:LARS[cpu]=2"]) == {
        "LAMB[cpu,trust_bounds=(0.1,10)]": 1.5, "toy:LARS[cpu]": 2.0}
    for bad in ("LAMB[cpu]", "LAMB[cpu]=x", "=2", "LAMB[cpu]=0.5"):
        with pytest.raises(ValueError, match="ROW=FACTOR"):
            optim_step.parse_plants([bad])


# ---------------------------------------------------------------------------- on a fake clock

class FakeClock:
    """perf_counter and sleep of a clock that only fake steps (and sleeps) advance."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeOptimizer:
    """An optimizer whose step costs ``cost`` seconds on the fake clock; ``fail_at``: the
    step count at which it raises ``fail_with`` (a run cut short)."""

    def __init__(self, groups, *, clock, cost, fail_at=None, fail_with=KeyboardInterrupt, **_):
        self.clock, self.cost, self.fail_at, self.fail_with, self.steps = clock, cost, fail_at, fail_with, 0

    def step(self):
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise self.fail_with("cut")
        self.clock.now += self.cost


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(optim_step, "time", types.SimpleNamespace(perf_counter=fake.perf_counter, sleep=fake.sleep))
    return fake


def fake_table(clock, costs: dict[str, float], **fail) -> list[Row]:
    """Rows named as the real ones (floors, LARS/LAMB on foreach and a variant), fake steps."""
    def row(label, family, floor=None, backend=None, variant_of=None):
        make = functools.partial(FakeOptimizer, clock=clock, cost=costs[label], **fail.get(label, {}))
        return Row(label, family, make, {}, backend=backend, floor=floor, variant_of=variant_of)
    return [row("SGD[torch,fused]", "LARS"), row("AdamW[torch,fused]", "LAMB"),
            row("LARS[foreach]", "LARS", "SGD[torch,fused]", "foreach"),
            row("LARS[foreach,nesterov=True]", "LARS", "SGD[torch,fused]", "foreach", "LARS[foreach]"),
            row("LAMB[foreach]", "LAMB", "AdamW[torch,fused]", "foreach")]


COSTS = {"SGD[torch,fused]": 0.010, "AdamW[torch,fused]": 0.020, "LARS[foreach]": 0.030,
         "LARS[foreach,nesterov=True]": 0.033, "LAMB[foreach]": 0.050}


def run_fake(clock, costs=COSTS, plants=None, path=None, rounds=3, **fail):
    return optim_step.run(CPU, ["toy"], rounds=rounds, min_run_time=0.0, plants=plants, path=path,
                          table=fake_table(clock, costs, **fail), bandwidth=False)


def test_interleaved_rounds_give_each_row_its_ratio_to_its_floor(clock):
    result = run_fake(clock)
    rows = {r["label"]: r for r in result["rows"]}
    assert result["workloads"]["toy"]["rounds_done"] == 3
    assert all(len(r["samples_ms"]) == 3 for r in rows.values())
    assert rows["LARS[foreach]"]["ratios_to_floor"] == pytest.approx([3.0] * 3)
    assert rows["LAMB[foreach]"]["ratio_to_floor"]["median"] == pytest.approx(2.5)
    assert rows["SGD[torch,fused]"]["floor"] is None and rows["SGD[torch,fused]"]["ms_per_step"] == pytest.approx(10)
    assert optim_step.row_ratio(result, "toy", "LARS[foreach,nesterov=True]", "LARS[foreach]")["median"] == \
        pytest.approx(1.1)


def test_planted_slowdown_fails_the_check_against_a_baseline(clock):
    baseline = check.make_baseline(run_fake(clock))
    assert check.report(run_fake(clock), baseline)[1] is False
    planted = run_fake(clock, plants=optim_step.parse_plants(["LAMB[foreach]=1.5"]))
    rows = {r["label"]: r for r in planted["rows"]}
    assert rows["LAMB[foreach]"]["ratio_to_floor"]["median"] == pytest.approx(3.75)
    assert rows["LAMB[foreach]"]["planted_slowdown"] == 1.5
    verdicts = {line["row"]: line["verdict"] for line in check.compare(planted, baseline)}
    assert verdicts == {"toy:LARS[foreach]": "ok", "toy:LARS[foreach,nesterov=True]": "ok",
                        "toy:LAMB[foreach]": "SLOWER"}
    text, failed = check.report(planted, baseline)
    assert failed and "| toy:LAMB[foreach] | 2.50x | 3.75x (3.75-3.75) | +50% | SLOWER |" in text
    assert "PLANTED SLOWDOWNS: LAMB[foreach] x1.5" in text


def test_json_is_written_after_every_round_and_keeps_what_a_cut_run_measured(clock, tmp_path):
    path = tmp_path / "optim_step.json"
    with pytest.raises(KeyboardInterrupt):  # the time limit's SIGINT, in the middle of round 3
        run_fake(clock, path=path, rounds=5, **{"LAMB[foreach]": dict(fail_at=9)})  # build, block size, 2 rounds of 3
    saved = json.loads(path.read_text())
    assert saved["workloads"]["toy"]["rounds_done"] == 2
    rows = {r["label"]: r for r in saved["rows"]}
    assert len(rows["LAMB[foreach]"]["samples_ms"]) == 2 and rows["LARS[foreach]"]["ratio_to_floor"]["median"] == pytest.approx(3.0)


def test_a_row_that_raises_is_reported_and_the_others_measured(clock):
    result = run_fake(clock, **{"LARS[foreach]": dict(fail_at=6, fail_with=RuntimeError)})
    assert any("LARS[foreach]: RuntimeError: cut" in e for e in result["errors"])
    rows = {r["label"]: r for r in result["rows"]}
    assert len(rows["LAMB[foreach]"]["samples_ms"]) == 3 and len(rows["LARS[foreach]"]["samples_ms"]) == 1


# ---------------------------------------------------------------------------- the check's verdicts

def result_of(ratios: dict[str, list[float]], auto=None, workload="resnet50", left_out=None) -> dict:
    """A result holding rows with the given per-round ratios to their floor (floors: 1)."""
    rounds = len(next(iter(ratios.values())))
    ratios = {"SGD[torch,fused]": [1.0] * rounds, "AdamW[torch,fused]": [1.0] * rounds, **ratios}
    rows = []
    for label, per_round in ratios.items():
        family = "LARS" if label.startswith(("LARS", "SGD")) else "LAMB"
        is_floor = label.startswith(("SGD", "AdamW"))
        backend = "torch" if is_floor else label[5:-1].split(",")[0]
        options = label[5:-1].split(",", 1)[1:] if not is_floor else []
        rows.append(dict(workload=workload, label=label, optimizer=family, backend=backend, dtype="float32",
                         graph=False, floor=None if is_floor else optim_step._floor_label(family, False),
                         variant_of=f"{family}[{backend}]" if options else None, samples_ms=list(per_round),
                         ratios_to_floor=list(per_round), ratio_to_floor=optim_step.spread(per_round)))
    return dict(rows=rows, workloads={workload: dict(auto=auto or {}, left_out=left_out or [])}, rounds=len(next(iter(ratios.values()))),
                date="now", device="test", command="test", errors=[], planted_slowdowns={}, torch="", fastlars="",
                threads=1)


def test_compare_flags_slower_missing_and_new_rows():
    baseline = dict(ratios={"resnet50:LARS[cpu]": dict(median=1.0), "resnet50:LAMB[cpu]": dict(median=2.0),
                            "resnet50:LAMB[foreach]": dict(median=3.0)})
    now = result_of({"LARS[cpu]": [1.14, 1.16, 1.15], "LAMB[cpu]": [2.4, 2.31, 2.5], "LAMB[timm]": [4.0, 4, 4]})
    lines = {line["row"]: line for line in check.compare(now, baseline)}
    assert lines["resnet50:LARS[cpu]"]["verdict"] == "ok"  # +15 %: the limit itself passes
    assert lines["resnet50:LAMB[cpu]"]["verdict"] == "SLOWER" and lines["resnet50:LAMB[cpu]"]["fails"]
    assert lines["resnet50:LAMB[foreach]"]["verdict"] == "NOT MEASURED" and lines["resnet50:LAMB[foreach]"]["fails"]
    assert lines["resnet50:LAMB[timm]"]["verdict"] == "new" and not lines["resnet50:LAMB[timm]"]["fails"]
    chosen = result_of({"LARS[cpu]": [1.0, 1.0, 1.0]}, left_out=["LAMB[cpu]: not selected (--rows)"])
    lines = {line["row"]: line for line in check.compare(chosen, baseline)}
    assert lines["resnet50:LAMB[cpu]"]["verdict"] == "left out" and not lines["resnet50:LAMB[cpu]"]["fails"]
    assert lines["resnet50:LAMB[foreach]"]["verdict"] == "NOT MEASURED"
    other_workload = dict(ratios={**baseline["ratios"], "tiny2000:LARS[cpu]": dict(median=1.0)})
    lines = {line["row"]: line for line in check.compare(now, other_workload)}
    assert lines["tiny2000:LARS[cpu]"]["verdict"] == "left out"
    faster = check.compare(result_of({"LARS[cpu]": [0.8, 0.8, 0.8]}), dict(ratios={"resnet50:LARS[cpu]": dict(median=1.0)}))
    assert faster[0]["verdict"] == "faster" and not faster[0]["fails"]


def test_auto_fails_when_it_picked_a_backend_measured_slower():
    result = result_of({"LARS[cpu]": [2.0, 2.2, 2.1], "LARS[foreach]": [1.5, 1.6, 1.5],
                        "LARS[cpu,nesterov=True]": [1.0, 1.0, 1.0]}, auto={"LARS": "cpu"})
    (line,) = check.auto_checks(result)
    assert line["verdict"] == "FAIL" and line["fails"] and set(line["versus"]) == {"LARS[foreach]"}
    fine = result_of({"LARS[cpu]": [1.0, 1.0, 1.0], "LARS[foreach]": [1.02, 0.99, 1.0]}, auto={"LARS": "cpu"})
    assert check.auto_checks(fine)[0]["verdict"] == "ok"  # within the noise allowance


def test_targets_are_reported_pass_fail_or_missing():
    result = result_of({"LARS[cpu]": [1.2, 1.25, 1.2],
                        "LAMB[cpu]": [1.4, 1.4, 1.4], "LAMB[timm]": [3.0, 3.0, 3.0],
                        "LAMB[cpu,decay_mode=l2]": [1.5, 1.5, 1.5]})
    verdicts = {line["target"]: line["verdict"] for line in check.targets(result)}
    assert verdicts["LARS[cpu] <= 1.3x torch's fused SGD"] == "PASS"
    assert verdicts["LAMB[cpu] <= 1.3x torch's fused AdamW"] == "FAIL"
    assert verdicts["LAMB[cpu] >= 2x faster than timm Lamb"] == "PASS"
    assert verdicts["LAMB[cpu,decay_mode=l2] <= 1.15x LAMB[cpu]"] == "PASS"  # 1.07x


def test_the_fused_step_targets_carry_the_bound_of_a_gated_step():
    result = result_of({"LARS[cpu]": [1.5, 1.6, 1.5], "LAMB[cpu]": [1.25, 1.25, 1.25]})
    lines = {line["target"]: line for line in check.targets(result)}
    assert lines["LARS[cpu] <= 1.3x torch's fused SGD"]["bound"] is None  # no read samples: no bound
    result["workloads"]["resnet50"]["gradient_read_ms"] = [0.4, 0.5, 0.45]  # floors take 1.0 each round
    lines = {line["target"]: line for line in check.targets(result)}
    lars, lamb = lines["LARS[cpu] <= 1.3x torch's fused SGD"], lines["LAMB[cpu] <= 1.3x torch's fused AdamW"]
    assert lars["bound"] == pytest.approx(1.45) and lars["verdict"] == "FAIL, below this run's bound 1.45x"
    assert lamb["verdict"] == "PASS"
    result["workloads"]["resnet50"]["gradient_read_ms"] = [0.1, 0.1, 0.1]
    lars = {line["target"]: line for line in check.targets(result)}["LARS[cpu] <= 1.3x torch's fused SGD"]
    assert lars["verdict"] == "FAIL"  # the bound 1.1x is under the target: a plain miss
    result["workloads"]["resnet50"].update(copy_GBps=None, read_GBps=None)
    assert "bound of a gated step" in check.report(result, None)[0]


def test_a_run_records_one_gradient_read_per_round(clock):
    result = optim_step.run(CPU, ["toy"], rounds=2, min_run_time=0.0, table=fake_table(clock, COSTS))
    w = result["workloads"]["toy"]
    assert len(w["gradient_read_ms"]) == 2 and all(t >= 0 for t in w["gradient_read_ms"])


def test_baseline_round_trip(clock, tmp_path):
    result = run_fake(clock)
    baseline = check.make_baseline(result)
    assert set(baseline["ratios"]) == {"toy:LARS[foreach]", "toy:LARS[foreach,nesterov=True]", "toy:LAMB[foreach]"}
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    assert not any(line["fails"] for line in check.compare(result, json.loads(path.read_text())))


@pytest.mark.slow  # builds every CPU row once: ~10-20 s on 2 shared cores
def test_every_cpu_row_runs_on_the_toy_workload():
    result = optim_step.run(CPU, ["toy"], rounds=1, min_run_time=0.0)
    assert not result["errors"]
    expected, _ = optim_step.rows_for(CPU, "toy")
    assert [r["label"] for r in result["rows"]] == [r.label for r in expected]
    assert all(r["status"] == "ok" and len(r["samples_ms"]) == 1 for r in result["rows"])
    assert set(result["workloads"]["toy"]["auto"]) == {"LARS", "LAMB"}
