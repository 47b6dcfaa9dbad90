"""Losses: hand-computed values on tiny inputs, float64 gradchecks, USS memory and threshold."""

from __future__ import annotations

import math

import pytest
import torch
from facegate.train.losses import (
    ArcFace,
    CombinedMarginLoss,
    CosFace,
    DiscFaceRegularizer,
    NormSoftmax,
    S2SBCELoss,
    S2SSoftmaxLoss,
    SimilarityDistillation,
    TCMRegularizer,
    USSLoss,
)
from torch.autograd import gradcheck
from torch.func import functional_call


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- sample-to-class


def _unit_weights(loss: CombinedMarginLoss) -> CombinedMarginLoss:
    loss.double()
    with torch.no_grad():
        loss.weight.copy_(t([[2.0, 0.0], [0.0, 3.0]]))  # normalised: e1, e2
    return loss


def test_cosface_hand_computed() -> None:
    loss = _unit_weights(CosFace(2, 2, s=2.0, margin=0.4))
    emb, labels = t([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([0, 1])
    # sample 0: cos (0.6, 0.8), target 2*(0.6-0.4)=0.4, other 1.6 -> CE = log(1+e^1.2)
    # sample 1: cos (0, 1),     target 2*(1-0.4)=1.2,   other 0   -> CE = log(1+e^-1.2)
    expected = (softplus(1.2) + softplus(-1.2)) / 2
    assert loss(emb, labels).item() == pytest.approx(expected, abs=1e-12)
    logits = loss.logits(emb, labels)
    assert logits[0, 1].item() == pytest.approx(1.6)  # non-target logits are s*cos
    assert logits[0, 0].item() == pytest.approx(0.4)


def test_arcface_hand_computed_including_fallback() -> None:
    loss = _unit_weights(ArcFace(2, 2, s=2.0, margin=0.5))
    emb, labels = t([[0.6, 0.8], [-0.96, 0.28]]), torch.tensor([0, 0])
    # sample 0: theta=acos(0.6) < pi-0.5, target cos(theta+0.5) = 0.6cos.5 - 0.8sin.5
    target0 = 0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)
    # sample 1: cos=-0.96 < th=cos(pi-0.5): fallback cos - sin(pi-0.5)*0.5
    assert math.acos(-0.96) > math.pi - 0.5
    target1 = -0.96 - math.sin(math.pi - 0.5) * 0.5
    expected = (softplus(1.6 - 2 * target0) + softplus(0.56 - 2 * target1)) / 2
    assert loss(emb, labels).item() == pytest.approx(expected, abs=1e-12)


def test_norm_softmax_is_plain_scaled_cosine_softmax() -> None:
    loss = _unit_weights(NormSoftmax(2, 2, s=2.0))
    emb, labels = t([[3.0, 4.0]]), torch.tensor([0])
    assert loss(emb, labels).item() == pytest.approx(softplus(2 * (0.8 - 0.6)), abs=1e-12)


def test_arcface_target_logit_is_monotonic_in_theta() -> None:
    loss = ArcFace(2, 2, s=64.0, margin=0.5).double()
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    target = loss.target_cosine(torch.cos(theta))
    assert (target[1:] - target[:-1] <= 1e-12).all()
    naive = torch.cos(theta + 0.5)  # what the fallback prevents: rising again past pi - m
    assert (naive[1:] - naive[:-1] > 0).any()


def test_combined_margin_weight_init() -> None:
    loss = CombinedMarginLoss(1000, 64)
    assert loss.weight.shape == (1000, 64)
    assert loss.weight.std().item() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("factory", [CosFace, ArcFace])
def test_sample_to_class_gradcheck(factory) -> None:
    loss = factory(3, 4, s=4.0).double()
    emb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert gradcheck(
        lambda e, w: functional_call(loss, {"weight": w}, (e, labels)), (emb, weight)
    )


# ---------------------------------------------------------------- USS and memory


def _uss_fixture(s: float = 2.0, m: float = 0.1) -> USSLoss:
    """Classes 0, 1 in memory at e1, e2; class 2 never seen."""
    loss = USSLoss(3, 2, s=s, m=m).double()
    loss.update_memory(t([[5.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1]))
    return loss


def test_uss_hand_computed() -> None:
    loss = _uss_fixture()
    with torch.no_grad():
        loss.bias.fill_(0.5)
    loss.bias_initialised.fill_(True)
    emb, labels = t([[0.6, 0.8], [0.8, 0.6]]), torch.tensor([0, 2])
    # sample 0 (class 0): positive cos 0.6 -> softplus(-(2*(0.6-0.1) - 0.5)) = softplus(-0.5)
    #                     negative class 1, cos 0.8 -> softplus(2*0.8 - 0.5) = softplus(1.1)
    # sample 1 (class 2, not in memory): no positive term;
    #                     negatives: class 0 cos 0.8 -> softplus(1.1), class 1 cos 0.6 -> softplus(0.7)
    expected = (softplus(-0.5) + softplus(1.1) + softplus(1.1) + softplus(0.7)) / 2
    assert loss(emb, labels).item() == pytest.approx(expected, abs=1e-12)
    assert loss.threshold == pytest.approx(0.25)


def test_uss_clamps_exponent_arguments() -> None:
    loss = _uss_fixture()
    with torch.no_grad():
        loss.bias.fill_(-3.0)
    loss.bias_initialised.fill_(True)
    emb, labels = t([[0.6, 0.8]]), torch.tensor([0])
    # positive: -(2*0.5 + 3) = -4 -> clamped to -2; negative: 1.6 + 3 = 4.6 -> clamped to 2
    assert loss(emb, labels).item() == pytest.approx(softplus(-2.0) + softplus(2.0), abs=1e-12)


def test_uss_bias_initialised_once_from_negative_logsumexp() -> None:
    loss = _uss_fixture()
    emb, labels = t([[0.6, 0.8], [0.8, 0.6]]), torch.tensor([0, 2])
    loss(emb, labels)
    # sample 0: negatives {class 1: 2*0.8}; sample 1: negatives {class 0: 1.6, class 1: 1.2}
    expected = (1.6 + math.log(math.exp(1.6) + math.exp(1.2))) / 2
    assert loss.bias.item() == pytest.approx(expected, abs=1e-12)
    assert bool(loss.bias_initialised)
    loss(t([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]))
    assert loss.bias.item() == pytest.approx(expected, abs=1e-12)  # not re-initialised


def test_uss_empty_memory_contributes_nothing_and_defers_init() -> None:
    loss = USSLoss(3, 2, s=2.0).double()
    emb = t([[0.6, 0.8], [0.8, 0.6]]).requires_grad_()
    value = loss(emb, torch.tensor([0, 1]))
    assert value.item() == 0.0
    value.backward()  # graph stays valid
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    assert not bool(loss.bias_initialised)


def test_uss_unfilled_classes_are_masked() -> None:
    loss = _uss_fixture()
    loss.bias_initialised.fill_(True)
    emb, labels = t([[0.6, 0.8], [0.8, 0.6]]), torch.tensor([0, 2])
    before = loss(emb, labels).item()
    with torch.no_grad():
        loss.memory[2] = t([0.6, 0.8])  # written without being filled: must stay invisible
    assert loss(emb, labels).item() == before
    loss.filled[2] = True
    assert loss(emb, labels).item() != before


def test_update_memory_last_sample_wins() -> None:
    loss = USSLoss(4, 2)
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, -1.0]])
    loss.update_memory(emb, torch.tensor([1, 0, 1, 1]))
    assert loss.filled.tolist() == [True, True, False, False]
    assert torch.allclose(loss.memory[1], torch.tensor([0.0, -1.0]))  # last of three
    assert torch.allclose(loss.memory[0], torch.tensor([0.0, 1.0]))  # normalised
    assert torch.equal(loss.memory[2], torch.zeros(2))
    emb.requires_grad_()
    loss.update_memory(emb * 2, torch.tensor([2, 2, 2, 3]))
    assert not loss.memory.requires_grad
    assert torch.allclose(loss.memory[2], torch.tensor([0.6, 0.8]))


