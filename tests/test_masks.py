"""Multi-block sampler: invariants, statistics against the reference's, determinism."""
import dataclasses

import pytest
import torch

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler, block_size
from ijepa_fast.masks.rng import Stream, derive, splitmix64


def cfg(**kw):
    return dataclasses.replace(MaskConfig(), **kw)


def rows_of(idx, lens=None):
    """Per image: list of index sets per block (padding removed)."""
    m, b, _ = idx.shape
    out = []
    for j in range(b):
        out.append([set(idx[i, j, : (int(lens[i, j]) if lens is not None else idx.shape[-1])].tolist())
                    for i in range(m)])
    return out


def test_sampler_rng_is_specified_splitmix64():
    # splitmix64 seeded with 0: the published first outputs of the generator
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    st = Stream(0)
    assert [st.next_u64() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    st = Stream(derive(5, 1, 2))
    draws = [st.randint(3, 9) for _ in range(2000)]
    assert min(draws) == 3 and max(draws) == 8
    us = [Stream(derive(1, i)).uniform() for i in range(2000)]
    assert 0.0 <= min(us) and max(us) < 1.0 and abs(sum(us) / len(us) - 0.5) < 0.03


def test_sampler_streams_of_different_seeds_and_steps_never_coincide():
    keys = {derive(seed, step, rank, b) for seed in range(6) for step in range(6) for rank in range(3)
            for b in range(4)}
    assert len(keys) == 6 * 6 * 3 * 4
    a = MultiBlockSampler((16, 16), cfg(), seed=0).sample(8, 1)
    b = MultiBlockSampler((16, 16), cfg(), seed=1).sample(8, 0)
    assert not torch.equal(a.context, b.context) or not torch.equal(a.targets, b.targets)


def test_sampler_block_size_reference_rule():
    # r = 0: scale 0.15 of 256 -> 38 patches, aspect 0.75 -> h = round(sqrt(28.5)) = 5, w = round(sqrt(50.67)) = 7
    assert block_size(0.0, (0.15, 0.2), (0.75, 1.5), (16, 16)) == (5, 7)
    # r = 1: scale 0.2 -> 51, aspect 1.5 -> h = round(8.75) = 9, w = round(5.83) = 6
    assert block_size(1.0, (0.15, 0.2), (0.75, 1.5), (16, 16)) == (9, 6)
    # the context block (scale 1, aspect 1) is reduced until smaller than the grid
    assert block_size(1.0, (0.85, 1.0), (1.0, 1.0), (16, 16)) == (15, 15)
    # default mode: a block may span the whole grid
    assert block_size(1.0, (0.85, 1.0), (1.0, 1.0), (16, 16), "default") == (16, 16)
    assert block_size(0.0, (0.15, 0.2), (0.75, 1.5), (16, 16), "default") == (5, 7)


def test_sampler_default_context_blocks_cover_the_documented_range():
    """mask.mode=default: context blocks of 85-100 % of the image (224 px / patch 14: 15 x 15 or the
    whole 16 x 16 grid); reference mode never exceeds 15 x 15, as the released sampler."""
    sizes = {mode: {MultiBlockSampler((16, 16), cfg(mode=mode), seed=4).block_sizes(s)[1] for s in range(300)}
             for mode in ("default", "reference")}
    assert sizes["default"] == {(15, 15), (16, 16)}
    assert sizes["reference"] == {(15, 15)}
    sampler = MultiBlockSampler((16, 16), cfg(), seed=4)
    step = next(s for s in range(300) if sampler.block_sizes(s)[1] == (16, 16))
    mb = sampler.sample(8, step)
    for tgt_sets, (ctx,) in zip(rows_of(mb.targets), rows_of(mb.context, mb.context_lens)):
        assert ctx == set(range(256)) - set().union(*tgt_sets)  # the whole image but the targets


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_sampler_invariants(mode):
    s = MultiBlockSampler((14, 14), cfg(mode=mode), seed=11)
    for step in range(20):
        mb = s.sample(16, step)
        (th, tw), _ = s.block_sizes(step)
        assert mb.targets.shape == (4, 16, th * tw) and mb.target_lens is None
        for tgt_sets, ctx_sets in zip(rows_of(mb.targets), rows_of(mb.context, mb.context_lens)):
            union = set().union(*tgt_sets)
            for t in tgt_sets:  # each target block is an axis-aligned th x tw rectangle
                rows = {i // 14 for i in t}
                cols = {i % 14 for i in t}
                assert len(rows) == th and len(cols) == tw and len(t) == th * tw
                assert max(rows) - min(rows) == th - 1 and max(cols) - min(cols) == tw - 1
            (ctx,) = ctx_sets
            assert len(ctx) > 10 and not (ctx & union), "context overlaps a target block"
        assert (mb.context >= 0).all() and (mb.context < 196).all()
        lens = mb.context_lens if mb.context_lens is not None else torch.full((1, 16), mb.context.shape[-1])
        for j in range(16):  # the real indices of every row are strictly increasing (row-major)
            real = mb.context[0, j, : int(lens[0, j])]
            assert (real[1:] > real[:-1]).all()


def test_sampler_reference_truncates_to_batch_minimum():
    ref = MultiBlockSampler((16, 16), cfg(mode="reference"), seed=2)
    for step in range(10):
        mb = ref.sample(32, step)
        counts = _untruncated_counts(ref, 32, step)
        assert len(set(counts)) > 1
        assert mb.context.shape[-1] == min(counts) and mb.context_lens is None


def _untruncated_counts(sampler, batch, step):
    (th, tw), (ch, cw) = sampler.block_sizes(step)
    shift = 0 if sampler.cfg.mode == "reference" else 1
    counts = []
    for b in range(batch):
        key = derive(sampler.seed, step, sampler.rank + b * sampler.world)
        tgt, ctx = sampler._draw_image(Stream(key), th, tw, ch, cw, shift)
        top, left, n = ctx[0]
        cells = {(r, c) for r in range(top, top + ch) for c in range(left, left + cw)}
        for (tt, tl) in tgt[:n]:
            cells -= {(r, c) for r in range(tt, tt + th) for c in range(tl, tl + tw)}
        counts.append(len(cells))
    return counts


def test_sampler_default_reaches_every_position_reference_does_not():
    grid = (10, 10)
    hits = {}
    for mode in ("reference", "default"):
        s = MultiBlockSampler(grid, cfg(mode=mode, min_keep=4), seed=0)
        tgt = torch.zeros(100, dtype=torch.bool)
        ctx = torch.zeros(100, dtype=torch.bool)
        for step in range(60):
            mb = s.sample(16, step)
            tgt[mb.targets.flatten()] = True
            lens = mb.context_lens if mb.context_lens is not None else torch.full((1, 16), mb.context.shape[-1])
            for j in range(16):
                ctx[mb.context[0, j, : int(lens[0, j])]] = True
        hits[mode] = tgt.view(10, 10), ctx.view(10, 10)
    assert hits["default"][0].all() and hits["default"][1].all(), "default mode never drew some positions"
    # the reference's exclusive bound: neither targets nor contexts ever touch the last row or column
    for covered in hits["reference"]:
        assert not covered[-1].any() and not covered[:, -1].any()
    assert hits["reference"][0][:-1, :-1].all()


@pytest.mark.parametrize("img,patch,batch,ctx,tgt", [(224, 14, 128, 68.7, 176.8), (224, 16, 64, 53.3, 133.1),
                                                     (96, 8, 32, 39.0, 97.5)])
def test_sampler_reference_statistics_match_reference(img, patch, batch, ctx, tgt):
    """Mean context and target tokens per image over 200 batches, within 3% of the reference's."""
    s = MultiBlockSampler((img // patch, img // patch), cfg(mode="reference"), seed=0)
    c = t = 0.0
    for step in range(200):
        a, b = s.sample(batch, step).mean_tokens()
        c, t = c + a / 200, t + b / 200
    assert c == pytest.approx(ctx, rel=0.03) and t == pytest.approx(tgt, rel=0.03)


def test_sampler_default_keeps_more_context_than_reference():
    ref = MultiBlockSampler((16, 16), cfg(mode="reference"), seed=0)
    dflt = MultiBlockSampler((16, 16), cfg(mode="default"), seed=0)
    c_ref = sum(ref.sample(64, s).mean_tokens()[0] for s in range(30)) / 30
    c_def = sum(dflt.sample(64, s).mean_tokens()[0] for s in range(30)) / 30
    assert c_def > 1.3 * c_ref  # no truncation to the batch minimum


def test_sampler_seeded_per_step_and_stateful_counter():
    s = MultiBlockSampler((16, 16), cfg(), seed=9)
    a = [s(8) for _ in range(3)]
    fresh = MultiBlockSampler((16, 16), cfg(), seed=9)
    b = fresh.sample(8, 2)  # step 2 directly, without drawing steps 0 and 1
    assert torch.equal(a[2].context, b.context) and torch.equal(a[2].targets, b.targets)
    assert not torch.equal(a[0].targets, a[1].targets)
    state = s.state_dict()
    nxt = s(8)
    restored = MultiBlockSampler((16, 16), cfg(), seed=0)
    restored.load_state_dict(state)
    again = restored(8)
    assert torch.equal(nxt.context, again.context) and torch.equal(nxt.targets, again.targets)
    other_seed = MultiBlockSampler((16, 16), cfg(), seed=10).sample(8, 2)
    assert not torch.equal(other_seed.targets, b.targets)


def test_sampler_global_batch_is_the_same_on_any_number_of_processes():
    """Image b of rank r is image r + b * world of the global batch: a batch of 12 drawn by one
    process equals the same 12 images drawn by 3 ranks of 4 (default mode: nothing truncated)."""
    one = MultiBlockSampler((16, 16), cfg(), seed=4).sample(12, 9)
    real = one.context_lens[0] if one.context_lens is not None else torch.full((12,), one.context.shape[-1])
    for rank in range(3):
        part = MultiBlockSampler((16, 16), cfg(), seed=4, rank=rank, world=3).sample(4, 9)
        lens = part.context_lens[0] if part.context_lens is not None else torch.full((4,), part.context.shape[-1])
        for b in range(4):
            g = rank + b * 3
            assert torch.equal(part.targets[:, b], one.targets[:, g])
            assert torch.equal(part.context[0, b, : lens[b]], one.context[0, g, : real[g]])
    with pytest.raises(ValueError, match="rank"):
        MultiBlockSampler((16, 16), cfg(), rank=3, world=3)


def test_sampler_ranks_share_sizes_not_positions():
    r0 = MultiBlockSampler((16, 16), cfg(), seed=1, rank=0, world=2).sample(8, 4)
    r1 = MultiBlockSampler((16, 16), cfg(), seed=1, rank=1, world=2).sample(8, 4)
    assert r0.targets.shape == r1.targets.shape
    assert not torch.equal(r0.targets, r1.targets)


def test_sampler_errors_name_the_option():
    with pytest.raises(ValueError, match="mask.min_keep"):
        MultiBlockSampler((6, 6), cfg(min_keep=10)).sample(2, 0)
    with pytest.raises(ValueError, match="mask.mode"):
        MultiBlockSampler((6, 6), cfg(mode="article"))
    s = MultiBlockSampler((8, 8), cfg(mode="reference", min_keep=4))
    with pytest.raises(ValueError, match="mask.mode"):
        s.load_state_dict({"seed": 0, "step": 3, "mode": "default"})


def test_sampler_relaxes_constraints_when_context_is_too_small():
    """Large targets leave no room: after every 20 failed draws the sampler stops avoiding one more
    target block, the last one first, instead of looping forever."""
    s = MultiBlockSampler((8, 8), cfg(target_scale=(0.5, 0.55), context_scale=(0.3, 0.35), min_keep=8), seed=0)
    (th, tw), (ch, cw) = s.block_sizes(0)
    mb = s.sample(16, 0)
    lens = mb.context_lens if mb.context_lens is not None else torch.full((1, 16), mb.context.shape[-1])
    assert (lens > 8).all()
    relaxed = 0
    for b in range(16):
        tgt, ctx = s._draw_image(Stream(derive(s.seed, 0, s.rank + b * s.world)), th, tw, ch, cw, 1)
        n = ctx[0][2]
        relaxed += n < 4
        real = set(mb.context[0, b, : int(lens[0, b])].tolist())
        for k, block in enumerate(mb.targets[:, b].tolist()):
            if k < n:  # the blocks still avoided are the first n
                assert not real & set(block)
    assert relaxed > 0, "this setting should need relaxations"


# ---------------------------------------------------------------------------------------------
# the compiled sampler (csrc/): bit-identical to this Python one

def _native_or_skip():
    from ijepa_fast.masks import native

    mod = native.load()
    if mod is None:
        pytest.skip(f"the compiled sampler could not be built here: {native.reason()}")
    return mod


SAMPLER_CASES = [((16, 16), {}), ((14, 14), {"num_context": 2}), ((8, 8), {"min_keep": 4}),
                 ((12, 20), {"min_keep": 4, "allow_overlap": True}),
                 ((8, 8), {"min_keep": 8, "target_scale": (0.5, 0.55), "context_scale": (0.3, 0.35)}),
                 ((32, 32), {"num_targets": 2, "target_aspect": (0.3, 3.0)})]


@pytest.mark.parametrize("mode", ["reference", "default"])
@pytest.mark.parametrize("grid,kw", SAMPLER_CASES)
def test_sampler_cpp_bit_identical_to_python(mode, grid, kw):
    _native_or_skip()
    c = cfg(mode=mode, **kw)
    py = MultiBlockSampler(grid, c, seed=7, rank=1, world=3, impl="python")
    cc = MultiBlockSampler(grid, c, seed=7, rank=1, world=3, impl="cpp")
    for step in range(25):
        a, b = py.sample(16, step), cc.sample(16, step)
        assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets), f"step {step}"
        assert (a.context_lens is None) == (b.context_lens is None)
        if a.context_lens is not None:
            assert torch.equal(a.context_lens, b.context_lens)
    assert py.sample(0, 3).context.shape[1] == cc.sample(0, 3).context.shape[1] == 0


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_sampler_cpp_packed_output_matches_packing(mode):
    from ijepa_fast.perf.packing import pack

    mod = _native_or_skip()
    s = MultiBlockSampler((16, 16), cfg(mode=mode, num_context=2), seed=3, impl="python")
    idx, cu, targets, sizes = mod.sample_packed(*s._native_args(12, 5))
    p = pack(s.sample(12, 5))
    assert torch.equal(idx, p.ctx_idx) and torch.equal(cu, p.ctx_meta.cu_seqlens) and cu.dtype == torch.int32
    assert torch.equal(targets, p.targets)
    assert tuple(sizes.tolist()) == tuple(v for hw in s.block_sizes(5) for v in hw)


def test_sampler_python_fallback_without_extension(tmp_path):
    """No compiler (or IJEPA_FAST_NO_EXT=1): 'auto' falls back to Python with a logged reason,
    'cpp' says what to do."""
    import os
    import subprocess
    import sys

    script = ("import torch; from ijepa_fast.config import MaskConfig; from ijepa_fast.masks import MultiBlockSampler\n"
              "from ijepa_fast.masks import native\n"
              "s = MultiBlockSampler((16, 16), MaskConfig(), impl='auto'); s(4)\n"
              "print('fallback', native.load() is None, native.reason())\n"
              "try:\n    MultiBlockSampler((16, 16), MaskConfig(), impl='cpp')(4)\n"
              "except RuntimeError as e:\n    print('cpp error:', e)\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "CXX": str(tmp_path / "no-compiler"), "MAX_JOBS": "1"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fallback True" in p.stdout and "mask.sampler=cpp but the compiled sampler is unavailable" in p.stdout
    env["IJEPA_FAST_NO_EXT"] = "1"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "fallback True IJEPA_FAST_NO_EXT=1" in p.stdout
