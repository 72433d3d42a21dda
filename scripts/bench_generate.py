"""End-to-end text-to-image speed against diffusers' StableDiffusionPipeline: same weights, prompt, seed,
sampler, steps and size, in the same process.

    python scripts/bench_generate.py MODEL.safetensors [--size 256] [--steps 10] [--sampler dpm++2m]

MODEL is any SD 1.x/2.x single file (make one with scripts/make_random_model.py --arch sd15). Its weights
are copied into diffusers' modules through the loader's own name rules; the two images are compared, then
both pipelines are timed alternately (median of --repeats after a warm-up). Times cover encode, denoise
and decode, not loading. Ratios below 1 mean sdcli is faster. Phase 1 runs both with glibc's default
allocator; phase 2 runs sdcli after keep_freed_memory(), as the CLI does, against diffusers' phase 1
time (what a diffusers user gets); phase 3 runs diffusers after it too (the arithmetic alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DIFFUSERS_SCHEDULERS = {  # ours -> (diffusers class, config), the pairs tests/test_sampling.py checks
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}),
}


def diffusers_pipeline(model, sampler: str):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdcli.loading.keymaps import rename_layout, unet_diffusers_name, vae_diffusers_name
    from sdcli.models.text import clip_vocab

    cfg = model.cfg
    unet_cfg = dict(
        sample_size=64, layers_per_block=cfg.unet.num_res_blocks, in_channels=cfg.unet.in_channels, out_channels=cfg.unet.out_channels,
        block_out_channels=[cfg.unet.model_channels * m for m in cfg.unet.channel_mult],
        cross_attention_dim=cfg.unet.context_dim, use_linear_projection=cfg.unet.use_linear_projection,
        attention_head_dim=[cfg.unet.heads(cfg.unet.model_channels * m)[0] for m in cfg.unet.channel_mult]
        if cfg.unet.head_dim else cfg.unet.num_heads,
    )
    unet = UNet2DConditionModel(**unet_cfg).eval()
    names = rename_layout(list(model.unet.state_dict()), unet_diffusers_name(cfg.unet))
    unet.load_state_dict(names.to_file(model.unet.state_dict()), strict=True)
    ch = cfg.vae.ch
    vae = AutoencoderKL(block_out_channels=[ch * m for m in cfg.vae.ch_mult], latent_channels=cfg.vae.embed_dim,
                        layers_per_block=cfg.vae.num_res_blocks,
                        down_block_types=["DownEncoderBlock2D"] * len(cfg.vae.ch_mult),
                        up_block_types=["UpDecoderBlock2D"] * len(cfg.vae.ch_mult),
                        scaling_factor=cfg.latent_scale).eval()
    state = rename_layout(list(model.vae.state_dict()), vae_diffusers_name(cfg.vae)).to_file(model.vae.state_dict())
    shapes = vae.state_dict()
    vae.load_state_dict({k: v.reshape(shapes[k].shape) for k, v in state.items()}, strict=True)
    t = cfg.text
    text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                                        num_hidden_layers=t.layers, num_attention_heads=t.heads,
                                        max_position_embeddings=t.max_positions, hidden_act=t.activation,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    text.load_state_dict(model.text_encoder.transformer.text_model.state_dict(), strict=True)
    name, extra = DIFFUSERS_SCHEDULERS[sampler]
    scheduler = getattr(diffusers, name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon",
                                         **extra)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer(*clip_vocab(), pad_token=t.pad_token, model_max_length=77), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampler", choices=list(DIFFUSERS_SCHEDULERS), default="dpm++2m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sdcli.engine import Engine, Sampling
    from sdcli.loading import load_model
    from sdcli.sampling import SAMPLERS
    from sdcli.runtime import keep_freed_memory
    from sdcli.tasks.txt2img import txt2img

    model = load_model(args.model)
    engine = Engine(model, torch.device("cpu"))
    pipe = diffusers_pipeline(model, args.sampler)
    prompt, negative, seed = "a photograph of an astronaut riding a horse", "blurry", 1
    sampling = Sampling(args.steps, 7.0, args.sampler, SAMPLERS[args.sampler].schedule)

    def ours():
        return txt2img(engine, prompt, sampling, [seed], width=args.size, height=args.size,
                       negative_prompt=negative)[0].numpy()

    def theirs():
        image = pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=7.0,
                     height=args.size, width=args.size, generator=torch.Generator().manual_seed(seed),
                     output_type="np").images[0]
        return (image * 255).round()

    print(f"{model.cfg.variant}, {args.size}x{args.size}, {args.steps} steps of {args.sampler}, CFG 7, "
          f"{args.threads} threads, torch {torch.__version__}")
    err = abs(ours().astype(float) - theirs()).max()  # also the warm-up
    print(f"max pixel difference {err:.1f}/255")
    times: dict = {ours: [], theirs: []}
    for i in range(args.repeats):  # phase 1: glibc's default allocator for both, alternating
        for fn in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            times[fn].append(timed(fn))
    t_ours, t_theirs = statistics.median(times[ours]), statistics.median(times[theirs])
    print(f"txt2img, default malloc   sdcli {t_ours:7.2f} s   diffusers {t_theirs:7.2f} s   "
          f"ratio {t_ours / t_theirs:5.2f}")
    applied = keep_freed_memory()  # phase 2: sdcli as the CLI runs it (process-wide, so it comes last)
    ours()
    t_kept = statistics.median(timed(ours) for _ in range(args.repeats))
    print(f"txt2img, sdcli as the CLI runs it (keep_freed_memory={applied})   sdcli {t_kept:7.2f} s   "
          f"ratio to diffusers' default {t_kept / t_theirs:5.2f}")
    # phase 3: diffusers under the same allocator setting: the arithmetic alone, whatever the machine's page-fault
    # cost (the phase-2 gain shrinks where faults are cheap: transparent huge pages, a faster kernel path)
    theirs()
    t_theirs_kept = statistics.median(timed(theirs) for _ in range(args.repeats))
    print(f"txt2img, both with keep_freed_memory   diffusers {t_theirs_kept:7.2f} s   "
          f"ratio {t_kept / t_theirs_kept:5.2f}")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
