"""Loss weightings (EW, DB-MTL, STCH) against hand and autograd computations on a tiny two-task model."""

import io

import pytest
import torch
from torch import nn

from training.engine.weighting import DBMTL, LOG_EPS, STCH, build_weighting

pytestmark = pytest.mark.timeout(60)

TASKS = ("seg", "act")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TwoTask(nn.Module):
    """One shared bias-free Linear (3 -> 2) and one bias-free scalar head per task; L_t = mean((h_t W x)^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 2, bias=False)
        self.heads = nn.ModuleDict({t: nn.Linear(2, 1, bias=False) for t in TASKS})
        with torch.no_grad():
            self.shared.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]))
            self.heads["seg"].weight.copy_(torch.tensor([[2.0, -0.5]]))
            self.heads["act"].weight.copy_(torch.tensor([[-0.2, 0.1]]))

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.shared(x)
        return {t: self.heads[t](z).pow(2).mean() for t in TASKS}

    def shared_params(self) -> list[nn.Parameter]:
        return [self.shared.weight]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _closed_form(model: TwoTask, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-task d log(L_t + eps) / dW and / dh_t for a single sample x, by hand.

    o_t = h_t W x, L_t = o_t^2, so d log(L_t + eps) = c_t d o_t with c_t = 2 o_t / (o_t^2 + eps);
    d o_t / dW = h_t^T x^T and d o_t / dh_t = (W x)^T.
    """
    with torch.no_grad():
        z = model.shared.weight @ x
        shared, head = {}, {}
        for t in TASKS:
            h = model.heads[t].weight[0]
            o = h @ z
            c = 2 * o / (o * o + LOG_EPS)
            shared[t] = c * torch.outer(h, x)
            head[t] = (c * z).unsqueeze(0)
    return shared, head


def test_ew_equals_manual_sum():
    model, reference = TwoTask(), TwoTask()
    x = torch.randn(4, 3)
    weights = build_weighting("ew", TASKS).backward(model.losses(x), model.shared_params(), epoch=0)
    assert weights == {"seg": 1.0, "act": 1.0}
    sum(reference.losses(x).values()).backward()
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], grad)


def test_dbmtl_matches_hand_computation_over_two_steps():
    model = TwoTask()
    weighting = DBMTL(TASKS, beta=0.9)
    x1, x2 = torch.tensor([[1.0, 0.5, -0.25]]), torch.tensor([[-0.3, 2.0, 1.0]])

    g1, h1 = _closed_form(model, x1[0])
    alpha = weighting.backward(model.losses(x1), model.shared_params(), epoch=0)
    # Step 1: g_hat = (1 - beta) g (the EMA starts at 0, as LibMTL's); alpha_t = max_k |g_k| / |g_t|.
    norms = {t: g1[t].norm() for t in TASKS}
    top = max(norms.values())
    for t in TASKS:
        assert alpha[t] == pytest.approx((top / norms[t]).item(), rel=1e-5)
    assert max(alpha.values()) > 1.2  # the two tasks' gradients differ in scale: balancing matters here
    expected = sum(top / norms[t] * 0.1 * g1[t] for t in TASKS)
    torch.testing.assert_close(model.shared.weight.grad, expected)
    for t in TASKS:  # heads: plain gradient of sum_t log L_t
        torch.testing.assert_close(model.heads[t].weight.grad, h1[t])

    model.zero_grad(set_to_none=True)
    g2, h2 = _closed_form(model, x2[0])
    alpha = weighting.backward(model.losses(x2), model.shared_params(), epoch=0)
    ema = {t: 0.1 * g2[t] + 0.9 * 0.1 * g1[t] for t in TASKS}
    norms = {t: ema[t].norm() for t in TASKS}
    top = max(norms.values())
    for t in TASKS:
        assert alpha[t] == pytest.approx((top / norms[t]).item(), rel=1e-5)
    torch.testing.assert_close(model.shared.weight.grad, sum(top / norms[t] * ema[t] for t in TASKS))
    for t in TASKS:
        torch.testing.assert_close(model.heads[t].weight.grad, h2[t])


