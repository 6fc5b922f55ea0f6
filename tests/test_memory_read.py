"""The memory's read and losses, written for few operators, compute the paper's formulas: both
reads, the short backwards, the stored exemplar normalisation, and one training step of MemKD
against the same step written plainly with F.normalize and autograd (the code before issue 21)."""
import pytest
import torch
import torch.nn.functional as F

from engine.model import build_run_model
from engine.config import load_config
from models import memkd as memkd_module
from models.losses import normality_embedding_loss, orthogonality_loss
from models.memory import (NormalityMemory, normalised_entropy, positions, read_by_attention, read_by_products,
                           unit_vectors)


def formula_read(queries, rows, values, temperature):
    """softmax(n(q) n(r)^T / T) v, n = F.normalize: the read as the paper states it."""
    return torch.softmax(F.normalize(queries, dim=-1) @ F.normalize(rows, dim=-1).t() / temperature, dim=-1) @ values


@pytest.mark.parametrize("reader", [read_by_attention, read_by_products])
def test_both_reads_are_the_formula_with_its_gradients(reader):
    torch.manual_seed(0)
    queries, rows, values = torch.randn(40, 16), torch.randn(7, 16), torch.randn(7, 16)
    grads = []
    for read, normalise in ((formula_read, lambda x: x),
                            (reader, lambda x: F.normalize(x, dim=-1))):
        leaves = [t.clone().requires_grad_() for t in (queries, rows, values)]
        out = read(normalise(leaves[0]), normalise(leaves[1]), leaves[2], 0.05)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        grads.append((out.detach(), *[leaf.grad for leaf in leaves]))
    for got, expected in zip(grads[1], grads[0]):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_unit_vectors_is_f_normalize_with_the_same_gradient():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unit_vectors(t, dim=1), (x,))
    assert torch.allclose(unit_vectors(x, dim=1), F.normalize(x, dim=1))
    zero_row = torch.zeros(2, 3, requires_grad=True)  # F.normalize's eps: a zero vector stays zero
    unit_vectors(zero_row).sum().backward()
    expected = torch.zeros(2, 3, requires_grad=True)
    F.normalize(expected, dim=-1).sum().backward()
    assert torch.equal(zero_row.grad, expected.grad)


