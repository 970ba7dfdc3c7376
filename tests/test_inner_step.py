"""The inner-step object and the named update history the backward rule reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from mpbackprop.engine import InnerStep, layer_context, layer_depth, train_step
from mpbackprop.evaluation.analysis import _messages, analyze
from mpbackprop.rules import (SGD, Adam, Exact, FeedbackAlignment, LearnedBackward, LearnedUpdate, ScheduledUpdate,
                              UpdateHistory)


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    return mp.compile(model, (5,))


def _batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return lambda: (torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))


def _full_rule():
    rule = LearnedBackward(hidden=3, features="full", seed=2).double()
    torch.manual_seed(4)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return rule


@pytest.mark.parametrize("make_update", [lambda: SGD(0.1), lambda: SGD(0.1, momentum=0.9), lambda: Adam(1e-2),
                                         lambda: LearnedUpdate().double(), lambda: ScheduledUpdate().double()])
def test_inner_step_is_the_functional_loop(make_update):
    net, batches = _net(), _batches()
    rule, update = FeedbackAlignment(seed=3), make_update()
    run = InnerStep.start(net, net.values.clone(), rule, update, total_steps=9, batches=batches)
    theta, rs, state = net.values.clone(), rule.init_state(net), update.init_state(net.values)
    ref = _batches()
    for k in range(4):
        x, y = ref()
        r = train_step(net, theta, x, y, rule, update, rs, state, k, total_steps=9)
        theta, state = r.theta, r.state
        assert torch.equal(run.step().loss, r.loss)
    assert run.steps == 4 and torch.equal(run.theta, theta)
    assert set(run.opt_state) == set(state) and all(torch.equal(run.opt_state[k], state[k]) for k in state)


def test_step_takes_both_or_neither_of_x_and_y():
    net = _net()
    run = InnerStep.start(net, net.values.clone(), Exact(), SGD(0.1))
    with pytest.raises(ValueError, match="no batch source"):
        run.step()
    with pytest.raises(TypeError, match="both x and y"):
        run.step(torch.zeros(2, 5, dtype=torch.float64))


def test_differentiable_flag_keeps_the_meta_graph():
    net, batches = _net(), _batches()
    rule = _full_rule()
    for flag in (False, True):
        run = InnerStep.start(net, net.values.clone(), rule, Adam(1e-2), batches=batches, differentiable=flag)
        run.step()
        run.step()
        assert run.theta.requires_grad is flag


def test_update_rules_name_their_second_moment():
    theta = torch.zeros(6)
    assert SGD(0.1).history(SGD(0.1).init_state(theta)).second_moment is None
    momentum = SGD(0.1, momentum=0.9)
    assert momentum.history(momentum.init_state(theta)).second_moment is None  # its "v" is a velocity
    for update in (Adam(), LearnedUpdate(), ScheduledUpdate()):
        state = update.init_state(theta)
        assert update.history(state).second_moment is state["v"]
    assert UpdateHistory(torch.arange(6.0)).slice(2, 4).second_moment.tolist() == [2.0, 3.0]
    assert UpdateHistory().slice(0, 3).second_moment is None


def test_full_features_read_the_second_moment_and_not_a_velocity():
    net = _net()
    rule = _full_rule()
    k = 2
    w = net.layers[k].weight
    state = {"v": torch.rand(net.num_params, dtype=torch.float64)}
    rs = rule.init_state(net)
    with torch.no_grad():
        none = rule.coefficients(layer_context(net, k, net.values, rs, UpdateHistory()))
        adam = rule.coefficients(layer_context(net, k, net.values, rs, Adam().history(state)))
        sgdm = rule.coefficients(layer_context(net, k, net.values, rs, SGD(0.1, 0.9).history(state)))
    assert not torch.equal(adam, none)  # the second moment is an input
    assert torch.equal(sgdm, none)  # SGD-momentum's velocity "v" is not taken for one
    ctx = layer_context(net, k, net.values, rs, Adam().history(state))
    assert torch.equal(ctx.history.second_moment, state["v"][w.offset:w.stop])
    assert ctx.depth == layer_depth(net, k) == k / (len(net.layers) - 1)


def test_analysis_messages_use_the_history_the_step_used():
    """The coefficients drawn at a message step are those of the step: the update's state before it."""
    net = _net()
    rule, update = _full_rule(), Adam(1e-2)
    an = analyze(net, net.values.clone(), _batches(), lambda th: torch.tensor(0.0), rule, update, 3,
                 message_steps=(2,))
    with torch.no_grad():  # as the analysis computes them
        run = InnerStep.start(net, net.values.clone(), rule, update, total_steps=3, batches=_batches())
        run.step()
        run.step()
        before = run.history
        theta = run.theta
        res = run.step(keep_backward=True).backward
        parts = []
        for layer in (lay for lay in net.layers if lay.weighted):
            coef = rule.coefficients(layer_context(net, layer.index, theta, run.rule_state, before))
            parts.append(_messages(net, layer, res.b[layer.index], coef) if res.b[layer.index] is not None
                         else torch.zeros(net.views[layer.index].num_edges))
        assert torch.equal(an.messages[2], torch.cat(parts))
        after = run.update.history(run.opt_state)  # the post-update state the analysis used to read
        drifted = rule.coefficients(layer_context(net, net.output_layer, theta, run.rule_state, after))
        assert not torch.equal(drifted, rule.coefficients(layer_context(net, net.output_layer, theta, run.rule_state, before)))


class _Recording(SGD):
    """SGD that keeps the loss each step's context carried."""

    def __init__(self, lr):
        super().__init__(lr)
        self.seen = []

    def step(self, ctx):
        self.seen.append(ctx.loss)
        return super().step(ctx)


@pytest.mark.parametrize("differentiable", [False, True])
def test_update_sees_the_batch_loss_before_its_step(differentiable):
    net, batches = _net(), _batches()
    update = _Recording(0.1)
    theta = net.values.clone().requires_grad_(differentiable)
    run = InnerStep.start(net, theta, Exact(), update, total_steps=5, batches=batches, differentiable=differentiable)
    ref = _batches()
    for _ in range(3):
        before = run.theta.detach().clone()
        x, y = ref()
        expected = torch.nn.functional.cross_entropy(net.forward(x, before), y)
        r = run.step()
        seen = update.seen[-1]
        assert seen.dim() == 0 and not seen.requires_grad
        assert torch.allclose(seen, r.loss.detach()) and torch.allclose(seen, expected, atol=1e-12)
    assert not torch.equal(update.seen[0], update.seen[-1])  # the parameters moved: the loss did too
