"""Where a mixer's time goes: each op of one Mamba-1 and one Mamba-2 mixer on one block of tokens (CPU).

Same config as bench/cpu_forward.py (d_model 256, fp32, batch 1). The model runs long inputs in blocks of
``LanguageModel.inference_block`` (2048) tokens, so one block is the unit that matters. Mean of --repeats
calls after one warm-up, under torch.no_grad.

    python bench/cpu_mixer_parts.py [--tokens 2048] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab import BackboneConfig, LanguageModel, kernels


def mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def mamba1_parts(tokens: int, repeats: int) -> dict[str, float]:
    mixer = (
        LanguageModel(BackboneConfig(d_model=256, n_layer=4, ssm="mamba1", d_state=16), 256).backbone.layers[0].mixer
    )
    h = torch.randn(1, tokens, 256)
    x, z = (rearrange(t, "b l d -> b d l") for t in mixer._project_in(h))
    conv = lambda: kernels.causal_conv1d(  # noqa: E731
        x,
        mixer._conv_weight(),
        mixer.conv1d.bias,
        activation="silu",
        return_final_state=True,
    )
    xc = rearrange(conv()[0], "b d l -> b l d")
    dt, B, C = mixer._split_x_dbl(mixer.x_proj(xc))
    delta = rearrange(F.linear(dt, mixer.dt_proj.weight), "b l d -> b d l")
    scan_args = (
        rearrange(xc, "b l d -> b d l"),
        delta,
        -torch.exp(mixer.A_log.float()),
        rearrange(B, "b l n -> b n l"),
        rearrange(C, "b l n -> b n l"),
    )
    y = torch.randn(1, tokens, mixer.d_inner)
    return {
        "in_proj (GEMMs)": mean_ms(lambda: mixer._project_in(h), repeats),
        "causal conv1d + SiLU": mean_ms(conv, repeats),
        "x_proj + dt_proj (GEMMs)": mean_ms(
            lambda: F.linear(mixer._split_x_dbl(mixer.x_proj(xc))[0], mixer.dt_proj.weight), repeats
        ),
        "scan": mean_ms(
            lambda: kernels.selective_scan(
                *scan_args,
                D=mixer.D.float(),
                z=z,
                delta_bias=mixer.dt_proj.bias.float(),
                delta_softplus=True,
                return_final_state=True,
            ),
            repeats,
        ),
        "out_proj (GEMM)": mean_ms(lambda: mixer.out_proj(y), repeats),
        "whole mixer": mean_ms(lambda: mixer(h, None, True), repeats),
    }


def mamba2_parts(tokens: int, repeats: int) -> dict[str, float]:
    cfg = BackboneConfig(d_model=256, n_layer=4, ssm="mamba2", d_state=64, headdim=32, chunk_size=64)
    mixer = LanguageModel(cfg, 256).backbone.layers[0].mixer
    h = torch.randn(1, tokens, 256)
    z, xbc, dt = mixer._project_in(h)
    conv = lambda: kernels.causal_conv1d(  # noqa: E731
        rearrange(xbc, "b l c -> b c l"),
        mixer._conv_weight(),
        mixer.conv1d.bias,
        activation="silu",
        return_final_state=True,
    )
    x, B, C = mixer._split_xbc(rearrange(conv()[0], "b c l -> b l c"))
    scan_args = (
        rearrange(x, "b l (h p) -> b l h p", p=mixer.headdim),
        dt,
        -torch.exp(mixer.A_log.float()),
        rearrange(B, "b l (g n) -> b l g n", g=mixer.ngroups),
        rearrange(C, "b l (g n) -> b l g n", g=mixer.ngroups),
        mixer.chunk_size,
    )
    y = torch.randn(1, tokens, mixer.d_inner)
    return {
        "in_proj (GEMMs)": mean_ms(lambda: mixer._project_in(h), repeats),
        "causal conv1d + SiLU": mean_ms(conv, repeats),
        "scan": mean_ms(
            lambda: kernels.ssd_scan(
                *scan_args, D=mixer.D.float(), dt_bias=mixer.dt_bias.float(), dt_softplus=True, return_final_state=True
            ),
            repeats,
        ),
        "gated RMSNorm": mean_ms(lambda: mixer.norm(y, z), repeats),
        "out_proj (GEMM)": mean_ms(lambda: mixer.out_proj(y), repeats),
        "whole mixer": mean_ms(lambda: mixer(h, None, True), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.no_grad():
        parts = {"Mamba-1": mamba1_parts(args.tokens, args.repeats), "Mamba-2": mamba2_parts(args.tokens, args.repeats)}
    print(f"# one mixer, {args.tokens} tokens, fp32, {torch.get_num_threads()} threads, mean of {args.repeats}")
    print("| op | Mamba-1 ms | Mamba-2 ms |")
    print("|---|---|---|")
    names = list(dict.fromkeys([*parts["Mamba-1"], *parts["Mamba-2"]]))
    names.remove("whole mixer")
    for name in [*names, "whole mixer"]:
        cells = [f"{parts[k][name]:.1f}" if name in parts[k] else "-" for k in parts]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