def test_uss_state_dict_keeps_memory_and_bias_flag() -> None:
    loss = _uss_fixture()
    loss(t([[0.6, 0.8]]), torch.tensor([0]))
    state = loss.state_dict()
    assert {"memory", "filled", "bias", "bias_initialised"} <= set(state)
    restored = USSLoss(3, 2, s=2.0).double()
    restored.load_state_dict(state)
    assert restored.bias.item() == loss.bias.item() and bool(restored.bias_initialised)


def test_uss_gradcheck_embeddings_and_bias() -> None:
    loss = USSLoss(4, 3, s=4.0, m=0.1).double()
    loss.update_memory(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2]))
    loss.bias_initialised.fill_(True)
    emb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert gradcheck(lambda e, b: functional_call(loss, {"bias": b}, (e, labels)), (emb, bias))


def _separable_toy(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes in 64-d: cos ~0.9 within a class, ~0.1 between classes (small jitter)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))[0]
    common, centres, own = basis[0], basis[1:5], basis[5 : 5 + 4 * per_class]
    labels = torch.arange(4).repeat_interleave(per_class)
    emb = math.sqrt(0.1) * common + math.sqrt(0.8) * centres[labels] + math.sqrt(0.1) * own
    emb = emb + 0.02 * torch.randn(emb.shape, generator=generator, dtype=torch.float64)
    return emb, labels


