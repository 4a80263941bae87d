"""Sequence packing: bin fill (packing efficiency) and CPU training throughput of packed vs padded batches.

    .venv/bin/python bench/packing.py            # full (~5-10 min on 2 shared cores)
    .venv/bin/python bench/packing.py --quick    # smoke (< 60 s): fewer samples, one round

Three measurements, all through the library's own code (``data/packing.py``: ``plan_lengths``, ``plan_epoch``,
``PackCollator``; ``PadCollator``; the trainer's ``token_loss_sum``):

1. **Demo data** (``surgsigma-train data demo``; quick: 2 patient videos, full: the default 32): planned lengths
   from the real planner (tokenizer + media metadata, nothing decoded; its cost per sample is printed), packed into
   bins of ``--demo-pack-tokens`` (1024 = 2 x the demo's max_seq_len 512). Efficiency = real tokens / (bins x N).

2. **Long-tailed SurgΣ-DB-like length mix** (lengths only, at GPU scale, N = 16384): each sample's length is made
   from Qwen2.5-VL's token rules (a visual token per 28x28 pixels after resizing to a multiple of 28 within the
   pixel bounds, a video temporal patch = 2 frames, video frames bounded to 448x448 pixels) plus text:
     45 % short image QA: one frame of 854x480, 1280x720 or 1920x1080 (image max 1280x28x28 px), 30-150 text tokens;
     15 % multi-image: 2-6 frames of 854x480, 50-250 text tokens;
     25 % video clips: 8-32 frames (even) of 854x480, 50-200 text tokens;
     15 % reasoning traces: one frame + a lognormal text (median 800, cut at 6000 tokens: the long tail).
   Sampled with numpy from a fixed seed; ``--mix-samples`` of them (quick 4000, full 20000).

3. **Throughput** (CPU, tiny random Qwen2.5-VL, fp32; ``--attn auto``: what training picks, sdpa for the padded
   batches and sdpa_varlen (one SDPA call per packed sample, models/attention.py) for the packed rows): a CPU-sized version of the same
   mix built as real samples (real PNGs and an H.264 clip written here, encoded by the real ``SampleEncoder``):
   short image QA (one 224x224 image, 64 visual tokens), multi-image (2-4 images), video (8-32 frames of a
   112x112 clip at 8 fps, 16 tokens per 2 frames), reasoning (one image + 300-1500 text tokens, lognormal).
   The SAME encoded samples, in the SAME shuffled order, are trained on (a) padded micro-batches of
   ``--batch-size`` (8) and (b) packed bins of ``--pack-tokens`` (4096, fewer slots than a typical padded batch of 8 here) with packed position ids. Each micro-batch
   is a full step: forward, backward, AdamW step, from the same initial weights for both. The first
   ``--warmup`` micro-batches of each pass are excluded; throughput = real (non-padding) tokens / seconds of the
   measured micro-batches. Rounds alternate padded/packed; speedup = median over rounds of packed / padded.

The last line is ``packing_efficiency=X speedup_vs_padded=Y``: X = the lower of the demo and long-tailed
efficiencies, Y = the throughput speedup on the CPU long-tailed mix.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgsigma_train.config.loading import load_recipe  # noqa: E402
from surgsigma_train.data.encode import EncodedSample, SampleEncoder  # noqa: E402
from surgsigma_train.data.loader import PadCollator  # noqa: E402
from surgsigma_train.data.packing import (LengthTable, PackCollator, packed_position_ids, plan_epoch,  # noqa: E402
                                          plan_lengths)
from surgsigma_train.data.sample import MediaRef, Message, Sample  # noqa: E402
from surgsigma_train.models.registry import get_family  # noqa: E402
from surgsigma_train.training.trainer import token_loss_sum  # noqa: E402

WORDS = ("the clip applier closes on the cystic duct while the grasper retracts the gallbladder fundus and the "
         "hook dissects the peritoneum of the hepatocystic triangle exposing the artery").split()


# ---------------------------------------------------------------- 1. demo data
def demo_efficiency(quick: bool, pack_tokens: int, workdir: Path) -> dict:
    from surgsigma_train.data.demo import write_demo_dataset
    from surgsigma_train.training.run import prepare_run

    data = workdir / "demo_data"
    kwargs = {"n_train_videos": 2, "n_heldout_videos": 1} if quick else {}
    write_demo_dataset(data, seed=0, **kwargs)
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"data.train.0.path={data / 'train.json'}", f"data.eval.0.path={data / 'heldout.json'}",
        f"output.dir={workdir / 'run'}", "data.packing=true", f"data.pack_tokens={pack_tokens}",
        "train.micro_batch_size=1"])
    ctx = prepare_run(cfg, write_record=False)
    encoder = SampleEncoder(ctx.processor, ctx.family, cfg.data, cfg.video, seed=0)
    table = plan_lengths(encoder, ctx.train_samples)
    order = np.random.default_rng(0).permutation(len(ctx.train_samples))
    plan = plan_epoch(order, table, pack_tokens, seed=0, epoch=0)
    ok = table.lengths > 0
    return {"samples": len(ctx.train_samples), "bins": len(plan.bins), "efficiency": plan.efficiency(table.lengths),
            "planning_s": table.seconds, "planning_ms_per_sample": 1e3 * table.seconds / len(ctx.train_samples),
            "mean_tokens": float(table.lengths[ok].mean()), "max_tokens": int(table.lengths.max())}


# ---------------------------------------------------------------- 2. long-tailed mix (lengths)
def _tokens_hw(h: int, w: int, max_pixels: int, factor: int = 28) -> int:
    """Qwen2.5-VL smart_resize -> merged visual tokens of one image (or one temporal patch of a video)."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = (h * w / max_pixels) ** 0.5
        hb, wb = int(h / beta // factor) * factor, int(w / beta // factor) * factor
    return (hb // factor) * (wb // factor)


def long_tailed_lengths(n: int, seed: int = 0) -> LengthTable:
    rng = np.random.default_rng(seed)
    image_max, frame_max = 1280 * 28 * 28, 448 * 448
    sizes = [(480, 854), (720, 1280), (1080, 1920)]
    kind = rng.choice(4, n, p=[0.45, 0.15, 0.25, 0.15])
    lengths, visual = np.zeros(n, np.int64), np.zeros(n, np.int64)
    frame = _tokens_hw(480, 854, image_max)
    for i, k in enumerate(kind.tolist()):
        if k == 0:
            vis, text = _tokens_hw(*sizes[rng.integers(3)], image_max), rng.integers(30, 151)
        elif k == 1:
            vis, text = frame * int(rng.integers(2, 7)), rng.integers(50, 251)
        elif k == 2:
            frames = 2 * int(rng.integers(4, 17))
            vis, text = (frames // 2) * _tokens_hw(480, 854, frame_max), rng.integers(50, 201)
        else:
            vis, text = frame, min(6000, int(rng.lognormal(np.log(800), 0.8)))
        lengths[i], visual[i] = vis + text + 4 * (1 + (k == 1) * 2), vis
    return LengthTable(lengths, visual, {})


# ---------------------------------------------------------------- 3. throughput on real samples
def _write_media(root: Path) -> None:
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 112, 112, "yuv420p"
        for i in range(40):  # 5 s at 8 fps
            frame = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words).tolist())


def cpu_mix_samples(n: int, root: Path, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.choice(4, p=[0.45, 0.15, 0.25, 0.15]))
        if k == 0:
            media, prompt, answer = (MediaRef("image", "img0.png"),), "<image>Which phase is shown?", _text(rng, 8)
        elif k == 1:
            m = int(rng.integers(2, 5))
            media = tuple(MediaRef("image", f"img{j}.png") for j in range(m))
            prompt, answer = "<image>" * m + "Did the camera move between these frames?", _text(rng, 20)
        elif k == 2:
            frames = 2 * int(rng.integers(4, 17))  # 8-32 frames at 8 fps
            media = (MediaRef("video", "clip.mp4", start_s=0.0, end_s=frames / 8),)
            prompt, answer = "<video>Describe the action in this clip.", _text(rng, 15)
        else:
            media, prompt = (MediaRef("image", "img1.png"),), "<image>Assess the critical view of safety step by step."
            answer = _text(rng, min(1500, int(rng.lognormal(np.log(450), 0.6))))
        out.append(Sample(id=f"s{i}", media_root=str(root), task="phase_recognition", media=media,
                          messages=(Message("user", prompt), Message("assistant", answer))))
    return out


def _step(model, optimizer, batch, packed: bool) -> None:
    inputs = dict(batch.inputs)
    labels = inputs.pop("labels")
    if packed:
        inputs["position_ids"] = packed_position_ids(model, inputs, batch.seq_lens)
    loss = token_loss_sum(model, inputs, labels) / max(batch.num_loss_tokens, 1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _pass(initial, batches, packed: bool, warmup: int) -> dict:
    model = copy.deepcopy(initial).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        _step(model, optimizer, batch, packed)
        if i >= warmup:
            seconds += time.perf_counter() - start
            tokens += batch.num_tokens
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "micro_batches": len(batches)}


def throughput(args, workdir: Path) -> dict:
    root = workdir / "media"
    root.mkdir()
    _write_media(root)
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"output.dir={workdir / 'tp'}", "data.train.0.path=unused", "data.max_seq_len=2048",
        "video.image_max_pixels=50176", "video.video_max_pixels=12544", "video.sampling.num_frames=null",
        "video.sampling.fps=8", "video.sampling.max_frames=32"])
    family = get_family("qwen2_5_vl")
    processor = family.build_processor("tiny", image_min_pixels=cfg.video.image_min_pixels,
                                       image_max_pixels=cfg.video.image_max_pixels,
                                       video_min_pixels=cfg.video.video_min_pixels,
                                       video_max_pixels=cfg.video.video_max_pixels)
    encoder = SampleEncoder(processor, family, cfg.data, cfg.video, seed=0)
    t0 = time.perf_counter()
    samples = cpu_mix_samples(args.samples, root)
    table = plan_lengths(encoder, samples)
    encoded: list[EncodedSample] = [encoder.encode(s) for s in samples]
    assert [e.input_ids.numel() for e in encoded] == table.lengths.tolist(), "planned != encoded lengths"
    order = np.random.default_rng(1).permutation(len(samples))
    pad_id = processor.tokenizer.pad_token_id or 0
    padded = [PadCollator(pad_id)([encoded[i] for i in order[b:b + args.batch_size]])
              for b in range(0, len(order), args.batch_size)]
    plan = plan_epoch(order, table, args.pack_tokens, seed=0, epoch=0)
    packer = PackCollator(pad_id, args.pack_tokens)
    packed = [packer([encoded[i] for i in b]) for b in plan.bins]
    assert sum(b.num_samples for b in packed) == sum(b.num_samples for b in padded) == len(samples)
    assert sum(b.num_tokens for b in packed) == sum(b.num_tokens for b in padded)
    from surgsigma_train.models.attention import resolve_attn_implementation

    attn = {side: resolve_attn_implementation(args.attn, packing=side == "packed") for side in ("padded", "packed")}
    initial = {side: family.build_model("tiny", attn_implementation=a, seed=0) for side, a in attn.items()}
    for name, param in initial["padded"].named_parameters():  # the same weights on both sides
        assert torch.equal(param, dict(initial["packed"].named_parameters())[name])
    print(f"  encoded {len(samples)} samples in {time.perf_counter() - t0:.1f} s; attention: {attn}", flush=True)
    rounds = []
    for r in range(args.rounds):
        sides = [("padded", padded, False), ("packed", packed, True)]
        result = {}
        for name, batches, is_packed in (sides if r % 2 == 0 else sides[::-1]):
            result[name] = _pass(initial[name], batches, is_packed, args.warmup)
        result["speedup"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
        rounds.append(result)
        print(f"  round {r + 1}: padded {result['padded']['tokens_per_s']:.0f} tok/s "
              f"({len(padded)} micro-batches of {args.batch_size}, slot efficiency "
              f"{sum(b.num_tokens for b in padded) / sum(b.slot_tokens for b in padded):.1%}), packed "
              f"{result['packed']['tokens_per_s']:.0f} tok/s ({len(packed)} bins of {args.pack_tokens}, efficiency "
              f"{plan.efficiency(table.lengths):.1%}); speedup {result['speedup']:.2f}", flush=True)
    return {"attn": attn, "samples": len(samples), "mean_tokens": float(table.lengths.mean()), "max_tokens": int(table.lengths.max()),
            "rounds": rounds, "speedup": statistics.median(r["speedup"] for r in rounds),
            "packed_efficiency": plan.efficiency(table.lengths),
            "padded_efficiency": sum(b.num_tokens for b in padded) / sum(b.slot_tokens for b in padded)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    parser.add_argument("--demo-pack-tokens", type=int, default=1024)
    parser.add_argument("--mix-pack-tokens", type=int, default=16384)
    parser.add_argument("--mix-samples", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="throughput samples (quick 16, full 96)")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="throughput bin size (4096: under the ~9.8k "
                        "slots of a typical padded batch of 8 here, so packing gets no memory advantage)")
    parser.add_argument("--batch-size", type=int, default=8, help="padded micro-batch size")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--attn", default="auto", help="model.attn_implementation; auto = what training picks: "
                        "sdpa for padded batches, sdpa_varlen for packed rows on CPU (flash_attention_2 on CUDA)")
    args = parser.parse_args(argv)
    args.mix_samples = args.mix_samples or (4000 if args.quick else 20000)
    args.samples = args.samples or (16 if args.quick else 96)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        demo = demo_efficiency(args.quick, args.demo_pack_tokens, work)
        print(f"  demo part took {time.perf_counter() - start:.0f} s", flush=True)
        print(f"demo data: {demo['samples']} samples (mean {demo['mean_tokens']:.0f}, max {demo['max_tokens']} planned "
              f"tokens) -> {demo['bins']} bins of {args.demo_pack_tokens}: efficiency {demo['efficiency']:.2%}; "
              f"planning {demo['planning_s']:.1f} s ({demo['planning_ms_per_sample']:.2f} ms a sample, 1 process)",
              flush=True)
        table = long_tailed_lengths(args.mix_samples)
        t0 = time.perf_counter()
        plan = plan_epoch(np.random.default_rng(0).permutation(args.mix_samples), table, args.mix_pack_tokens, 0, 0,
                          world_size=8, balance_window=32)
        pack_s = time.perf_counter() - t0
        mix_eff = plan.efficiency(table.lengths)
        print(f"long-tailed mix: {args.mix_samples} samples (mean {table.lengths.mean():.0f}, p99 "
              f"{int(np.percentile(table.lengths, 99))}, max {table.lengths.max()} tokens) -> {len(plan.bins)} bins "
              f"of {args.mix_pack_tokens} (8 ranks, balanced): efficiency {mix_eff:.2%}; binning took {pack_s:.2f} s",
              flush=True)
        tp = throughput(args, work)
        print(f"throughput ({tp['samples']} samples, mean {tp['mean_tokens']:.0f} / max {tp['max_tokens']} tokens, "
              f"attn {tp['attn']}): padded slot efficiency {tp['padded_efficiency']:.1%}, packed "
              f"{tp['packed_efficiency']:.1%}; median speedup {tp['speedup']:.2f} over {len(tp['rounds'])} round(s); "
              f"total {time.perf_counter() - start:.0f} s")
    result = {"demo": demo, "mix_efficiency": mix_eff, "throughput": tp,
              "packing_efficiency": min(demo["efficiency"], mix_eff), "speedup_vs_padded": tp["speedup"]}
    print(f"packing_efficiency={result['packing_efficiency']:.4f} speedup_vs_padded={result['speedup_vs_padded']:.2f}")
    return result


if __name__ == "__main__":
    main()
