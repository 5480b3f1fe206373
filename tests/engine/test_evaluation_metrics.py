"""The evaluation metrics equal the reference libraries' figures on the same images and weights.

Random-weight models of the real architectures, nothing downloaded: torch-fidelity's InceptionV3 (random
weights saved under the real file name) and a tiny transformers CLIP folder with the shipped tokenizer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.evaluation import metrics as m
from tests.fixtures.tiny_evaluation import (
    write_random_inception,
    write_random_lpips,
    write_tiny_clip,
    write_tiny_open_clip,
)

REL = 1e-4


def shapes(seed: int, count: int, size: int = 64) -> list[Image.Image]:
    """Pictures with structure (a coloured ground and ellipses), different per seed."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(8, size // 2, 2))
            draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        images.append(image)
    return images


def noisy(images: list[Image.Image], amount: float, seed: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.asarray(i, np.float64) + rng.normal(0, amount, (*i.size[::-1], 3)), 0, 255)
                            .astype(np.uint8)) for i in images]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return m.InceptionExtractor(inception_weights)


@pytest.fixture(scope="module")
def sets(extractor):
    real, fake = shapes(1, 4), shapes(2, 4)
    return real, fake, extractor.extract(real), extractor.extract(fake)


def close(ours: float, theirs: float) -> bool:
    return math.isclose(ours, theirs, rel_tol=REL, abs_tol=1e-9)


def test_fid_kid_and_inception_score_equal_torch_fidelity(inception_weights, sets):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric

    real, fake, real_features, fake_features = sets
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(inception_weights)).eval()
    with torch.no_grad():
        theirs = [dict(zip(["2048", "logits_unbiased"], reference(m.to_uint8(images)))) for images in (real, fake)]
    assert torch.allclose(real_features.pool, theirs[0]["2048"].double(), rtol=1e-4, atol=1e-6)

    fid_theirs = fid_statistics_to_metric(fid_featuresdict_to_statistics(theirs[0], "2048"),
                                          fid_featuresdict_to_statistics(theirs[1], "2048"), False)
    fid_ours = m.fid(real_features, fake_features)
    assert fid_ours > 1.0 and close(fid_ours, fid_theirs["frechet_inception_distance"])

    kid_theirs = kid_featuresdict_to_metric(theirs[0], theirs[1], "2048", kid_subset_size=4, verbose=False)
    kid_mean, _ = m.kid(real_features, fake_features)
    assert kid_mean != 0 and close(kid_mean, kid_theirs["kernel_inception_distance_mean"])

    isc_theirs = isc_featuresdict_to_metric(theirs[1], "logits_unbiased", isc_splits=1, verbose=False)
    is_mean, _ = m.inception_score(fake_features, splits=1)
    assert is_mean > 1.0 and close(is_mean, isc_theirs["inception_score_mean"])


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(extractor, sets):
    real, _, real_features, _ = sets
    assert abs(m.fid(real_features, real_features)) < 1e-3
    slightly = m.fid(real_features, extractor.extract(noisy(real, 8)))
    strongly = m.fid(real_features, extractor.extract(noisy(real, 60)))
    assert 1e-3 < slightly < strongly