def test_dbmtl_matches_autograd_per_task_gradients_on_a_batch():
    model, reference = TwoTask(), TwoTask()
    x = torch.randn(5, 3)
    DBMTL(TASKS).backward(model.losses(x), model.shared_params(), epoch=0)
    logs = {t: torch.log(loss + LOG_EPS) for t, loss in reference.losses(x).items()}
    per_task = {t: torch.autograd.grad(logs[t], reference.shared.weight, retain_graph=True)[0] for t in TASKS}
    norms = {t: g.norm() for t, g in per_task.items()}
    expected = sum(max(norms.values()) / norms[t] * (1 - 0.9) * per_task[t] for t in TASKS)  # EMA from 0
    torch.testing.assert_close(model.shared.weight.grad, expected)
    head_grads = torch.autograd.grad(sum(logs.values()), [reference.heads[t].weight for t in TASKS])
    for t, grad in zip(TASKS, head_grads, strict=True):
        torch.testing.assert_close(model.heads[t].weight.grad, grad)


def test_dbmtl_adds_to_existing_gradients_and_handles_a_zero_gradient_task():
    model = TwoTask()
    with torch.no_grad():
        model.heads["act"].weight.zero_()  # L_act = 0: zero gradient for the shared weight
    x = torch.tensor([[1.0, 0.5, -0.25]])
    model.shared.weight.grad = torch.ones_like(model.shared.weight)
    alpha = DBMTL(TASKS).backward(model.losses(x), model.shared_params(), epoch=0)
    g, _ = _closed_form(model, x[0])
    assert alpha == {"seg": 1.0, "act": 1.0}
    assert torch.isfinite(model.shared.weight.grad).all()
    torch.testing.assert_close(model.shared.weight.grad, 1.0 + 0.1 * g["seg"])


def test_dbmtl_grad_sync_sees_per_task_gradients_before_the_ema():
    calls = []

    def halve(tensors):  # stands in for a cross-rank mean with a rank whose gradients are zero
        calls.append([tuple(t.shape) for t in tensors])
        for t in tensors:
            t.mul_(0.5)

    synced, plain = TwoTask(), TwoTask()
    x = torch.randn(3, 3)
    alpha_synced = DBMTL(TASKS, grad_sync=halve).backward(synced.losses(x), synced.shared_params(), epoch=0)
    alpha_plain = DBMTL(TASKS).backward(plain.losses(x), plain.shared_params(), epoch=0)
    assert calls == [[(2, 6)]]  # one T x n matrix of shared gradients
    assert alpha_synced == pytest.approx(alpha_plain)
    torch.testing.assert_close(synced.shared.weight.grad, 0.5 * plain.shared.weight.grad)


def test_dbmtl_state_dict_round_trip():
    first, second = TwoTask(), TwoTask()
    x1, x2 = torch.randn(3, 3), torch.randn(3, 3)
    original = DBMTL(TASKS)
    original.backward(first.losses(x1), first.shared_params(), epoch=0)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = DBMTL(TASKS)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.step == 1
    first.zero_grad(set_to_none=True)
    a = original.backward(first.losses(x2), first.shared_params(), epoch=0)
    b = restored.backward(second.losses(x2), second.shared_params(), epoch=0)
    assert a == pytest.approx(b)
    torch.testing.assert_close(first.shared.weight.grad, second.shared.weight.grad)


def _autograd(loss: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def _stch_reference(model: TwoTask, x: torch.Tensor, nadir: torch.Tensor, mu: float) -> dict[str, torch.Tensor]:
    losses = torch.stack([model.losses(x)[t] for t in TASKS])
    return _autograd(len(TASKS) * mu * torch.logsumexp(torch.log(losses / nadir + LOG_EPS) / mu, dim=0), model)


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_stch_warmup_nadir_and_smooth_tchebycheff_gradient(mu):
    model, reference = TwoTask(), TwoTask()
    weighting = build_weighting("stch", TASKS, mu=mu, warmup_epochs=2)
    batches = [torch.randn(4, 3) for _ in range(4)]

    # Epoch 0 (warm-up, not recorded): gradient of sum log L_t.
    weighting.backward(model.losses(batches[0]), model.shared_params(), epoch=0)
    logs = sum(torch.log(v + LOG_EPS) for v in reference.losses(batches[0]).values())
    expected = _autograd(logs, reference)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name])
    weighting.end_epoch(0)
    assert weighting.nadir is None

    # Epoch 1 (last warm-up epoch): its mean losses become the nadir.
    recorded = []
    for x in batches[1:3]:
        model.zero_grad(set_to_none=True)
        losses = model.losses(x)
        recorded.append(torch.stack([losses[t].detach() for t in TASKS]))
        weighting.backward(losses, model.shared_params(), epoch=1)
    weighting.end_epoch(1)
    nadir = torch.stack(recorded).mean(dim=0)
    torch.testing.assert_close(weighting.nadir, nadir)

    # Epoch 2: T * mu * logsumexp(log(L / nadir) / mu).
    model.zero_grad(set_to_none=True)
    weights = weighting.backward(model.losses(batches[3]), model.shared_params(), epoch=2)
    assert sum(weights.values()) == pytest.approx(len(TASKS))
    expected = _stch_reference(reference, batches[3], nadir, mu)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name])


