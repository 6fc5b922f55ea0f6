"""Networks, memory, losses and anomaly maps: the method's math, checked piece by piece."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy.ndimage import gaussian_filter

from engine.model import build_run_model
from models.anomaly_map import MapSettings, gaussian_blur, image_scores, rd4ad_map, stpm_map
from models.feature_extractor import FeatureExtractor
from models.registry import BACKBONES
from models.losses import (normality_embedding_loss, orthogonality_loss, rd4ad_distillation_loss,
                           stpm_distillation_loss)
from models.memory import NormalityMemory, normalised_entropy
from engine.config import load_config

EXPECTED_CHANNELS = {"resnet18": (64, 128, 256), "resnet34": (64, 128, 256), "resnet50": (256, 512, 1024),
                     "wide_resnet50_2": (256, 512, 1024), "mobilenet_v2": (24, 32, 96)}


def config_for(method, **overrides):
    args = ["model.pretrained=false", "model.backbone=resnet18", *[f"{k}={v}" for k, v in overrides.items()]]
    return load_config(method, args)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_feature_shapes_and_strides(backbone):
    extractor = FeatureExtractor(backbone, frozen=True)
    features = extractor(torch.randn(1, 3, 64, 64))
    assert tuple(f.shape[1] for f in features) == EXPECTED_CHANNELS[backbone] == extractor.channels
    assert [f.shape[-1] for f in features] == [16, 8, 4]  # strides 4, 8, 16


def test_teacher_stays_frozen_and_in_eval_mode():
    model = build_run_model(config_for("st"))
    model.train()
    assert not model.teacher.training and all(not m.training for m in model.teacher.modules())
    assert model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.trainable_parameters()}


def test_teacher_loads_a_state_dict_without_head():
    network_state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    teacher = FeatureExtractor("resnet18", network_state, frozen=True)
    assert torch.equal(teacher.stages[0][0].weight, network_state["conv1.weight"])
    assert torch.equal(teacher.stages[2][0][0].conv1.weight, network_state["layer3.0.conv1.weight"])


def test_memory_parameters_train_and_are_saved():
    model = build_run_model(config_for("st"))
    names = dict(model.student.named_parameters())
    for memory_param in ("memories.0.memory.rows", "memories.1.memory.rows"):
        assert memory_param in names and names[memory_param].requires_grad
        assert memory_param in model.student.state_dict()
    model.set_exemplars(torch.randn(2, 3, 64, 64))
    model.loss(torch.randn(2, 3, 64, 64))["loss"].backward()
    memory = model.student.memories[0].memory
    keys_grad, values_grad = memory.rows.grad.split(memory.slots)
    assert keys_grad.abs().sum() > 0 and values_grad.abs().sum() > 0


def test_recall_is_the_softmax_weighted_mix_of_values():
    memory = NormalityMemory(channels=4, slots=3, temperature=0.5)
    features = torch.randn(2, 4, 3, 5)
    recalled, _ = memory.recall(features)
    weights = memory.recall_weights(features)
    query = features[1, :, 2, 4]
    cos = F.cosine_similarity(query[None], memory.keys, dim=1)
    expected_weights = torch.softmax(cos / 0.5, dim=0)
    position = 1 * 15 + 2 * 5 + 4  # row of (b=1, y=2, x=4) in the flattened batch
    assert torch.allclose(weights[position], expected_weights, atol=1e-6)
    assert torch.allclose(recalled[1, :, 2, 4], expected_weights @ memory.values, atol=1e-5)
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)))


def test_rebuild_addresses_the_values_not_the_keys():
    memory = NormalityMemory(channels=8, slots=5, temperature=0.01)
    target = F.normalize(memory.values.detach()[2:3] * 3.0, dim=1)  # the direction of value 2
    _, memory_read = memory.recall(torch.randn(1, 8, 2, 2))
    rebuilt = memory.rebuild(target, memory_read)
    weights = memory.rebuild_weights(target)
    assert weights[0].argmax() == 2 and weights[0, 2] > 0.99
    assert normality_embedding_loss(rebuilt, target) < 1e-3


def test_small_temperature_selects_and_temperature_one_does_not():
    torch.manual_seed(0)
    features = torch.randn(4, 64, 8, 8)
    selective = NormalityMemory(64, 50, temperature=0.05)
    uniform = NormalityMemory(64, 50, temperature=1.0)
    uniform.load_state_dict(selective.state_dict())
    assert normalised_entropy(uniform.recall_weights(features)) > 0.99
    assert normalised_entropy(selective.recall_weights(features)) < 0.9


def test_normalised_entropy_bounds():
    assert normalised_entropy(torch.full((3, 10), 0.1)) == pytest.approx(1.0)
    assert normalised_entropy(F.one_hot(torch.tensor([1, 4]), 10).float()) == pytest.approx(0.0, abs=1e-6)


def _published_stpm_loss(s_list, t_list):
    """gdwang08/STFPM main.py, train_val: the loss as the official loop writes it."""
    loss = 0
    for t, s_ in zip(t_list, s_list):
        t, s_ = F.normalize(t, dim=1), F.normalize(s_, dim=1)
        loss += torch.sum((t - s_) ** 2, 1).mean()
    return loss


def _published_rd4ad_loss(a, b):
    """hq-deng/RD4AD main.py, loss_fucntion: 1 - cosine of each sample's flattened map, per layer."""
    cos = torch.nn.CosineSimilarity()
    return sum(torch.mean(1 - cos(a[i].view(a[i].shape[0], -1), b[i].view(b[i].shape[0], -1))) for i in range(len(a)))


