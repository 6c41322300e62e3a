"""Cost predictor and straight-through choice."""

import numpy as np
import torch

from diffsparse.accounting.macs import MacTable
from diffsparse.allocate.baselines import toca
from diffsparse.learn.predictor import (
    CostPredictor,
    choose,
    schedule_from_choice,
    schedule_from_levels,
    straight_through,
)
from diffsparse.levels import ACTIONS

UNITS = [f"transformer_blocks.{i}.{leaf}" for i in range(3) for leaf in ("attn1", "ff")]


def test_costs_are_normalised_per_step_and_unit():
    costs = CostPredictor(7, 6)()
    assert costs.shape == (7, 6, 5)
    assert torch.allclose(costs.sum(-1), torch.ones(7, 6))


def test_initialised_from_a_schedule_the_dp_gives_it_back_at_its_own_budget():
    init = toca(UNITS, 9, fresh_ratio=0.25, interval=3, ramp=0.0)
    table = MacTable(tuple(UNITS), np.tile(np.array([[400, 300, 200, 100, 0]], dtype=np.int64), (6, 1)), other=0)
    costs = CostPredictor(9, 6, init=init)()
    # every cell's cheapest level is the schedule's, so the DP returns it whenever it is feasible (the small
    # slack absorbs the rounding of savings to MAC quanta)
    levels = choose(costs, table.saved_fraction(init) - 1e-3, table)
    assert schedule_from_levels(levels, UNITS) == init


def test_straight_through_is_hard_forward_and_reaches_the_costs_backward():
    predictor = CostPredictor(4, 2)
    costs = predictor()
    levels = torch.tensor([[0, 0], [1, 4], [2, 3], [4, 4]])
    h = straight_through(costs, levels)
    assert torch.equal(h.detach(), torch.nn.functional.one_hot(levels, 5).float())
    # a loss that prefers level 4 at (1, 0): its cost must go down under gradient descent
    loss = -(h[1, 0, 4])
    loss.backward()
    assert predictor.logits.grad is not None and predictor.logits.grad.abs().sum() > 0
    with torch.no_grad():
        predictor.logits -= 10 * predictor.logits.grad
    assert predictor()[1, 0, 4] < costs[1, 0, 4]


def test_over_actions_the_dp_gives_back_a_forecasting_start_and_forecasts_cost_what_their_level_costs():
    init = toca(UNITS, 9, fresh_ratio=0.25, interval=3, ramp=0.0)
    modes = np.zeros(init.grid.shape, dtype=bool)
    modes[:, :3] = True
    init = init.with_forecast(modes)
    table = MacTable(tuple(UNITS), np.tile(np.array([[400, 300, 200, 100, 0]], dtype=np.int64), (6, 1)), other=0)
    costs = CostPredictor(9, 6, init=init, forecast=True)()
    assert costs.shape == (9, 6, len(ACTIONS))
    actions = choose(costs, table.saved_fraction(init) - 1e-3, table)
    assert schedule_from_choice(actions, len(ACTIONS), UNITS) == init
    # a forecast saves exactly its level's MACs: the same schedule copying everything saves the same
    assert table.saved_fraction(init) == table.saved_fraction(init.with_forecast(False))
