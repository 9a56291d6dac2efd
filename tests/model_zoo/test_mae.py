"""MAE: the forward equals MONAI's for the same visible patches, the masked loss, and K-masking test maps."""

from __future__ import annotations

import pytest
import torch

from data.batch import Batch
from model_zoo.mae import MaskedAE

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")


def _tiny(**overrides) -> MaskedAE:
    torch.manual_seed(0)
    params = {"image_size": 16, "patch_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2,
              "decoder_hidden_size": 16, "decoder_mlp_dim": 32, "decoder_num_layers": 1, "decoder_num_heads": 2,
              "test_maskings": 4} | overrides
    return MaskedAE(**params)


def test_patchify_round_trips_and_orders_patches_like_the_tokens() -> None:
    model = _tiny()
    x = torch.arange(256.0).reshape(1, 1, 16, 16)
    patches = model.patchify(x)
    assert patches.shape == (1, 16, 16)
    torch.testing.assert_close(patches[0, 1], x[0, 0, :4, 4:8].flatten())  # second token: first row, second column
    torch.testing.assert_close(model.unpatchify(patches), x)


def test_predict_matches_monai_forward_for_the_same_visible_patches(monkeypatch) -> None:
    model = _tiny().eval()
    x = torch.rand(2, 1, 16, 16)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    pred, mask = model.predict(x, noise)
    keep = noise.argsort(dim=1)[:, :4]
    assert torch.equal(mask.sum(dim=1), torch.tensor([12.0, 12.0]))
    assert torch.equal(mask.gather(1, keep), torch.zeros(2, 4))

    def masking(tokens, masking_ratio=None):
        reordered = keep.flip(1)  # MONAI's token order must not matter
        visible = tokens[torch.arange(2)[:, None], reordered]
        monai_mask = torch.ones(2, 16, dtype=torch.int).scatter(1, reordered, 0)
        return visible, reordered, monai_mask

    monkeypatch.setattr(model.net, "_masking", masking)
    monai_pred, monai_mask = model.net(x)
    torch.testing.assert_close(pred, monai_pred)
    torch.testing.assert_close(mask, monai_mask.float())


def test_loss_covers_masked_patches_only(monkeypatch) -> None:
    model = _tiny()
    x = torch.rand(2, 1, 16, 16)
    fixed_pred = model.patchify(x).clone()
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1.0
    mask[1, 5] = 1.0
    fixed_pred[0, :3] += 0.5  # error only on masked patches ...
    fixed_pred[:, 10:] += 3.0  # ... and a larger one on visible patches, which must not count
    monkeypatch.setattr(model, "predict", lambda inp, noise: (fixed_pred, mask))
    loss = model.training_losses(Batch(image=x))["masked_mse"]
    torch.testing.assert_close(loss, torch.tensor(3 * 0.25 / 4))


def test_map_averages_predictions_over_the_passes_that_masked_each_pixel(monkeypatch) -> None:
    model = _tiny(test_maskings=3).eval()
    x = torch.full((1, 1, 16, 16), 0.5)
    masks = [torch.zeros(1, 16) for _ in range(3)]
    masks[0][0, 0] = masks[1][0, 0] = 1.0  # patch 0 masked twice: predictions 0.2 and 0.4 -> mean 0.3
    masks[2][0, 1] = 1.0  # patch 1 masked once: prediction 0.9 (the -1 sentinel of the predecessor is legal here)
    values = [0.2, 0.4, 0.9]
    calls = iter(range(3))

    def fake(inp, noise):
        k = next(calls)
        return torch.full((1, 16, 16), values[k]) * masks[k][..., None] - (1 - masks[k][..., None]), masks[k]

    monkeypatch.setattr(model, "predict", fake)
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    rec = out.reconstruction[0, 0]
    torch.testing.assert_close(rec[:4, :4], torch.full((4, 4), 0.3))
    torch.testing.assert_close(rec[:4, 4:8], torch.full((4, 4), 0.9))
    torch.testing.assert_close(rec[4:], torch.full((12, 16), 0.5))  # never masked: keeps the input, zero residual
    assert out.extras["mask_count"][0, 0, 0, 0] == 2 and out.extras["mask_count"][0, 0, 8, 8] == 0


def test_maskings_come_from_the_generator_and_one_image_ignores_the_others() -> None:
    model = _tiny(test_maskings=5).eval()
    x = torch.rand(3, 1, 16, 16)
    first = model.get_anomaly(x, generator=torch.Generator().manual_seed(7)).anomaly_map
    torch.rand(3)  # the global RNG must not matter
    again = model.get_anomaly(x, generator=torch.Generator().manual_seed(7)).anomaly_map
    other = model.get_anomaly(x, generator=torch.Generator().manual_seed(8)).anomaly_map
    assert torch.equal(first, again) and not torch.allclose(first, other)
    alone = model.get_anomaly(x[:1], generator=torch.Generator().manual_seed(7)).anomaly_map
    torch.testing.assert_close(alone, first[:1])
    swapped = torch.cat([x[:1], torch.rand(2, 1, 16, 16)])
    torch.testing.assert_close(model.get_anomaly(swapped, generator=torch.Generator().manual_seed(7)).anomaly_map[:1],
                               first[:1])


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _tiny(image_size=18)
    with pytest.raises(ValueError, match="mask_ratio"):
        _tiny(mask_ratio=0.99)
    with pytest.raises(ValueError, match="test_maskings"):
        _tiny(test_maskings=0)
