"""Fine-tuning / probing throughput and the cost of the frozen-feature cache.

Measures on random inputs of the micro model (configs/model/micro.yaml) unless `--model` names
another size: encoder forward clips/s (what a probe's cache costs per clip), full fine-tuning
train-step clips/s (forward + backward through encoder and head; also with the recipe's
`unimodal_loss`, against the same three losses computed on a tripled batch), linear-probe train-step clips/s on
cached features, and cache size per clip. Prints a table; writes benchmarks/results/bench_finetune.json.

    python benchmarks/bench_finetune.py [--model configs/model/micro.yaml] [--batch 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.full_model import FullFinetuneModel
from finetune.heads import AttentiveProbe, FeatureFusionHead, fusion_tokens
from finetune.losses import task_loss
from finetune.report import device_name
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.pooling import pool_tokens

REPO = Path(__file__).resolve().parents[1]


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "configs" / "model" / "micro.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(args.model), resolve=True))
    torch.manual_seed(0)
    encoder = AVEncoder(cfg).to(device)
    video = torch.randn(args.batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size, device=device)
    fbank = torch.randn(args.batch, cfg.fbank_frames, cfg.mel_bins, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    rows = {}

    encoder.eval()
    with torch.inference_mode():
        t_enc = timed(lambda: pool_tokens(encoder.forward_features(video, fbank)), args.steps, device)
        pooled = pool_tokens(encoder.forward_features(video, fbank))
        tokens = fusion_tokens(encoder.forward_features(video, fbank))
    rows["encoder forward (= cache cost)"] = args.batch / t_enc

    model = FullFinetuneModel(encoder, FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, args.classes)).to(
        device
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def finetune_step() -> None:
        loss = task_loss("classification", "auto", model(video, fbank), labels, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows["full fine-tuning step"] = args.batch / timed(finetune_step, args.steps, device)

    def unimodal_loss_step() -> (
        None
    ):  # recipe unimodal_loss > 0: every clip trains av, audio-only, video-only
        logits = model.forward_modalities(video, fbank)
        loss = sum(task_loss("classification", "auto", x, labels, 0.1) for x in logits.values()) / 3
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def tripled_batch_step() -> None:  # the same three losses by running the whole model on 3x the batch
        blank_v, blank_a = torch.zeros_like(video), torch.zeros_like(fbank)
        logits = model(torch.cat([video, blank_v, video]), torch.cat([fbank, fbank, blank_a]))
        loss = task_loss("classification", "auto", logits, labels.repeat(3), 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows["fine-tuning step, unimodal_loss"] = args.batch / timed(unimodal_loss_step, args.steps, device)
    rows["same 3 losses, tripled batch"] = args.batch / timed(tripled_batch_step, args.steps, device)

    cached_batch = 256
    big = {k: v.repeat_interleave(cached_batch // args.batch, 0) for k, v in pooled.items()}
    big_labels = labels.repeat_interleave(cached_batch // args.batch, 0)
    head = FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, args.classes).to(device)
    hopt = torch.optim.AdamW(head.parameters(), lr=1e-3)

    def probe_step() -> None:
        loss = task_loss("classification", "auto", head(big), big_labels)
        hopt.zero_grad(set_to_none=True)
        loss.backward()
        hopt.step()

    rows["linear probe step (cached)"] = big_labels.shape[0] / timed(probe_step, args.steps * 4, device)
    att = AttentiveProbe(cfg.width, args.classes, num_heads=max(1, cfg.width // 64)).to(device)
    aopt = torch.optim.AdamW(att.parameters(), lr=1e-3)
    half = {k: v.half() for k, v in tokens.items()}

    def attentive_step() -> None:
        loss = task_loss("classification", "auto", att(half), labels)
        aopt.zero_grad(set_to_none=True)
        loss.backward()
        aopt.step()

    rows["attentive probe step (cached)"] = args.batch / timed(attentive_step, args.steps * 4, device)
    bytes_pooled = sum(v[0].numel() * 4 for v in pooled.values())
    bytes_tokens = sum(v[0].numel() * 2 for v in tokens.values())

    print(f"device: {device_name(device)}, model: {Path(args.model).name}, batch {args.batch}")
    print(f"{'what':<36} {'clips/s':>10}")
    for name, value in rows.items():
        print(f"{name:<36} {value:>10.1f}")
    print(
        f"cache per clip: linear {bytes_pooled / 1024:.1f} KiB, attentive {bytes_tokens / 1024:.1f} KiB (fp16)"
    )
    result = {
        "device": device_name(device),
        "host": platform.node(),
        "model": Path(args.model).name,
        "batch": args.batch,
        "clips_per_s": rows,
        "cache_bytes_per_clip": {"linear": bytes_pooled, "attentive": bytes_tokens},
        "torch": torch.__version__,
    }
    out = REPO / "benchmarks" / "results" / "bench_finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
