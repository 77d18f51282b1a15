"""``import ijepa_fast`` needs nothing but torch: no GPU, no compiler, no optional package.

The check runs in a fresh interpreter whose only packages are torch, its own required dependencies
and the installed ijepa_fast (linked into a temporary folder; ``python -S`` ignores site-packages),
with CUDA hidden, and trains one step on the CPU.
"""
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys

SKIP_DEPS = ("nvidia", "triton", "cuda")  # GPU runtime wheels a CUDA build of torch pulls in

SCRIPT = """
import sys
import torch
import ijepa_fast
from ijepa_fast import IJEPA, MaskConfig, MultiBlockSampler, Schedules, make_optimizer, train_step
import ijepa_fast.kernels
m = IJEPA.build('custom', img_size=32, patch_size=4, pred_depth=1, pred_dim=16, embed_dim=32, depth=1, num_heads=2)
s = MultiBlockSampler(m.grid, MaskConfig(min_keep=2))
r = train_step(m, make_optimizer(m), torch.randn(2, 3, 32, 32), s(2), 0, Schedules(10, 1, warmup=0.1), precision='auto')
assert r.loss > 0
assert not torch.cuda.is_initialized()
optional = ['numpy', 'yaml', 'PIL', 'triton', 'matplotlib', 'tqdm', 'safetensors', 'flash_attn', 'xformers', 'apex',
            'tensorboard', 'wandb']
print('lean ok', sorted(k for k in sys.modules if k.split('.')[0] in optional))
"""


def _dist_roots(dist) -> set[str]:
    roots = set()
    for f in dist.files or ():
        top = f.parts[0]
        if top not in ("..", "__pycache__") and not top.endswith(".pth"):
            roots.add(top)
    return roots


def _torch_only_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key.startswith(SKIP_DEPS):
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        base = dist.locate_file("")
        for top in _dist_roots(dist):
            src = os.path.join(base, top)
            if os.path.exists(src) and not (site / top).exists():
                os.symlink(src, site / top)
        for req in dist.requires or ():
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return site


def test_lean_import_needs_only_torch(tmp_path):
    site = _torch_only_site(tmp_path)
    os.symlink(os.path.dirname(importlib.util.find_spec("ijepa_fast").origin), site / "ijepa_fast")  # as installed
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
           "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-S", "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "lean ok []" in p.stdout, p.stdout
