"""LLaMA-Factory's side of bench/data_pipeline.py. Runs INSIDE the LLaMA-Factory virtual environment.

Started by data_pipeline.py as `<lf-venv>/bin/python bench/_llamafactory_side.py SPEC.json`; then reads one
JSON command per line on stdin and answers each with one line `@@RESULT {json}` on stdout.

What runs per sample is LLaMA-Factory's own SFT code path, unchanged:
  * dataset preprocessing: `SupervisedDatasetProcessor.preprocess_dataset` (what its `datasets.map` runs):
    the qwen2_vl template (used for Qwen2-VL and Qwen2.5-VL), `Qwen2VLPlugin.process_messages` (video
    placeholder expansion; it probes the container for the grid), template encoding, label building;
  * collation: `SFTDataCollatorWith4DAttentionMask` (what its SFT workflow uses), which calls
    `mm_plugin.get_mm_inputs`: PyAV decode of the whole clip with its frame sampling (video_fps, video_maxlen),
    `frame.to_image()`, its PIL pre-resize to video_max_pixels, then the processor's video processor
    (smart_resize, resize, normalise, patchify), then padding.
Both run in the DataLoader workers, as in LLaMA-Factory training (there the preprocessing is done once
ahead of time by `datasets.map` and cached; counting it per sample here costs it a few ms, see the report).

Deviations, all forced by this CPU machine and none of them making LLaMA-Factory slower:
  * torchaudio: LLaMA-Factory imports it at module level (audio only). No torchaudio wheel matches
    torch 2.13 (the newest, 2.11, fails to load against it), so an empty stand-in module is registered
    before the import. No audio code runs for these samples.
  * torchvision: transformers' `Qwen2VLVideoProcessor` needs it and it cannot be installed on CPU here,
    so `AutoProcessor.from_pretrained` fails (LLaMA-Factory then has processor=None). The processor is
    built here instead: transformers' own `Qwen2_5_VLProcessor` (token expansion, unchanged) with
    transformers' own `Qwen2VLImageProcessorPil`, and surgsigma_train's `Qwen2VLVideoProcessorTorch`, a
    torch-only replica of `Qwen2VLVideoProcessor` that runs the same torch ops in the same order
    (uint8 anti-aliased bicubic resize, fused rescale+normalise, Qwen patch layout; bit-identical output,
    tests/models/test_parity_torchvision.py). It is exactly the code our side runs for this step, so this
    step costs both sides the same. LLaMA-Factory's `patch_processor` then sets its options.
  * model=None in the collator: with a model, LLaMA-Factory also computes mRoPE position ids per batch
    (extra work our pipeline leaves to the model's forward); skipping it only makes LLaMA-Factory faster.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path


def _stub_torchaudio() -> None:
    module = types.ModuleType("torchaudio")
    module.__version__ = "0.0.0+absent"
    module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)

    def _absent(*_args, **_kwargs):
        raise RuntimeError("torchaudio is not installed in the benchmark environment (audio is not benchmarked)")

    module.load = _absent
    module.functional = types.SimpleNamespace(resample=_absent)
    sys.modules["torchaudio"] = module


def _torchvision_free_smart_resize_module() -> None:
    """LLaMA-Factory's Qwen2VLPlugin imports `smart_resize` from transformers' torchvision image processor
    module, which cannot be imported without torchvision. transformers' PIL image processor module defines
    the identical function (same code); expose it under the module name LLaMA-Factory imports from."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil_module

    module = types.ModuleType("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    module.smart_resize = pil_module.smart_resize
    sys.modules[module.__name__] = module


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, spec["repo_root"])  # for surgsigma_train's torch-only video processor and tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _timing
    _stub_torchaudio()

    import os

    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    import torch
    import transformers
    from torch.utils.data import DataLoader, Dataset

    _torchvision_free_smart_resize_module()
    import llamafactory
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model.loader import load_tokenizer
    from llamafactory.model.patcher import patch_processor

    from _timing import loader_kwargs, measure_loader
    from surgsigma_train.models.tokenizer import converted_tokenizer_dir
    from surgsigma_train.models.video_processor import Qwen2VLVideoProcessorTorch

    # The real Qwen tokenizer (same ids as ours), written as a tokenizer folder by THIS transformers
    # version, then loaded by LLaMA-Factory's own load_tokenizer (AutoTokenizer).
    tokenizer_dir = converted_tokenizer_dir("qwen2_5_vl", cache_dir=spec["tokenizer_cache"])
    model_args = ModelArguments(
        model_name_or_path=str(tokenizer_dir),
        video_max_pixels=spec["max_pixels"],
        video_min_pixels=spec["min_pixels"],
        video_fps=spec["video_fps"],
        video_maxlen=spec["num_frames"],
    )
    data_args = DataArguments(template="qwen2_vl", cutoff_len=spec["cutoff_len"])
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    processor = tokenizer_module["processor"]
    processor_note = "AutoProcessor"
    if processor is None:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        class Qwen2_5_VLProcessorAcceptingTorchVideo(Qwen2_5_VLProcessor):
            # ProcessorMixin refuses a video processor that is not transformers' own class when torchvision
            # is missing; everything else is the stock class.
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument_name == "video_processor" and isinstance(argument, Qwen2VLVideoProcessorTorch):
                    return type(argument)
                return super().check_argument_for_proper_class(argument_name, argument)

        size = {"shortest_edge": spec["min_pixels"], "longest_edge": spec["max_pixels"]}
        processor = Qwen2_5_VLProcessorAcceptingTorchVideo(
            image_processor=Qwen2VLImageProcessorPil(size=size),
            video_processor=Qwen2VLVideoProcessorTorch(size=size),
            tokenizer=tokenizer,
        )
        patch_processor(processor, tokenizer, model_args)
        processor_note = "Qwen2_5_VLProcessor + Qwen2VLImageProcessorPil + surgsigma Qwen2VLVideoProcessorTorch"
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor,
                                                   data_args=data_args)
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, model=None, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        block_diag_attn=False, neat_packing=False, attn_implementation="sdpa", compute_dtype=torch.float32,
        tokenizer=tokenizer, processor=processor,
    )
    video_pad_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def example(clip: str) -> dict:
        """One sample in LLaMA-Factory's aligned format (what its ShareGPT converter produces)."""
        turns = spec["turns"]  # [[role, text], ...], the first user turn holds "<video>"
        return {
            "_prompt": [[{"role": r, "content": t} for r, t in turns[:-1]]],
            "_response": [[{"role": turns[-1][0], "content": turns[-1][1]}]],
            "_system": [spec["system"]],
            "_tools": [""],
            "_images": [None],
            "_videos": [[spec["clips"][clip]]],
            "_audios": [None],
        }

    class LlamaFactorySFTDataset(Dataset):
        def __init__(self, clips: list[str]):
            self.clips = clips

        def __len__(self):
            return len(self.clips)

        def __getitem__(self, index):
            out = dataset_processor.preprocess_dataset(example(self.clips[index]))
            return {key: value[0] for key, value in out.items()}

    def check(clip: str) -> dict:
        batch = collator([LlamaFactorySFTDataset([clip])[0]])
        mask = batch["attention_mask"][0].bool()
        ids, labels = batch["input_ids"][0][mask], batch["labels"][0][mask]
        grid = batch["video_grid_thw"].tolist()
        return {
            "video_tokens": int((ids == video_pad_id).sum()),
            "pixel_rows": int(batch["pixel_values_videos"].shape[0]),
            "grid_thw": grid,
            "frames": int(grid[0][0]) * 2,
            "seq_len": int(ids.numel()),
            "loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "text": tokenizer.decode(ids[ids != video_pad_id]),
        }

    def profile(clip: str, n: int) -> dict:
        import cProfile
        import io
        import pstats
        import time

        ds = LlamaFactorySFTDataset([clip] * (n + 1))
        collator([ds[0]])  # warm caches
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for i in range(1, n + 1):
            collator([ds[i]])
        profiler.disable()
        per_sample = (time.perf_counter() - t0) / n
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(30)
        return {"per_sample_s": per_sample, "profile": stream.getvalue(), "stages": _stages(stats, n)}

    def reply(obj) -> None:
        sys.stdout.write("@@RESULT " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "llamafactory": llamafactory.__version__ if hasattr(llamafactory, "__version__") else
           _dist_version("llamafactory"), "transformers": transformers.__version__, "torch": torch.__version__,
           "av": _dist_version("av"), "processor": processor_note})

    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "check":
            reply(_in_worker(lambda: {clip: check(clip) for clip in spec["clips"]}))
        elif op == "measure":
            clips = [command["clip"]] * (command["warmup"] + command["num_batches"]) * command["batch_size"]
            loader = DataLoader(LlamaFactorySFTDataset(clips), batch_size=command["batch_size"], shuffle=False,
                                collate_fn=collator, **loader_kwargs(command["workers"]))
            reply(measure_loader(loader, command["num_batches"], command["warmup"],
                                 count=lambda batch: int(batch["input_ids"].shape[0])))
        elif op == "profile":
            reply(_in_worker(lambda: profile(command["clip"], command["n"])))
        else:
            reply({"error": f"unknown op {op}"})


