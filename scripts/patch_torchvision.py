"""Make PyPI's CUDA torchvision importable beside the CPU torch wheel (see shared ENV.md).

torchvision registers fake kernels for torchvision::nms and torchvision::qnms unconditionally; without its
compiled ops that raises at import and breaks `import vllm` and transformers' image processors. We guard those two
decorators with `torchvision.extension._has_ops()`, the guard torchvision uses for its other ops. Idempotent.
"""
from __future__ import annotations

import sys
from pathlib import Path

GUARD = "(torch.library.register_fake({op}) if torchvision.extension._has_ops() else (lambda fn: fn))"


def patch(site_packages: Path) -> str:
    target = site_packages / "torchvision" / "_meta_registrations.py"
    if not target.exists():
        return "torchvision not installed: nothing to patch"
    source = target.read_text()
    patched = source
    for op in ('"torchvision::nms"', '"torchvision::qnms"'):
        patched = patched.replace(f"@torch.library.register_fake({op})", "@" + GUARD.format(op=op))
    if patched == source:
        return "torchvision already patched"
    target.write_text(patched)
    for cache in target.parent.glob("__pycache__/_meta_registrations*.pyc"):
        cache.unlink()
    return f"patched {target}"


if __name__ == "__main__":
    print(patch(Path(sys.argv[1])))