def test_stch_state_dict_round_trip_and_missing_warmup():
    model = TwoTask()
    weighting = STCH(TASKS, warmup_epochs=1)
    with pytest.raises(RuntimeError, match="nadir"):
        weighting.backward(model.losses(torch.randn(2, 3)), model.shared_params(), epoch=1)
    weighting.backward(model.losses(torch.randn(2, 3)), model.shared_params(), epoch=0)
    weighting.end_epoch(0)
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    restored = STCH(TASKS, warmup_epochs=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.nadir, weighting.nadir)
    assert restored.loss_count == 1
    x = torch.randn(2, 3)
    a, b = TwoTask(), TwoTask()
    weighting.backward(a.losses(x), a.shared_params(), epoch=1)
    restored.backward(b.losses(x), b.shared_params(), epoch=1)
    torch.testing.assert_close(a.shared.weight.grad, b.shared.weight.grad)


def test_stch_grad_sync_averages_nadir_statistics():
    seen = []

    def record(tensors):
        seen.extend(t.clone() for t in tensors)

    model = TwoTask()
    weighting = STCH(TASKS, warmup_epochs=1, grad_sync=record)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        weighting.backward(model.losses(torch.randn(2, 3)), model.shared_params(), epoch=0)
    weighting.end_epoch(0)
    assert len(seen) == 1 and seen[0].shape == (len(TASKS) + 1,)
    assert seen[0][-1].item() == 3.0  # step count travels with the sums


def test_build_weighting_rejects_unknown_name_and_bad_losses():
    with pytest.raises(ValueError, match=r"'mgda'.*\['dbmtl', 'ew', 'stch', 'weighted'\]"):
        build_weighting("mgda", TASKS)
    model = TwoTask()
    losses = model.losses(torch.randn(2, 3))
    with pytest.raises(ValueError, match="keyed"):
        build_weighting("ew", ("seg", "depth")).backward(losses, model.shared_params(), epoch=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_weighting("stch", TASKS, warmup_epochs=0)
    with pytest.raises(ValueError, match="beta"):
        build_weighting("dbmtl", TASKS, beta=1.0)


def test_dbmtl_ema_starts_at_zero_as_in_libmtl():
    """LibMTL's grad_buffer starts at zeros: the first shared gradient is (1 - beta) of the balanced sum."""
    model, reference = TwoTask(), TwoTask()
    x = torch.randn(4, 3)
    DBMTL(TASKS, beta=0.75).backward(model.losses(x), model.shared_params(), epoch=0)
    logs = {t: torch.log(loss + LOG_EPS) for t, loss in reference.losses(x).items()}
    per_task = {t: torch.autograd.grad(logs[t], reference.shared.weight, retain_graph=True)[0] for t in TASKS}
    norms = {t: g.norm() for t, g in per_task.items()}
    balanced = sum(max(norms.values()) / norms[t] * per_task[t] for t in TASKS)
    torch.testing.assert_close(model.shared.weight.grad, 0.25 * balanced)


def test_weighted_mean_is_eq6_of_ta_lora():
    model, reference = TwoTask(), TwoTask()
    x = torch.randn(4, 3)
    weights = build_weighting("weighted", TASKS, task_weights={"seg": 3.0}).backward(
        model.losses(x), model.shared_params(), epoch=0
    )
    assert weights == {"seg": 0.75, "act": 0.25}
    losses = reference.losses(x)
    ((3.0 * losses["seg"] + 1.0 * losses["act"]) / 4.0).backward()
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], grad)
    with pytest.raises(ValueError, match=r"names \['depth'\]"):
        build_weighting("weighted", TASKS, task_weights={"depth": 1.0})
    with pytest.raises(ValueError, match="only applies to train.weighting=weighted"):
        build_weighting("ew", TASKS, task_weights={"seg": 2.0})
