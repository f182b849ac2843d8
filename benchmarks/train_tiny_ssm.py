"""Train the two tiny SSM models the SSM tests and the quality benchmark use (no pretrained SSM weights exist
offline): a Mamba2 (``Mamba2ForCausalLM``) and a Mamba2/attention hybrid (``BambaForCausalLM``: Mamba2 mixers,
two attention layers with Bamba's partial RoPE, a gated MLP after every mixer), both transformers' own classes,
SmolLM2's tokenizer (vocab 49152), tied embeddings, hidden 128.

Two steps, so the GPU call only carries token ids:

    python benchmarks/train_tiny_ssm.py tokenize            # CPU: .devdata/ssm_tokens.pt (train + eval ids)
    python benchmarks/train_tiny_ssm.py train --device cuda --seconds 120   # GPU: models/*, results JSON

Training text: wikitext2 ``wiki.valid.tokens``, Tiny Shakespeare + the Gutenberg plays, Alpaca 5000 (never
``wiki.test.raw``, the evaluation set). Windows of ``--seqlen`` tokens are drawn at random offsets (fixed seed)
from three streams, wiki 40 %, Shakespeare 30 %, Alpaca 30 %. AdamW, linear warm-up then cosine to 10 %,
bf16 autocast on CUDA. ``--seconds`` sizes the step count from the speed of the first steps (recorded in the
JSON); ``--steps N`` reruns a recorded count exactly. Weights are saved fp16 (safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ROOT / ".devdata" / "ssm_tokens.pt"
TOKENIZER_SRC = ROOT / "out" / "smollm2-135m-uniql"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MIX = {"wiki": 0.4, "shakespeare": 0.3, "alpaca": 0.3}
VOCAB = 49152


def data_dir() -> Path:
    return Path(os.environ.get("UNIQL_DATA_DIR", ROOT.parent / "shared" / "data"))


def model_configs() -> dict[str, object]:
    """The two architectures (transformers config objects). Sizes: ~7.4M / ~7.6M parameters, 6.3M of them the
    tied embedding; state 64 and head dim 32 leave SSM rungs (N' multiples of 16, even P') to prune."""
    from transformers import BambaConfig, Mamba2Config

    common = dict(vocab_size=VOCAB, hidden_size=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    mamba2 = Mamba2Config(num_hidden_layers=8, num_heads=8, head_dim=32, expand=2, state_size=64, n_groups=2,
                          chunk_size=128, conv_kernel=4, initializer_range=0.02, **common)
    hybrid = BambaConfig(num_hidden_layers=6, attn_layer_indices=[2, 5], intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=32,
                         mamba_n_groups=2, mamba_d_state=64, mamba_expand=2, mamba_chunk_size=128,
                         max_position_embeddings=4096, **common)
    return {"mamba2-tiny": mamba2, "hybrid-tiny": hybrid}


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_SRC))


def _alpaca_text(item: dict) -> str:
    prompt = item["instruction"] + ("\n" + item["input"] if item["input"] else "")
    return prompt + "\n" + item["output"]


def training_texts() -> dict[str, list[str]]:
    root = data_dir()
    wiki = (root / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8").split("\n \n = ")
    plays = [(root / "text_calibration" / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")]
    plays += [p.read_text(encoding="utf-8") for p in sorted((root / "text_calibration" /
                                                           "shakespeare_gutenberg").glob("*_gut.txt"))]
    alpaca = [_alpaca_text(it) for it in json.loads((root / "alpaca" / "alpaca_5000.json").read_text())]
    return {"wiki": wiki, "shakespeare": plays, "alpaca": alpaca}


def tokenize(out: Path = TOKENS) -> dict[str, int]:
    """Each stream: documents tokenized and joined with EOS, int32. Plus the wikitext2 test stream for eval."""
    from uniql.compressor.evaluate import wikitext2_rows

    tok = _tokenizer()
    streams = {}
    for name, docs in training_texts().items():
        ids = []
        for doc in docs:
            ids.extend(tok(doc)["input_ids"] + [tok.eos_token_id])
        streams[name] = torch.tensor(ids, dtype=torch.int32)
    test = "\n\n".join(wikitext2_rows(data_dir() / "wikitext2" / "wiki.test.raw"))
    streams["wikitext2_test"] = torch.tensor(tok(test)["input_ids"], dtype=torch.int32)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(streams, out)
    for name in model_configs():  # the GPU machine has no out/: the tokenizer travels inside the model folders
        (ROOT / "models" / name).mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_SRC / f, ROOT / "models" / name / f)
    return {k: v.numel() for k, v in streams.items()}


def batch_sampler(streams: dict[str, torch.Tensor], batch: int, seqlen: int, seed: int):
    """Yields ``[batch, seqlen + 1]`` int64 windows; each row's stream drawn by MIX, offsets uniform."""
    gen = torch.Generator().manual_seed(seed)
    names = list(MIX)
    weights = torch.tensor([MIX[n] for n in names])
    while True:
        which = torch.multinomial(weights, batch, replacement=True, generator=gen)
        rows = []
        for i in which.tolist():
            s = streams[names[i]]
            start = int(torch.randint(0, s.numel() - seqlen - 1, (1,), generator=gen))
            rows.append(s[start:start + seqlen + 1])
        yield torch.stack(rows).long()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.inference_mode()
