"""Which modules and layers a LoRA run adapts: --targets presets and --layers ranges, parsed."""
from __future__ import annotations

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS = {
    "attn+mlp": ATTN + MLP, "all": ATTN + MLP, "mlp": MLP, "attn": ATTN,
    **{name: [name] for name in ATTN + MLP},
}


def resolve_targets(spec: str | list[str]) -> list[str]:
    """A preset name, or comma-separated module-name suffixes, -> list of suffixes."""
    if isinstance(spec, list):
        names = spec
    else:
        spec = spec.strip()
        if spec in TARGET_PRESETS:
            return list(TARGET_PRESETS[spec])
        names = [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        out.extend(TARGET_PRESETS.get(name, [name]))
    if not out:
        raise ValueError(f"--targets {spec!r} names no module (presets: {', '.join(TARGET_PRESETS)})")
    return list(dict.fromkeys(out))


def parse_layers(spec: str | list[int] | None) -> list[int] | None:
    """"16-31" (inclusive, as the paper writes it), "3,5,7", "0-3,8" or None for all layers."""
    if spec is None or isinstance(spec, list):
        return spec
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: expected e.g. '16-31' or '3,5,7'") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--layers {spec!r}: expected non-negative layer indices")
    return sorted(set(layers))