@pytest.mark.parametrize("start", [None, -0.2, 0.95])
def test_uss_learns_threshold_between_negatives_and_positives(start: float | None) -> None:
    """Only b is trained, embeddings fixed: t = b/s ends strictly inside the gap."""
    everything, all_labels = _separable_toy(7, seed=1)
    first = torch.arange(4) * 7  # one sample per class fills the memory, the rest is the batch
    rest = torch.ones(28, dtype=torch.bool)
    rest[first] = False
    bank, bank_labels = everything[first], all_labels[first]
    emb, labels = everything[rest], all_labels[rest]
    loss = USSLoss(4, 64).double()
    loss.update_memory(bank, bank_labels)
    if start is not None:
        with torch.no_grad():
            loss.bias.fill_(start * loss.s)
        loss.bias_initialised.fill_(True)
    cos = torch.nn.functional.normalize(emb, dim=1) @ loss.memory.t()
    own = torch.nn.functional.one_hot(labels, 4).bool()
    max_negative, min_positive = cos[~own].max().item(), cos[own].min().item()
    assert max_negative < min_positive
    loss(emb, labels)  # initialises b when start is None
    optimiser = torch.optim.SGD([loss.bias], lr=0.5)
    for _ in range(300):
        optimiser.zero_grad()
        loss(emb, labels).backward()
        optimiser.step()
    assert max_negative < loss.threshold < min_positive


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _uss_three_classes(**kwargs) -> USSLoss:
    """Classes 0, 1, 2 in memory at (1, 0), (0, 1), (-0.6, 0.8); class 3 never seen; b = 0.5."""
    loss = USSLoss(4, 2, s=2.0, m=0.1, **kwargs).double()
    loss.update_memory(t([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]), torch.tensor([0, 1, 2]))
    with torch.no_grad():
        loss.bias.fill_(0.5)
    loss.bias_initialised.fill_(True)
    return loss


# sample 0 (class 0) at (0.6, 0.8): positive cos 0.6 -> argument -(2*(0.6-0.1) - 0.5) = -0.5;
#   negatives: class 1 cos 0.8 -> 2*0.8 - 0.5 = 1.1, class 2 cos 0.28 -> 0.06.
# sample 1 (class 3, unseen: no positive) at (0.8, 0.6): negatives 1.1, 0.7, -0.5 (none clamped).
_USS_EMB, _USS_LABELS = [[0.6, 0.8], [0.8, 0.6]], [0, 3]


def _uss_value_and_bias_grad(loss: USSLoss) -> tuple[float, float]:
    value = loss(t(_USS_EMB), torch.tensor(_USS_LABELS))
    (grad,) = torch.autograd.grad(value, loss.bias)
    return value.item(), grad.item()


def test_uss_sum_form_is_the_paper_unchanged() -> None:
    value, grad = _uss_value_and_bias_grad(_uss_three_classes())
    expected = (softplus(-0.5) + softplus(1.1) + softplus(0.06)
                + softplus(1.1) + softplus(0.7) + softplus(-0.5)) / 2
    # d/db: +sigmoid(arg) for the positive, -sigmoid(arg) per negative
    expected_grad = (sigmoid(-0.5) - sigmoid(1.1) - sigmoid(0.06)
                     - sigmoid(1.1) - sigmoid(0.7) - sigmoid(-0.5)) / 2
    assert value == pytest.approx(expected, abs=1e-12)
    assert grad == pytest.approx(expected_grad, abs=1e-12)
    explicit = _uss_three_classes(negatives="sum", negative_weight=1.0)
    assert _uss_value_and_bias_grad(explicit) == (value, grad)


def test_uss_mean_form_value_and_bias_gradient() -> None:
    loss = _uss_three_classes(negatives="mean", negative_weight=2.0)
    value, grad = _uss_value_and_bias_grad(loss)
    # negatives averaged over the filled other classes (2 for sample 0, 3 for sample 1), x lambda
    expected = (softplus(-0.5) + 2.0 * (softplus(1.1) + softplus(0.06)) / 2
                + 2.0 * (softplus(1.1) + softplus(0.7) + softplus(-0.5)) / 3) / 2
    expected_grad = (sigmoid(-0.5) - 2.0 * (sigmoid(1.1) + sigmoid(0.06)) / 2
                     - 2.0 * (sigmoid(1.1) + sigmoid(0.7) + sigmoid(-0.5)) / 3) / 2
    assert value == pytest.approx(expected, abs=1e-12)
    assert grad == pytest.approx(expected_grad, abs=1e-12)
    assert loss.threshold == pytest.approx(0.25)