def stream_ppl(model, stream: torch.Tensor, seqlen: int, device, max_windows: int | None = None) -> float:
    """wikitext2 protocol (compressor/evaluate.py): non-overlapping windows, mean next-token NLL."""
    n = stream.numel() // seqlen if max_windows is None else min(max_windows, stream.numel() // seqlen)
    windows = stream[: n * seqlen].view(n, seqlen).long()
    nll = 0.0
    for i in range(0, n, 8):
        x = windows[i:i + 8].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return math.exp(nll / (n * (seqlen - 1)))


def train_one(name: str, config, streams, args, device) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=None)
    batches = batch_sampler(streams, args.batch, args.seqlen, args.seed)
    total, losses, t0, probe_t = args.steps or 10**9, [], time.perf_counter(), None
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        x = next(batches).to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            losses.append([step, round(loss.item(), 4)])
        if args.steps is None and step == 5:
            probe_t = time.perf_counter()  # steps 1-5 include compilation/allocator warm-up
        if args.steps is None and step == 25:
            per_step = (time.perf_counter() - probe_t) / 20
            total = max(30, int((args.seconds - (time.perf_counter() - t0)) / per_step) + 25)
            print(f"{name}: {per_step * 1e3:.1f} ms/step -> {total} steps", flush=True)
    wall = time.perf_counter() - t0
    model.eval()
    ppl = stream_ppl(model, streams["wikitext2_test"], args.seqlen, device, args.eval_windows)
    out_dir = ROOT / "models" / name
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    print(f"{name}: {step} steps, {wall:.0f} s, final loss {losses[-1][1]}, wikitext2 test ppl {ppl:.1f}",
          flush=True)
    return {"model": name, "class": type(model).__name__, "parameters": params, "steps": step,
            "tokens": step * args.batch * args.seqlen, "wall_s": round(wall, 1), "loss_curve": losses,
            "wikitext2_test_ppl_seqlen": args.seqlen, "wikitext2_test_ppl": round(ppl, 2),
            "config": config.to_diff_dict()}


def train(args) -> dict:
    device = torch.device(args.device)
    streams = torch.load(args.tokens)
    rows = [train_one(name, cfg, streams, args, device) for name, cfg in model_configs().items()
            if name in args.models]
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "seed": args.seed, "batch": args.batch, "seqlen": args.seqlen,
            "lr": args.lr, "warmup": args.warmup, "mix": MIX, "stream_tokens": {k: v.numel()
                                                                                for k, v in streams.items()}}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    result = {"info": info, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tokenize")
    tr = sub.add_parser("train")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("--tokens", type=Path, default=TOKENS)
    tr.add_argument("--models", nargs="+", default=list(model_configs()))
    tr.add_argument("--seconds", type=float, default=120.0, help="training time per model (sets --steps)")
    tr.add_argument("--steps", type=int, default=None, help="exact step count (overrides --seconds)")
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--seqlen", type=int, default=1024)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup", type=int, default=50)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-windows", type=int, default=None, help="cap the wikitext2 test windows (smoke runs)")
    tr.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ssm_train.json")
    args = ap.parse_args()
    if args.cmd == "tokenize":
        print(tokenize())
    else:
        train(args)


if __name__ == "__main__":
    main()
