"""torch.hub entry points: I-JEPA encoders, with weights read only from a local checkpoint file.

    import torch
    encoder = torch.hub.load("/path/to/ijepa-fast", "vit_huge14", source="local", checkpoint="vith14.pth.tar")
    features = encoder(images)                                   # [B, tokens, 1280]

Every entry point takes ``checkpoint=PATH`` (one of ours, a published one, a sharded folder or a
Lightning ``.ckpt`` of ``IJEPAModule``) and ``which="target_encoder"`` (the encoder I-JEPA
evaluates) or ``"encoder"`` (the context encoder). Nothing is ever downloaded: without
``checkpoint`` the encoder is freshly initialised. ``encoder`` reads the architecture off any
checkpoint; the named sizes also check the checkpoint is that size (``img_size`` only sizes a
fresh encoder). Extra keywords go to
``VisionTransformer`` (e.g. ``attn_impl="math"``).
"""
dependencies = ["torch"]


def encoder(checkpoint, which: str = "target_encoder", num_heads: int | None = None, **kw):
    """The encoder of any I-JEPA checkpoint, its architecture read off the weights."""
    from ijepa_fast.checkpoint.format import encoder_from_checkpoint

    return encoder_from_checkpoint(checkpoint, which, num_heads, **kw).eval()


def _named(name: str, patch_size: int, checkpoint, which: str, img_size, kw):
    from ijepa_fast.errors import CheckpointError, CheckpointUnreadable
    from ijepa_fast.models import VIT_SIZES, build_encoder

    if checkpoint is None:
        return build_encoder(name, img_size, patch_size, **kw).eval()
    try:
        enc = encoder(checkpoint, which, VIT_SIZES[name].heads, **kw)
    except CheckpointUnreadable:
        raise
    except (CheckpointError, ValueError, RuntimeError) as e:  # another width: heads or shapes do not fit
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{checkpoint} does not hold a {name} encoder with patch {patch_size} ({why}); load it "
                              f"with the 'encoder' entry point, which reads the size off the weights") from None
    size = VIT_SIZES[name]
    found = (enc.embed_dim, len(enc.blocks), enc.patch_size)
    if found != (size.dim, size.depth, patch_size):
        raise CheckpointError(f"{checkpoint} holds a width {found[0]}, depth {found[1]}, patch {found[2]} encoder, "
                              f"not {name} with patch {patch_size}; load it with the 'encoder' entry point")
    return enc


def _entry(name: str, patch: int, img: int, doc: str):
    """An entry point for one encoder size (torch.hub lists module-level callables)."""
    def build(checkpoint=None, which: str = "target_encoder", img_size=img, **kw):
        return _named(name, patch, checkpoint, which, img_size, kw)

    build.__doc__ = doc
    return build


vit_tiny16 = _entry("vit_tiny", 16, 224, "ViT-Tiny, patch 16.")
vit_small16 = _entry("vit_small", 16, 224, "ViT-Small, patch 16.")
vit_base16 = _entry("vit_base", 16, 224, "ViT-Base, patch 16.")
vit_large16 = _entry("vit_large", 16, 224, "ViT-Large, patch 16.")
vit_huge14 = _entry("vit_huge", 14, 224, "ViT-Huge, patch 14 (the released IN-1k and IN-22k checkpoints).")
vit_huge16 = _entry("vit_huge", 16, 448, "ViT-Huge, patch 16 (the released 448 px checkpoint).")
vit_giant16 = _entry("vit_giant", 16, 224, "ViT-Giant, patch 16 (the released IN-22k checkpoint).")