def test_uss_sum_form_negative_weight() -> None:
    value, grad = _uss_value_and_bias_grad(_uss_three_classes(negative_weight=0.5))
    expected = (softplus(-0.5) + 0.5 * (softplus(1.1) + softplus(0.06)
                + softplus(1.1) + softplus(0.7) + softplus(-0.5))) / 2
    assert value == pytest.approx(expected, abs=1e-12)


def test_uss_mean_with_lambda_c_minus_1_equals_sum_when_memory_is_full() -> None:
    """Every class filled: mean over C-1 classes times (C-1) is the paper's sum."""
    emb, labels = t(_USS_EMB), torch.tensor([0, 2])
    paper = _uss_three_classes()
    paper.update_memory(t([[0.3, -0.9]]), torch.tensor([3]))
    variant = _uss_three_classes(negatives="mean", negative_weight=3.0)
    variant.update_memory(t([[0.3, -0.9]]), torch.tensor([3]))
    assert variant(emb, labels).item() == pytest.approx(paper(emb, labels).item(), abs=1e-12)


def test_uss_mean_form_bias_initialisation() -> None:
    loss = USSLoss(4, 2, s=2.0, m=0.1, negatives="mean", negative_weight=2.0).double()
    loss.update_memory(t([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]), torch.tensor([0, 1, 2]))
    loss(t(_USS_EMB), torch.tensor(_USS_LABELS))
    # per sample: log(lambda * mean_c exp(s*cos_ic)), averaged
    first = math.log(2.0 * (math.exp(1.6) + math.exp(0.56)) / 2)
    second = math.log(2.0 * (math.exp(1.6) + math.exp(1.2) + math.exp(0.0)) / 3)
    assert loss.bias.item() == pytest.approx((first + second) / 2, abs=1e-12)


def test_uss_rejects_bad_negative_options() -> None:
    with pytest.raises(ValueError, match="negatives"):
        USSLoss(3, 2, negatives="max")
    with pytest.raises(ValueError, match="negative_weight"):
        USSLoss(3, 2, negative_weight=0.0)


def test_uss_config_negative_options() -> None:
    from facegate.train.config import ConfigError, load_config

    cfg = load_config(None, ["loss.uss.negatives=mean", "loss.uss.negative_weight=4"])
    assert cfg.loss.uss.negatives == "mean" and cfg.loss.uss.negative_weight == 4.0
    assert load_config(None).loss.uss.negatives == "sum"
    with pytest.raises(ConfigError, match="negatives"):
        load_config(None, ["loss.uss.negatives=max"])
    with pytest.raises(ConfigError, match="negative_weight"):
        load_config(None, ["loss.uss.negative_weight=0"])


# ---------------------------------------------------------------- S2S ablation baselines


