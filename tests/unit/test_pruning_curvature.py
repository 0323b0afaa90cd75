"""CA-HFP: gradient / Fisher, group scores by hand, keep rule, compact model, reconstruction."""
import numpy as np
import pytest
import torch
from torch import nn

from fedray.models import build_model, model_spec
from fedray.pruning.curvature import compact_submodel, fisher_and_grad, group_scores, keep_top, reconstruct


def tiny_mlp():
    torch.manual_seed(0)
    m = build_model("mlp", (1, 1, 3), 2, options={"hidden": [2]})
    return m, model_spec(m, (1, 1, 3))


def test_fisher_and_grad_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    batches = [(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]])),
               (torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0]]))]
    g, h = fisher_and_grad(model, batches, lambda out, y: ((out - y) ** 2).sum())
    # per-batch gradients 2 (w.x - y) x: [2, 0] and [0, -4]
    assert g["weight"] == pytest.approx(np.array([[1.0, -2.0]]))
    assert h["weight"] == pytest.approx(np.array([[2.0, 8.0]]))
    assert model.weight.grad is None and model.training
    with pytest.raises(ValueError):
        fisher_and_grad(model, [], nn.functional.mse_loss)


def test_fisher_and_grad_are_numpys_float64_sums_bit_for_bit():
    """The sums run in torch (where the gradients are) but give the bits of numpy float64 sums of
    the batches' gradients; a parameter one batch does not reach gets that batch as zero."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):  # b only for batches of 4
            return self.a(x) + (self.b(x) if len(x) == 4 else 0)

    torch.manual_seed(1)
    model = Two()
    batches = [(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (3, 4, 3, 4, 4)]
    g, h = fisher_and_grad(model, batches, nn.functional.cross_entropy)
    want_g = {k: np.zeros(tuple(p.shape)) for k, p in model.named_parameters()}
    want_h = {k: np.zeros(tuple(p.shape)) for k, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                a = p.grad.numpy().astype(np.float64)
                want_g[k] += a
                want_h[k] += a * a
    for k in want_g:
        assert g[k].dtype == np.float64 and np.array_equal(g[k], want_g[k] / 5), k
        assert np.array_equal(h[k], want_h[k] / 5), k


def test_group_scores_by_hand_on_linear():
    _, spec = tiny_mlp()
    params = {"layers.0.weight": np.array([[1.0, 2.0, 0.0], [-1.0, 0.0, 3.0]]), "layers.0.bias": np.array([1.0, -2.0]),
              "layers.1.weight": np.ones((2, 2)), "layers.1.bias": np.ones(2)}
    grad = {"layers.0.weight": np.array([[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]]), "layers.0.bias": np.array([2.0, 0.0])}
    fisher = {"layers.0.weight": np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]]), "layers.0.bias": np.array([0.0, 4.0])}
    s = group_scores(spec, params, grad, fisher)
    # row 0: (-.5 + .5) + (0 + 2) + 0 + (-2 + 0) = 0; row 1: 1 + 0 - 3 + (0 + .5*4*4) = 6
    assert list(s) == ["layers.0"]
    assert s["layers.0"] == pytest.approx(np.array([0.0, 6.0]))
    assert {k: v.tolist() for k, v in keep_top(spec, s, 0.5).items()} == {"layers.0": [1]}


def test_keep_top_ceil_and_ties():
    _, spec = tiny_mlp()
    with pytest.raises(ValueError):
        keep_top(spec, {"layers.0": np.array([1.0, 1.0])}, 0.0)
    assert keep_top(spec, {"layers.0": np.array([1.0, 1.0])}, 0.5)["layers.0"].tolist() == [0]
    assert keep_top(spec, {"layers.0": np.array([1.0, 1.0])}, 0.51)["layers.0"].tolist() == [0, 1]


def test_compact_cnn_flops_and_reconstruction():
    torch.manual_seed(0)
    shape, opts = (1, 8, 8), {"channels": [8, 16], "hidden": [32]}
    model = build_model("cnn", shape, 10, options=opts)
    spec = model_spec(model, shape)
    x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
    g, h = fisher_and_grad(model, [(x[:3], y[:3]), (x[3:], y[3:])], nn.functional.cross_entropy)
    params = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    scores = group_scores(spec, params, g, h)
    assert set(scores) == {"convs.0", "convs.1", "fcs.0"} and all(np.all(s >= 0) for s in scores.values())
    keep = keep_top(spec, scores, 0.5)
    assert {k: len(v) for k, v in keep.items()} == {"convs.0": 4, "convs.1": 8, "fcs.0": 16}
    for layer, kept in keep.items():  # the kept channels are the best scored ones
        assert scores[layer][kept].min() >= np.delete(scores[layer], kept).max()

    compact, state, index = compact_submodel(spec, "cnn", shape, 10, opts, params, keep)
    assert {k: tuple(v.shape) for k, v in compact.state_dict().items()} == spec.compact_shapes(keep)
    assert compact(x).shape == (6, 10)
    cspec = model_spec(compact, shape)
    full = spec.train_flops(spec.layer_names, 1)
    assert cspec.train_flops(cspec.layer_names, 1) <= 0.6 * full
    assert cspec.num_params() < spec.num_params()

    trained = {k: v + 1.0 for k, v in state.items()}
    like = {k: np.zeros_like(v) for k, v in params.items()}
    values, mask = reconstruct(spec, trained, index, like)
    assert set(mask) == set(params)
    for k in params:
        assert mask[k].sum() == trained[k].size
        np.testing.assert_array_equal(values[k][mask[k]], params[k][mask[k]] + 1.0)
        assert not values[k][~mask[k]].any()
    rows = keep["convs.1"]
    np.testing.assert_array_equal(values["convs.1.weight"][rows][:, keep["convs.0"]],
                                  params["convs.1.weight"][rows][:, keep["convs.0"]] + 1.0)