def test_clip_score_equals_the_definition_on_transformers_clip(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = write_tiny_clip(tmp_path / "CLIP" / "tiny-clip")
    assert m.find_clip_model([tmp_path / "CLIP"]) == folder
    scorer = m.ClipScorer(folder)
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor.from_pretrained(str(folder))
    scores = []
    for image, prompt in zip(shapes(3, 3), ["a red apple", "three cats on a sofa", "a shop sign that says OPEN"]):
        with torch.no_grad():
            pixels = processor(images=[m.to_uint8([image])[0]], return_tensors="pt")["pixel_values"]
            text = processor(text=[prompt], return_tensors="pt", padding=True)
            a = model.get_image_features(pixel_values=pixels).pooler_output
            b = model.get_text_features(input_ids=text["input_ids"],
                                        attention_mask=text["attention_mask"]).pooler_output
        expected = float(100 * max(torch.nn.functional.cosine_similarity(a, b).item(), 0.0))
        ours = scorer.score(image, prompt)
        assert close(ours, expected)
        scores.append(ours)
    assert len(set(scores)) == 3


def test_clip_score_of_an_open_clip_model_equals_open_clip_directly(tmp_path):
    import open_clip

    folder = write_tiny_open_clip(tmp_path / "CLIP" / "tiny-open-clip")
    assert m.find_clip_model([tmp_path / "CLIP"], "tiny-open-clip") == folder
    scorer = m.ClipScorer(folder)
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device="cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    scores = []
    for image, prompt in zip(shapes(6, 3, size=48), ["a red apple", "three cats on a sofa", "a sign: OPEN"]):
        with torch.no_grad():
            a = model.eval().encode_image(preprocess(image)[None])
            b = model.encode_text(tokenizer([prompt]))
        expected = float(100 * max(torch.nn.functional.cosine_similarity(a, b).item(), 0.0))
        ours = scorer.score(image, prompt)
        assert close(ours, expected)
        scores.append(ours)
    assert len(set(scores)) == 3


def test_an_open_clip_safetensors_named_after_its_architecture_is_found(tmp_path):
    (tmp_path / "ViT-L-14.safetensors").write_bytes(b"")
    (tmp_path / "ViT-H-14__laion2b.safetensors").write_bytes(b"")
    (tmp_path / "my-encoder.safetensors").write_bytes(b"")  # no architecture in the name: not a CLIP model
    assert [p.name for p in m.clip_model_folders([tmp_path])] == ["ViT-H-14__laion2b.safetensors",
                                                                  "ViT-L-14.safetensors"]
    assert m.open_clip_architecture(tmp_path / "ViT-H-14__laion2b.safetensors") == "ViT-H-14"
    assert m.open_clip_architecture(tmp_path / "ViT-L-14-quickgelu.safetensors") == "ViT-L-14-quickgelu"
    assert m.find_clip_model([tmp_path], "ViT-L-14") == tmp_path / "ViT-L-14.safetensors"


def _alexnet_from(path):
    import torchvision

    network = torchvision.models.alexnet(weights=None)
    network.load_state_dict(torch.load(path, weights_only=True))
    return network


def test_lpips_equals_the_lpips_package_on_the_same_weights(tmp_path):
    """The reference: lpips.LPIPS loading its linear layers from the file and torchvision's AlexNet the way it
    does with real weights (``tv.alexnet(pretrained=True)``, here answered with the random file's network)."""
    from unittest import mock

    import lpips

    backbone, linear = write_random_lpips(tmp_path / "evaluation")
    assert m.find_lpips_weights([tmp_path / "evaluation"]) == (backbone, linear)
    scorer = m.LpipsScorer(backbone, linear)
    alexnet = _alexnet_from(backbone)
    with mock.patch("torchvision.models.alexnet", lambda *a, **k: alexnet):
        reference = lpips.LPIPS(net="alex", version="0.1", pretrained=True, model_path=str(linear),
                                verbose=False).eval()
    image, = shapes(8, 1, size=64)
    figures = []
    for amount in (10, 40):
        other, = noisy([image], amount)
        with torch.no_grad():
            expected = float(reference(lpips.im2tensor(np.asarray(other)), lpips.im2tensor(np.asarray(image))))
        ours = scorer.score(other, image)
        assert close(ours, expected)
        figures.append(ours)
    assert scorer.score(image, image) == pytest.approx(0.0, abs=1e-7)
    assert 0 < figures[0] < figures[1]


def test_lpips_with_the_installed_linear_layers_equals_torchmetrics(tmp_path):
    """Without alex.pth in models/evaluation/ the lpips package's own copy is used; torchmetrics' LPIPS ships
    the same linear layers, so their figures agree on the same backbone."""
    from unittest import mock

    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    backbone, _ = write_random_lpips(tmp_path / "evaluation", linear=False)
    found_backbone, linear = m.find_lpips_weights([tmp_path / "evaluation"])
    assert found_backbone == backbone and linear.name == m.LPIPS_LINEAR and linear.parent.name == "v0.1"
    scorer = m.LpipsScorer(backbone, linear)
    alexnet = _alexnet_from(backbone)
    with mock.patch("torchvision.models.alexnet", lambda *a, **k: alexnet):
        reference = LearnedPerceptualImagePatchSimilarity(net_type="alex")
    image, = shapes(9, 1, size=64)
    other, = noisy([image], 25)
    reference.update(m.LpipsScorer.to_tensor(other), m.LpipsScorer.to_tensor(image))
    assert close(scorer.score(other, image), float(reference.compute()))


def test_a_wrong_lpips_file_is_named(tmp_path):
    backbone, linear = write_random_lpips(tmp_path)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, linear)
    with pytest.raises(ValueError, match=rf"{linear}.*linear-layer.*lin1"):
        m.LpipsScorer(backbone, linear)


def test_ssim_and_psnr_equal_scikit_image_and_torchmetrics():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr

    image, = shapes(4, 1)
    other, = noisy([image], 20)
    a, b = np.asarray(image), np.asarray(other)
    assert m.ssim(other, image) == pytest.approx(structural_similarity(b, a, channel_axis=2, data_range=255),
                                                 rel=REL)
    assert m.psnr(other, image) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=REL)
    as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].double()  # noqa: E731
    assert m.psnr(other, image) == pytest.approx(float(tm_psnr(as_tensor(b), as_tensor(a), data_range=255.0)),
                                                 rel=REL)
    assert m.ssim(image, image) == pytest.approx(1.0) and m.psnr(image, image) == math.inf
    assert m.ssim(other, image) < 1.0


def test_missing_weights_name_the_file_and_the_folder(tmp_path):
    with pytest.raises(m.MissingWeights, match=rf"{m.INCEPTION_WEIGHTS}.*{tmp_path}"):
        m.find_inception_weights([tmp_path])
    with pytest.raises(m.MissingWeights, match=rf"CLIP.*open_clip.*{tmp_path}"):
        m.find_clip_model([tmp_path])
    with pytest.raises(m.MissingWeights, match=rf"LPIPS.*{m.LPIPS_BACKBONE}.*{tmp_path}"):
        m.find_lpips_weights([tmp_path])