def test_s2s_softmax_hand_computed_skips_unseen_own_class() -> None:
    loss = S2SSoftmaxLoss(3, 2, s=2.0, m=0.1).double()
    loss.update_memory(t([[5.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1]))
    emb, labels = t([[0.6, 0.8], [0.8, 0.6]]), torch.tensor([0, 2])
    # sample 0: logits (2*(0.6-0.1), 2*0.8, masked) = (1.0, 1.6) -> CE = log(1+e^0.6);
    # sample 1: own class 2 not in memory -> skipped.
    assert loss(emb, labels).item() == pytest.approx(softplus(0.6), abs=1e-12)
    empty = S2SSoftmaxLoss(3, 2).double()
    emb.requires_grad_()
    value = empty(emb, labels)
    value.backward()
    assert value.item() == 0.0


def test_s2s_bce_uses_one_bias_per_class() -> None:
    loss = S2SBCELoss(3, 2, s=2.0, m=0.1).double()
    loss.update_memory(t([[5.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1]))
    emb, labels = t([[0.6, 0.8]]), torch.tensor([0])
    loss(emb, labels)  # initialise: every b_c = logsumexp over sample 0's negatives = 1.6
    assert loss.bias.shape == (3,)
    assert torch.allclose(loss.bias, t([1.6, 1.6, 1.6]))
    with torch.no_grad():
        loss.bias.copy_(t([0.5, 1.0, 0.0]))
    # positive (class 0, b_0=0.5): softplus(-(1.0-0.5)); negative (class 1, b_1=1.0): softplus(0.6)
    assert loss(emb, labels).item() == pytest.approx(softplus(-0.5) + softplus(0.6), abs=1e-12)
    assert torch.allclose(loss.thresholds, t([0.25, 0.5, 0.0]))


# ---------------------------------------------------------------- regularisers


def test_discface_hand_computed_with_clipped_basis() -> None:
    reg = DiscFaceRegularizer(2, weight=0.2, clip=0.05).double()
    with torch.no_grad():
        reg.xi.copy_(t([0.3, 0.4]))  # |xi| = 0.5 -> clipped to (0.03, 0.04)
    class_weight = t([[2.0, 0.0], [0.0, 3.0]])
    emb, labels = t([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([0, 1])
    # sample 0: z - w = (-0.4, 0.8) -> minus xi_hat (-0.43, 0.76); sample 1: z = w -> |xi_hat| = 0.05
    expected = 0.2 * (math.sqrt(0.43**2 + 0.76**2) + 0.05) / 2
    assert reg(emb, labels, class_weight).item() == pytest.approx(expected, abs=1e-12)
    with torch.no_grad():
        reg.xi.copy_(t([0.01, 0.0]))  # under the clip: used as is
    assert torch.allclose(reg.basis(), t([0.01, 0.0]))


def test_discface_gradcheck() -> None:
    reg = DiscFaceRegularizer(4).double()
    emb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    xi = (torch.randn(4, dtype=torch.float64) * 0.1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert gradcheck(
        lambda e, w, x: functional_call(reg, {"xi": x}, (e, labels, w)), (emb, weight, xi)
    )


def test_tcm_hand_computed() -> None:
    reg = TCMRegularizer(pos_margin=0.7, neg_margin=0.5, pos_weight=1.0, neg_weight=2.0)
    emb, labels = t([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]), torch.tensor([0, 0, 1])
    # pairs: (0,1) same S=0.6 < 0.7 -> 0.1;  (0,2) diff S=0.8, (1,2) diff S=0.96, both > 0.5
    expected = 1.0 * 0.1 / 1 + 2.0 * ((0.8 - 0.5) + (0.96 - 0.5)) / 2
    assert reg(emb, labels).item() == pytest.approx(expected, abs=1e-12)
    # only easy pairs counted: loosen the negative margin so (0,2) is easy
    easy_neg = TCMRegularizer(pos_margin=0.7, neg_margin=0.9, neg_weight=2.0)
    assert easy_neg(emb, labels).item() == pytest.approx(0.1 + 2.0 * 0.06, abs=1e-12)


def test_tcm_empty_sets_give_exact_zero_with_valid_graph() -> None:
    reg = TCMRegularizer(pos_margin=0.5, neg_margin=0.99)
    emb = t([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]).requires_grad_()
    value = reg(emb, torch.tensor([0, 0, 1]))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    alone = reg(t([[1.0, 0.0]]).requires_grad_(), torch.tensor([0]))  # no pairs at all
    assert alone.item() == 0.0


def test_tcm_gradcheck() -> None:
    emb = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    reg = TCMRegularizer(pos_margin=0.9, neg_margin=-0.5)  # every pair hard: both terms live
    assert gradcheck(lambda e: reg(e, labels), (emb,))


# ---------------------------------------------------------------- distillation


def test_similarity_distillation_hand_computed_across_dimensions() -> None:
    student = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = t([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # student cos (0,1)=0, (0,2)=(1,2)=1/sqrt2; teacher (0,1)=1, others 0
    # squared gaps 1, 0.5, 0.5 (each twice over ordered pairs) -> mean 2/3
    loss = SimilarityDistillation(weight=1.5)
    assert loss(student, teacher).item() == pytest.approx(1.5 * 2 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="equal dimensions"):
        SimilarityDistillation(direct=1.0)(student, teacher)


def test_similarity_distillation_direct_term_and_gradcheck() -> None:
    student, teacher = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 1.0], [0.0, 1.0]])
    loss = SimilarityDistillation(weight=1.0, direct=1.0)
    # relational: (0 - 1/sqrt2)^2 = 0.5; direct: mean(1 - 1/sqrt2, 0)
    expected = 0.5 + (1 - 1 / math.sqrt(2)) / 2
    assert loss(student, teacher).item() == pytest.approx(expected, abs=1e-12)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64)
    assert gradcheck(lambda x: loss(x, teacher), (s,))
