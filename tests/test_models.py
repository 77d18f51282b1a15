import math

import pytest
import torch

from ijepa_fast.model import IJEPA
from ijepa_fast.models import VIT_SIZES, VisionTransformer, attention, attention_reference, build_encoder
from ijepa_fast.models.attention import key_mask_from_lengths
from ijepa_fast.models.pos_embed import interpolate_pos_embed, sincos_2d


def vit_param_count(dim, depth, mlp, patch):
    """Closed form: patch embedding, per block 2 LayerNorms + qkv + proj + fc1 + fc2, final LayerNorm."""
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return 3 * patch * patch * dim + dim + depth * block + 2 * dim


@pytest.mark.parametrize("name,patch", [("vit_tiny", 16), ("vit_small", 16), ("vit_base", 16), ("vit_large", 16),
                                        ("vit_huge", 14), ("vit_giant", 16)])
def test_model_sizes_parameter_counts(name, patch):
    with torch.device("meta"):
        enc = build_encoder(name, 224, patch)
    s = VIT_SIZES[name]
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert trainable == vit_param_count(s.dim, s.depth, int(s.dim * s.mlp_ratio), patch)
    assert enc.pos_embed.shape == (1, (224 // patch) ** 2, s.dim)
    if name == "vit_huge":
        assert 625e6 < trainable < 635e6  # "about 632M" for ViT-H
    assert len(enc.blocks) == s.depth and enc.blocks[0].attn.num_heads == s.heads
    assert enc.blocks[0].mlp.fc1.out_features == int(s.dim * s.mlp_ratio)


def test_model_reference_parameter_names_and_frozen_tables():
    m = IJEPA.build("vit_tiny", img_size=64, patch_size=16, pred_depth=2, pred_dim=96)
    keys = set(m.encoder.state_dict())
    for k in ("pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.bias", "blocks.0.mlp.fc2.weight",
              "norm.bias"):
        assert k in keys
    pkeys = set(m.predictor.state_dict())
    for k in ("mask_token", "predictor_pos_embed", "predictor_embed.weight", "predictor_blocks.1.norm2.weight",
              "predictor_norm.weight", "predictor_proj.bias"):
        assert k in pkeys
    assert not m.encoder.pos_embed.requires_grad and not m.predictor.predictor_pos_embed.requires_grad
    assert not any(p.requires_grad for p in m.target_encoder.parameters())


@pytest.mark.parametrize("init", ["rescaled", "released"])
def test_model_init_statistics(init):
    torch.manual_seed(0)
    m = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=4, pred_dim=64, init=init, embed_dim=256,
                    depth=8, num_heads=4)
    for i, blk in enumerate(m.encoder.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * i) if init == "rescaled" else 0.02
        assert blk.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.08)
        assert blk.mlp.fc2.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert blk.attn.qkv.weight.abs().max() <= 2.0 and blk.attn.qkv.bias.abs().max() == 0
    assert m.predictor.mask_token.std().item() == pytest.approx(0.02, rel=0.3)
    torch.testing.assert_close(m.encoder.norm.weight, torch.ones(256))


def test_model_same_seed_same_weights():
    a = [IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=32, embed_dim=64, depth=2,
                     num_heads=2) for _ in range(2) if torch.manual_seed(7) is not None]
    for (k, v), (_, w) in zip(a[0].state_dict().items(), a[1].state_dict().items()):
        assert torch.equal(v, w), k


def test_model_pos_embed_layout_columns_then_rows():
    t = sincos_2d(16, (3, 5))  # 3 rows, 5 columns
    assert t.shape == (15, 16)
    # patch (r=1, c=2) is row-major index 7: first half encodes column 2, second half row 1
    assert torch.allclose(t[7, :8], sincos_2d(16, (1, 5))[2, :8])
    assert t[7, 0].item() == pytest.approx(math.sin(2.0)) and t[7, 8].item() == pytest.approx(math.sin(1.0))
    assert t[7, 4].item() == pytest.approx(math.cos(2.0))


def test_model_pos_interpolation_exact_at_native_grid_and_resizes():
    table = sincos_2d(32, (4, 4)).unsqueeze(0)
    assert interpolate_pos_embed(table, (4, 4), (4, 4)) is table
    big = interpolate_pos_embed(table, (4, 4), (8, 6))
    assert big.shape == (1, 48, 32)
    # a smooth table stays close to the table computed on the scaled grid's corners
    assert torch.allclose(big.reshape(8, 6, 32)[0, 0], table.reshape(4, 4, 32)[0, 0], atol=0.35)


def test_model_runs_at_other_resolutions_and_rectangles():
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    assert enc(torch.randn(2, 3, 48, 64)).shape == (2, 48, 32)
    rect = VisionTransformer(img_size=(16, 40), patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert rect.grid == (2, 5) and rect(torch.randn(1, 3, 16, 40)).shape == (1, 10, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_model_attention_sdpa_matches_reference_with_padding(dtype, tol):
    b, h, n, d = 3, 2, 7, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    valid = key_mask_from_lengths(torch.tensor([7, 4, 1]), n)
    out = attention(q, k, v, valid, impl="sdpa")
    ref = attention_reference(*(t.float() for t in (q, k, v)), valid)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max() * 4
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g.to(out.dtype).float())
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    grads_ref = torch.autograd.grad(attention_reference(q2, k2, v2, valid), (q2, k2, v2), g)
    for a, r in zip(grads, grads_ref):
        assert (a.float() - r).abs().max() <= tol * r.abs().max() * 4 + 1e-6
    # padded keys carry nothing: changing them leaves real rows unchanged
    k3 = k.detach().clone()
    k3[1, :, 4:] = 100.0
    out2 = attention(q.detach(), k3, v.detach(), valid, impl="sdpa")
    assert torch.allclose(out2[1, :, :4].float(), out[1, :, :4].detach().float(), atol=1e-6)