def _stages(stats, n: int) -> dict[str, float | None]:
    """Per-sample seconds of LLaMA-Factory's stages, from cProfile cumulative times."""
    def get(filename: str, function: str) -> float | None:
        found = None
        for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
            if path.endswith(filename) and name == function:
                found = max(found or 0.0, cumulative)
        return None if found is None else found / n

    def minus(total, *parts):
        return None if total is None else max(0.0, total - sum(p for p in parts if p is not None))

    videos = get("mm_plugin.py", "_regularize_videos")  # decode + to_image + PIL pre-resize
    pil_resize = get("mm_plugin.py", "_regularize_images")
    to_image = get("~", "<method 'to_image' of 'av.video.frame.VideoFrame' objects>")
    processor = get("video_processor.py", "preprocess")
    mm_inputs = get("mm_plugin.py", "get_mm_inputs")
    collate = get("collator.py", "__call__")
    return {
        "preprocess: template, token expansion (container probe), labels": get("supervised.py", "preprocess_dataset"),
        "decode: PyAV, whole clip, sequential": minus(videos, pil_resize, to_image),
        "frame.to_image() (RGB PIL) for the sampled frames": to_image,
        "PIL pre-resize to video_max_pixels": pil_resize,
        "video processor (smart_resize, resize, normalise, patchify)": processor,
        "collate rest (padding, tensors)": minus(collate, mm_inputs),
    }


def _in_worker(fn):
    """Runs fn in a DataLoader worker (a forked child), so that this process never decodes video itself:
    LLaMA-Factory leaves PyAV containers open, and forking DataLoader workers after decoding in the parent
    was seen to hang the worker inside FFmpeg."""
    from torch.utils.data import DataLoader

    loader = DataLoader([0], batch_size=1, num_workers=1, collate_fn=lambda _batch: fn())
    return next(iter(loader))


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()