def test_distillation_losses_equal_the_published_formulas():
    s = [torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4), torch.randn(3, 32, 2, 2)]
    t = [torch.randn_like(a) for a in s]
    assert torch.allclose(stpm_distillation_loss(s, t), _published_stpm_loss(s, t), rtol=1e-6)
    assert torch.allclose(rd4ad_distillation_loss(s, t), _published_rd4ad_loss(t, s), rtol=1e-6)
    # They are different losses: STPM compares directions per position, RD4AD the whole map's
    # direction, so rescaling each position leaves STPM's at zero but not RD4AD's.
    rescaled = [a * torch.rand(a.shape[0], 1, *a.shape[2:]).add(0.1) for a in t]
    assert stpm_distillation_loss(rescaled, t) < 1e-6 < rd4ad_distillation_loss(rescaled, t)
    assert stpm_distillation_loss(t, t) < 1e-6 and rd4ad_distillation_loss(t, t) < 1e-6


@pytest.mark.parametrize("method, form", [("st", "stpm"), ("rd", "rd4ad")])
def test_each_script_trains_with_its_papers_loss_and_map_by_default(method, form):
    config = load_config(method, ["model.pretrained=false"])
    assert config.loss.distillation == form
    assert (config.eval.combine, config.eval.sigma) == {"st": ("product", 0.0), "rd": ("sum", 4.0)}[method]


def test_normality_embedding_loss_compares_directions():
    target = torch.randn(18, 6)
    unit = F.normalize(target, dim=1)
    assert normality_embedding_loss(5 * target, unit) < 1e-10
    assert normality_embedding_loss(-target, unit) == pytest.approx(4.0)
    expected = (F.normalize(target.flip(0), dim=1) - unit).pow(2).sum(1).mean()
    assert torch.allclose(normality_embedding_loss(target.flip(0), unit), expected)


def test_orthogonality_loss_is_zero_only_when_orthogonal_and_never_rewards_anticorrelation():
    eye = torch.eye(6)
    keys, values = eye[:3], eye[3:]
    assert orthogonality_loss(keys, values) == 0
    assert orthogonality_loss(keys, keys) > 0
    assert orthogonality_loss(keys, -keys) == orthogonality_loss(keys, keys)
    random_keys, random_values = F.normalize(torch.randn(5, 6), dim=1), F.normalize(torch.randn(5, 6), dim=1)
    assert orthogonality_loss(random_keys, random_values) > 0


