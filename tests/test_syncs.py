"""Host synchronisations: the counter finds planted ones, and the model's forward and backward on
the default layouts perform none (padded and packed, reference ops and Triton kernels)."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import needs_triton

from ijepa_fast.bench.profiling import count_host_syncs
from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.models.varlen import VarlenMeta, available, pad_index


def _ops(counter):
    return [e.op for e in counter.events]


def test_counter_catches_planted_syncs_with_their_line():
    x = torch.randn(16, device=DEVICE)
    reps = torch.randint(0, 3, (16,), device=DEVICE)
    with count_host_syncs() as syncs:
        x.sum().item()
        torch.nonzero(x > 0)
        torch.repeat_interleave(reps)
        x[x > 0]
        x.tolist()
        int(x[0] > 0)
    assert _ops(syncs) == ["_local_scalar_dense", "nonzero", "repeat_interleave", "index", "tolist",
                           "_local_scalar_dense"], syncs.report()
    assert all("test_syncs.py" in e.where for e in syncs.events), syncs.report()
    assert syncs.counts()["_local_scalar_dense"] == 2


def test_counter_ignores_sync_free_ops():
    x = torch.randn(4, 8, device=DEVICE)
    reps = torch.tensor([1, 0, 2, 3], device=DEVICE)
    with count_host_syncs() as syncs:
        torch.repeat_interleave(reps, output_size=6)
        x.repeat_interleave(2, dim=0)
        x[torch.tensor([0, 2], device=DEVICE)]
        torch.where(x > 0, x, 0.0).sum()
    assert syncs.total == 0, syncs.report()


def test_counter_sees_inside_custom_ops():
    @torch.library.custom_op("test_syncs::reads_back", mutates_args=())
    def reads_back(x: torch.Tensor) -> torch.Tensor:
        return x * int(x.abs().sum() > 0)

    with count_host_syncs() as syncs:
        reads_back(torch.randn(4, device=DEVICE))
    assert _ops(syncs) == ["item"] and "reads_back" in syncs.events[0].where, syncs.report()


def test_pad_index_matches_the_positions_of_valid_slots():
    lengths = torch.tensor([3, 0, 5, 1], device=DEVICE)
    meta = VarlenMeta.from_lengths(lengths)
    pos, valid = pad_index(meta, int(lengths.sum()))
    torch.testing.assert_close(pos, torch.nonzero(valid.flatten()).flatten())
    with count_host_syncs() as syncs:
        pad_index(meta, 9)
    assert syncs.total == 0, syncs.report()


def test_packing_plan_from_host_sizes_matches_the_plan_read_back():
    from ijepa_fast.kernels.predictor_tokens import plan

    lengths = torch.tensor([3, 1, 5, 2], device=DEVICE)
    meta = VarlenMeta.from_lengths(lengths)
    ctx_idx = torch.randint(0, 16, (int(lengths.sum()),), device=DEVICE)
    tgt_idx = torch.randint(0, 16, (4, 3), device=DEVICE)  # K = 2 target blocks, B = 2 images
    read_back = plan(ctx_idx, meta.cu_seqlens, tgt_idx, 2)
    with count_host_syncs() as syncs:
        given = plan(ctx_idx, meta.cu_seqlens, tgt_idx, 2, max_context=meta.max_seqlen)
    assert syncs.total == 0, syncs.report()
    assert given.max_seqlen == read_back.max_seqlen == 5 + 3
    for a, b in zip(given[:5], read_back[:5]):
        torch.testing.assert_close(a, b)


def _model_and_masks(dtype=torch.float32):
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=1,
                        num_heads=3).to(DEVICE, dtype)
    sampler = MultiBlockSampler(model.grid, MaskConfig(min_keep=4, num_context=2), seed=1)
    masks = next(mb for mb in (sampler.sample(3, s) for s in range(40)) if mb.context_lens is not None)
    return model, masks, torch.randn(3, 3, 32, 32, device=DEVICE, dtype=dtype)


def _count_step(model, masks, images):
    prepared = model.prepare(masks).to(DEVICE)  # on the host, before the copy, as the trainer does
    with count_host_syncs() as syncs:
        loss = model.loss(images, prepared)
        loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    return syncs


LAYOUTS = [("padded", "auto"), ("packed", "padded")]


@pytest.mark.parametrize("layout,varlen", LAYOUTS)
def test_forward_backward_without_host_syncs_reference_ops(layout, varlen):
    model, masks, images = _model_and_masks()
    model.configure_layout(layout, varlen).configure_kernels("reference")
    syncs = _count_step(model, masks, images)
    assert syncs.total == 0, syncs.report()


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout,varlen", LAYOUTS)
def test_forward_backward_without_host_syncs_triton_kernels(layout, varlen, deterministic):
    model, masks, images = _model_and_masks()
    model.configure_layout(layout, varlen).configure_kernels("triton", deterministic)
    syncs = _count_step(model, masks, images)
    assert syncs.total == 0, syncs.report()


@pytest.mark.skipif(DEVICE != "cuda", reason="fused variable-length attention runs on CUDA")
def test_packed_step_with_fused_varlen_attention_without_host_syncs():
    model, masks, images = _model_and_masks(torch.bfloat16)
    probe = torch.empty(0, device=DEVICE, dtype=torch.bfloat16)
    if not any(available(b, probe) for b in ("flash_attn", "torch_varlen")):
        pytest.skip("no fused variable-length attention here")
    model.configure_layout("packed", "auto").configure_kernels("auto")
    syncs = _count_step(model, masks, images)
    assert syncs.total == 0, syncs.report()