def test_the_losses_short_backwards_are_autograds():
    rebuilt = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    target = F.normalize(torch.randn(30, 8, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda r: normality_embedding_loss(r, target), (rebuilt,))
    keys, values = (F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(orthogonality_loss, (keys, values))
    plain = (F.normalize(rebuilt, dim=1) - target).pow(2).sum(1).mean()
    assert torch.allclose(normality_embedding_loss(rebuilt, target), plain)
    assert torch.allclose(orthogonality_loss(keys, values), (keys @ values.t()).pow(2).mean())


def test_a_recall_in_either_layout_is_the_formula_at_every_position():
    torch.manual_seed(0)
    memory = NormalityMemory(channels=16, slots=7, temperature=0.05)
    features = torch.randn(3, 16, 5, 6)
    expected = formula_read(positions(features), memory.keys, memory.values, 0.05)
    for layout in (torch.contiguous_format, torch.channels_last):
        recalled, memory_read = memory.recall(features.contiguous(memory_format=layout))
        assert recalled.shape == features.shape
        assert torch.allclose(positions(recalled), expected, atol=1e-5)
        assert torch.allclose(memory_read.unit_keys, F.normalize(memory.keys, dim=1))
        assert torch.allclose(memory_read.unit_values, F.normalize(memory.values, dim=1))


def test_checkpoints_with_separate_keys_and_values_load():
    old = NormalityMemory(channels=4, slots=3, temperature=0.1)
    state = {"keys": torch.randn(3, 4), "values": torch.randn(3, 4)}
    old.load_state_dict(state)
    assert torch.equal(old.keys, state["keys"]) and torch.equal(old.values, state["values"])
    torch.manual_seed(5)
    drawn_apart = torch.randn(3, 4), torch.randn(3, 4)
    torch.manual_seed(5)
    together = NormalityMemory(channels=4, slots=3, temperature=0.1)  # initialised exactly as before
    assert torch.equal(together.keys, drawn_apart[0]) and torch.equal(together.values, drawn_apart[1])


def plain_step_loss(model, images, exemplars):
    """MemKD's loss on ``images`` written the plain way: F.normalize, the read as products, every
    target normalised in every step (the formulas; the code before the operator work)."""
    teacher = model.teacher_features(images)
    student = model.student(images, teacher)
    total = model.distillation_loss(student.features, teacher)
    nm, orth = [], []
    targets = model.student.memory_targets(model.teacher_features(exemplars))
    for fusion, target in zip(model.student.memories, targets):
        memory = fusion.memory
        target = positions(target)
        rebuilt = formula_read(target, memory.values, memory.values, memory.temperature)
        nm.append((F.normalize(rebuilt, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean())
        orth.append((F.normalize(memory.keys, dim=1) @ F.normalize(memory.values, dim=1).t()).pow(2).mean())
    return total + model.lambda1 * torch.stack(nm).mean() + model.lambda2 * torch.stack(orth).mean()


@pytest.mark.parametrize("method, stages", [("st", None), ("rd", None), ("rd", "[bottleneck,3]")])
def test_a_training_step_has_the_plain_formulas_loss_and_gradients(method, stages):
    overrides = ["model.pretrained=false", "model.backbone=resnet18", "loss.lambda2=3.0"]
    config = load_config(method, overrides + ([f"memory.stages={stages}"] if stages else []))
    torch.manual_seed(0)
    model = build_run_model(config)
    model.train()
    images, exemplars = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    model.set_exemplars(exemplars)
    results = []
    for loss in (lambda: model.loss(images)["loss"], lambda: plain_step_loss(model, images, exemplars)):
        state = {k: v.clone() for k, v in model.student.state_dict().items()}  # BN statistics move
        model.student.zero_grad()
        value = loss()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
        model.student.load_state_dict(state)
    (new, new_grads), (plain, plain_grads) = results
    assert torch.allclose(new, plain, rtol=1e-5)
    for got, expected in zip(new_grads, plain_grads):
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item() + 1e-9)


def test_fixed_exemplar_targets_are_normalised_once_and_moving_ones_every_step(monkeypatch):
    normalised = []
    original = memkd_module._unit_positions
    monkeypatch.setattr(memkd_module, "_unit_positions", lambda t: normalised.append(t.shape) or original(t))
    for stages, per_step in (("[3,2]", 0), ("[bottleneck,3]", 1)):
        model = build_run_model(load_config("rd", ["model.pretrained=false", "model.backbone=resnet18",
                                                   f"memory.stages={stages}"]))
        model.set_exemplars(torch.randn(2, 3, 64, 64))
        normalised.clear()
        model.loss(torch.randn(2, 3, 64, 64))
        model.loss(torch.randn(2, 3, 64, 64))
        assert len(normalised) == 2 * per_step


def test_entropies_are_logged_outside_the_step_and_change_nothing():
    model = build_run_model(load_config("st", ["model.pretrained=false", "model.backbone=resnet18"]))
    model.train()
    model.set_exemplars(torch.randn(3, 3, 64, 64))
    assert set(model.loss(torch.randn(2, 3, 64, 64))) == {"loss", "kd", "nm", "orth"}
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    entropies = model.memory_entropies()
    assert set(entropies) == {"recall_entropy", "exemplar_entropy"}
    assert all(0.0 <= value <= 1.0 for value in entropies.values())
    assert model.student.training
    assert all(torch.equal(before[k], v) for k, v in model.student.state_dict().items())
    memory = model.student.memories[0].memory
    assert entropies["exemplar_entropy"] > 0 and normalised_entropy(memory.recall_weights(torch.randn(1, 64, 4, 4))) > 0


def test_an_unfinished_checkpoint_with_separate_keys_and_values_cannot_resume_and_says_so(tmp_path):
    from engine.training import _load_optimizer
    from utils.errors import UserError

    before = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(3, 4))]  # keys, values
    old = torch.optim.Adam(before)
    now = torch.optim.Adam([torch.nn.Parameter(torch.zeros(6, 4))])  # rows
    scheduler = torch.optim.lr_scheduler.LambdaLR(now, lambda epoch: 1.0)
    saved = {"optimizer": old.state_dict(), "scheduler": scheduler.state_dict()}
    with pytest.raises(UserError, match="train.resume=false"):
        _load_optimizer(now, scheduler, saved, tmp_path / "last.pt")