def test_lambda2_changes_the_loss_and_lambda1_does_not_stand_in_for_it():
    images, exemplars = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    totals = {}
    for l1, l2 in [(1.0, 0.0), (1.0, 5.0), (3.0, 0.0)]:
        model = build_run_model(config_for("rd", **{"loss.lambda1": l1, "loss.lambda2": l2}))
        model.set_exemplars(exemplars)
        losses = model.loss(images)
        totals[(l1, l2)] = losses
        assert torch.allclose(losses["loss"], losses["kd"] + l1 * losses["nm"] + l2 * losses["orth"], atol=1e-5)
    assert totals[(1.0, 5.0)]["loss"] > totals[(1.0, 0.0)]["loss"]
    assert torch.allclose(totals[(1.0, 0.0)]["orth"], totals[(1.0, 5.0)]["orth"])


@pytest.mark.parametrize("method", ["st", "rd"])
def test_memory_off_is_the_plain_baseline(method):
    model = build_run_model(config_for(method, **{"memory.enabled": "false"}))
    assert len(model.student.memories) == 0
    losses = model.loss(torch.randn(2, 3, 64, 64))
    assert set(losses) == {"loss", "kd"} and torch.equal(losses["loss"], losses["kd"])


@pytest.mark.parametrize("method", ["st", "rd"])
def test_each_memory_lives_in_the_space_of_its_teacher_stage(method):
    model = build_run_model(config_for(method))
    images = torch.randn(2, 3, 64, 64)
    teacher = model.teacher(images)
    queried = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: queried.append(inp[0].shape))
             for m in model.student.memories]
    model.student(images, teacher)
    for h in hooks:
        h.remove()
    assert [t.shape for t in model.student.memory_targets(teacher)] == queried
    for fusion, target in zip(model.student.memories, model.student.memory_targets(teacher)):
        assert fusion.memory.values.shape[1] == target.shape[1]


@pytest.mark.parametrize("method, stages", [("st", "[2]"), ("rd", "[bottleneck,3]"), ("rd", "[2]")])
@pytest.mark.parametrize("fusion", ["concat", "add"])
def test_memory_places_and_fusion_are_configurable_and_train(method, stages, fusion):
    model = build_run_model(config_for(method, **{"memory.stages": stages, "memory.fusion": fusion}))
    assert len(model.student.memories) == len(stages.strip("[]").split(","))
    assert all((m.fuse is None) == (fusion == "add") for m in model.student.memories)
    model.set_exemplars(torch.randn(2, 3, 64, 64))
    losses = model.loss(torch.randn(2, 3, 64, 64))
    losses["loss"].backward()
    assert torch.isfinite(losses["nm"]) and all(m.memory.rows.grad is not None for m in model.student.memories)


def test_memory_places_a_student_cannot_hold_are_refused():
    from utils.errors import UserError

    with pytest.raises(UserError, match="memory.stages"):
        build_run_model(config_for("st", **{"memory.stages": "[3]"}))
    with pytest.raises(UserError, match="memory.stages"):
        build_run_model(config_for("st", **{"memory.stages": "[bottleneck]"}))


@pytest.mark.parametrize("method", ["st", "rd"])
def test_student_features_match_teacher_shapes(method):
    model = build_run_model(config_for(method, **{"model.backbone": "mobilenet_v2"}))
    images = torch.randn(2, 3, 64, 64)
    teacher = model.teacher(images)
    student = model.student(images, teacher).features
    assert [s.shape for s in student] == [t.shape for t in teacher]


