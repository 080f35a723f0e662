"""The solve's typed report: per shape and per module, its JSON round trip (how it travels between
ranks) and the union of the reports of disjoint shares of the modules."""
import json

import pytest

import lora_da
from conftest import random_batches, tiny_llama

CFG = lora_da.LoraDAConfig(rank=3, damping=1e-4, population_size=20)


@pytest.fixture(scope="module")
def stats():
    return lora_da.collect_statistics(tiny_llama(seed=3), random_batches([2, 3, 1, 4], seed=4), progress=False)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_report_round_trips_through_json(stats, solver):
    report = lora_da.solve(stats, CFG, solver=solver, progress=False).report
    again = lora_da.SolveReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    modules = report.modules()
    assert modules.keys() == set(stats.modules)
    assert all(m.diagnostics is not None and m.damping == CFG.damping for m in modules.values())
    solved_by_iterations = {name for name, m in modules.items() if m.iterations is not None}
    assert solved_by_iterations == (set(stats.modules) if solver == "randomized" else set())
    for entry in report.shapes.values():
        assert entry.solver == solver and entry.converged
        assert entry.iterations == max((m.iterations for m in entry.modules.values() if m.iterations is not None),
                                       default=None)


def test_union_of_disjoint_shares_is_the_whole_report(stats):
    report = lora_da.solve(stats, CFG, solver="randomized", progress=False).report
    names = list(report.modules())
    halves = []
    for share in (names[::2], names[1::2]):
        part = lora_da.SolveReport()
        for key, entry in report.shapes.items():
            part.shape(key, entry.solver).modules.update({n: m for n, m in entry.modules.items() if n in share})
        halves.append(part)
    assert lora_da.SolveReport.union(halves).modules() == report.modules()
    assert lora_da.SolveReport.union(halves).shapes.keys() == report.shapes.keys()


def test_unconverged_modules_are_listed_per_shape_and_overall(stats):
    with pytest.warns(RuntimeWarning, match="stopped at solver_max_iterations=1"):
        report = lora_da.solve(stats, CFG, solver="randomized", solver_max_iterations=1, progress=False).report
    stalled = report.unconverged()
    assert stalled and all(value > CFG.solver_tolerance for value in stalled.values())
    assert stalled == {name: m.residual for name, m in report.modules().items() if not m.converged}
    assert not any(entry.converged for entry in report.shapes.values() if set(entry.unconverged) & set(stalled))