def _published_stpm_map(s_list, t_list, size):
    """gdwang08/STFPM main.py, test(): per layer squared distance of normalised features at the first
    layer's size (align_corners=False), multiplied; then resized to the image (cv2's bilinear
    resize has half-pixel centres, which is align_corners=False). One image at a time, as there."""
    first = t_list[0].shape[-1]
    out = []
    for b in range(t_list[0].shape[0]):
        score_map = 1.0
        for t, s_ in zip(t_list, s_list):
            t, s_ = F.normalize(t[b:b + 1], dim=1), F.normalize(s_[b:b + 1], dim=1)
            sm = torch.sum((t - s_) ** 2, 1, keepdim=True)
            score_map = score_map * F.interpolate(sm, size=(first, first), mode="bilinear", align_corners=False)
        out.append(F.interpolate(score_map, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


def _published_rd4ad_map(fs_list, ft_list, size):
    """hq-deng/RD4AD test.py, cal_anomaly_map(amap_mode='a') then gaussian_filter(sigma=4)."""
    out = []
    for b in range(ft_list[0].shape[0]):
        anomaly_map = np.zeros([size, size])
        for fs, ft in zip(fs_list, ft_list):
            a_map = 1 - F.cosine_similarity(fs[b:b + 1], ft[b:b + 1])
            a_map = F.interpolate(torch.unsqueeze(a_map, dim=1), size=size, mode="bilinear", align_corners=True)
            anomaly_map += a_map[0, 0].numpy()
        out.append(gaussian_filter(anomaly_map, sigma=4))
    return np.stack(out)


def test_anomaly_maps_equal_the_published_formulas():
    t = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    s = [a + 0.5 * torch.randn_like(a) for a in t]
    assert torch.allclose(stpm_map(s, t, 64), _published_stpm_map(s, t, 64), rtol=1e-5, atol=1e-7)
    ours = gaussian_blur(rd4ad_map(s, t, 64), 4.0).numpy()
    assert np.abs(ours - _published_rd4ad_map(s, t, 64)).max() < 1e-5
    # The product and the sum rank pixels differently: they are different methods.
    assert not torch.allclose(stpm_map(s, t, 64).argsort(), rd4ad_map(s, t, 64).argsort())


def test_gaussian_blur_matches_scipy_and_runs_batched():
    maps = torch.rand(3, 40, 50)
    ours = gaussian_blur(maps, 4.0).numpy()
    reference = np.stack([gaussian_filter(m, 4.0) for m in maps.numpy()])  # scipy's defaults: reflect, 4 sigma
    assert np.abs(ours - reference).max() < 1e-5
    tiny = torch.rand(2, 5, 7)  # kernel far wider than the map: the reflection repeats, as in scipy
    assert np.abs(gaussian_blur(tiny, 3.0).numpy() - np.stack([gaussian_filter(m, 3.0) for m in tiny.numpy()])).max() < 1e-5
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_rd_student_is_built_as_rd4ad_builds_it():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    model = build_run_model(config_for("rd", **{"model.backbone": "resnet34"}))
    student = model.student
    assert len(student.bottleneck.embed) == 3  # RD4AD: BN_layer(AttnBasicBlock, 3) for resnet34
    for stage in student.decoder:  # each decoder stage upsamples inside its first block
        first = stage[0]
        assert isinstance(first, BasicBlock) and isinstance(first.conv1, torch.nn.ConvTranspose2d)
        assert isinstance(first.downsample[0], torch.nn.ConvTranspose2d)
    wide = build_run_model(config_for("rd", **{"model.backbone": "resnet50"})).student
    assert isinstance(wide.decoder[0][0], Bottleneck) and isinstance(wide.decoder[0][0].conv2, torch.nn.ConvTranspose2d)
    # Kaiming-normal (fan_out, relu): std sqrt(2 / (out_channels * k * k)); BatchNorm at 1 and 0.
    conv = student.bottleneck.embed[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    bns = [m for m in student.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


def test_anomaly_map_is_image_sized_and_scores_are_maxima():
    model = build_run_model(config_for("st"))
    model.eval()
    maps = model.anomaly_map(torch.randn(3, 3, 64, 64))
    assert maps.shape == (3, 64, 64) and torch.isfinite(maps).all()
    model.map_settings = MapSettings("sum", 4.0)  # an evaluation choice: the same weights score anew
    assert not torch.equal(model.anomaly_map(torch.randn(3, 3, 64, 64)), maps)
    assert torch.equal(image_scores(maps), maps.flatten(1).max(1).values)


def test_same_seed_builds_the_same_model():
    a = build_run_model(config_for("st")).state_dict()
    b = build_run_model(config_for("st")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(float(sum(v.float().sum() for v in a.values())))
