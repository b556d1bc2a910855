"""The HF-path study (``adaptdiff study hf-convert``): does converting an AR model through a
transformers checkpoint change the block-diffusion model that comes out?

Per seed, train the LM demo's char AR model on the embedded pydoc corpus (the pieces of
:mod:`adaptdiff.lm_demo`, with fewer steps by default), then SDAR-convert the *same* AR weights
along three paths, each with the same seed and data order:

- ``native``: the :class:`~adaptdiff.models.BlockDiffusionLM` itself;
- ``hf, mask row kept``: :func:`~adaptdiff.models.block_lm_to_hf` (every row, the ``[MASK]`` id
  an ordinary token to transformers) -> ``save_pretrained`` -> :func:`block_lm_from_hf` of the
  folder with ``mask_token_id`` = the tokenizer's mask id;
- ``hf, mask appended``: the export without the mask row, as a pretrained AR model ships, ->
  ``save_pretrained`` -> ``block_lm_from_hf(folder)`` with its default: a fresh ``[MASK]`` row
  (the mean of the other rows) at the same id.

Reported per path: the AR-causal logits' max abs difference between the transformers model and
the model converted from its folder (``HF Δlogit``), the max abs difference of every weight from
the native AR model before conversion (``Δw before``) and from the native converted model after
it (``Δw after``; ``w_after_rest`` in the JSON: the same without the ``[MASK]`` rows), the SDAR
validation loss (the diffusion bound, nats/char) and its difference from the native path, and
for block decoding (threshold 0.5, fused; entropy bound 1.0) the tokens per forward (TPF), the
frozen AR model's per-char NLL of the continuations, the fraction of characters equal to the
held-out text and the fraction equal to the native path's output.
docs/studies.md has the recorded table and its reading.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data.text import CharTokenizer, pydoc_corpus
from ..lm_demo import _row, _train, validation_loss
from ..models import BlockDiffusionLM, block_lm_from_hf, block_lm_to_hf, create_block_lm
from ..samplers.block_decode import DecodeOutput, block_decode
from ..train import BlockLMLoss, text_dataset
from .runner import Column, Metrics, Progress, Study, Summary

PATHS = ("native", "hf, mask row kept", "hf, mask appended")
RULES = {  # column prefix -> block_decode keywords
    "thr": dict(rule="threshold", threshold=0.5, fuse=True),
    "ent": dict(rule="entropy", entropy_bound=1.0, fuse=True),
}


@dataclass
class HFConvertConfig:
    model: str = "BlockLM-demo"
    seq_len: int = 64
    batch_size: int = 16
    ar_steps: int = 300
    convert_steps: int = 150
    ar_lr: float = 3e-3
    convert_lr: float = 1e-3
    block_size: int = 4
    num_prompts: int = 20
    prompt_len: int = 24
    new_tokens: int = 40
    corpus_chars: int = 0  # 0: the whole corpus; else the first N chars of train and val
    threads: int = 1


def _quick(cfg: HFConvertConfig) -> HFConvertConfig:
    return dataclasses.replace(
        cfg, model="BlockLM-tiny", seq_len=32, batch_size=8, ar_steps=12, convert_steps=6,
        num_prompts=2, prompt_len=8, new_tokens=16, corpus_chars=20_000,
    )  # fmt: skip


def max_abs_diff(a: BlockDiffusionLM, b: BlockDiffusionLM, *, skip_row: int | None = None) -> float:
    """The largest absolute difference between two models' tensors of the same names;
    ``skip_row``: leave that row of the embedding and LM head out (the ``[MASK]`` row)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise ValueError("max_abs_diff: the models hold different tensors")
    diffs = []
    for k in sa:
        d = (sa[k].float() - sb[k].float()).abs()
        if skip_row is not None and k in ("tok_embeddings.weight", "output.weight"):
            d = torch.cat([d[:skip_row], d[skip_row + 1 :]])
        diffs.append(float(d.max()))
    return max(diffs)


@torch.no_grad()
def hf_logit_diff(hf, model: BlockDiffusionLM, windows: torch.Tensor) -> float:
    """Max abs difference of the AR-causal logits of the transformers model and ``model`` on
    ``windows`` (over the transformers vocabulary)."""
    want = hf(windows).logits
    got = model(windows, layout="causal")[..., : want.shape[-1]]
    return float((got - want).abs().max())


def _hf_path(ar: BlockDiffusionLM, keep_mask_row: bool, windows: torch.Tensor):
    """Export ``ar`` to transformers, save and convert the folder back; returns the model and
    the logits difference between the two."""
    hf = block_lm_to_hf(ar, keep_mask_row=keep_mask_row)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        mask = ar.mask_token_id if keep_mask_row else None
        model = block_lm_from_hf(folder, mask_token_id=mask)
    model.eval()
    return model, hf_logit_diff(hf, model, windows)


def _same(out: DecodeOutput, ref: DecodeOutput, p: int) -> float:
    """Fraction of generated tokens equal to ``ref``'s at the same place."""
    equal = total = 0
    for a, b in zip(out.sequences, ref.sequences, strict=True):
        n = min(len(a), len(b))
        equal += int((a[p:n] == b[p:n]).sum())
        total += max(len(a), len(b)) - p
    return equal / max(1, total)


def _run_seed(cfg: HFConvertConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    tok = CharTokenizer()
    train_text, val_text = pydoc_corpus("train"), pydoc_corpus("val")
    if cfg.corpus_chars:
        train_text, val_text = train_text[: cfg.corpus_chars], val_text[: cfg.corpus_chars]
    train = text_dataset(tok.encode(train_text), cfg.seq_len)
    val_tokens = tok.encode(val_text)
    val = text_dataset(val_tokens, cfg.seq_len)
    bs = cfg.block_size

    ar = create_block_lm(cfg.model, tok.vocab_size)
    _train(ar, BlockLMLoss("ar"), train, cfg.ar_steps, cfg.ar_lr, cfg.batch_size, seed)
    ar.eval()
    progress.advance(f"AR {cfg.ar_steps} steps")

    span = cfg.prompt_len + cfg.new_tokens  # held-out prompts, as the LM demo takes them
    starts = torch.linspace(0, len(val_tokens) - span - 1, cfg.num_prompts).long()
    windows = torch.stack([val_tokens[s : s + span] for s in starts.tolist()])
    prompt, reference = windows[:, : cfg.prompt_len], windows[:, cfg.prompt_len :]

    models: dict[str, BlockDiffusionLM] = {}
    metrics: Metrics = {}
    for path in PATHS:
        row: dict[str, float | None] = {}
        if path == "native":
            model = copy.deepcopy(ar)
        else:
            model, row["hf_logit_diff"] = _hf_path(ar, path.endswith("kept"), windows)
        row["w_before"] = max_abs_diff(model, ar)
        loss = BlockLMLoss("sdar", block_size=bs)
        _train(model, loss, train, cfg.convert_steps, cfg.convert_lr, cfg.batch_size, seed + 1)
        models[path] = model.eval()
        row["w_after"] = max_abs_diff(model, models["native"])
        row["w_after_rest"] = max_abs_diff(model, models["native"], skip_row=ar.mask_token_id)
        row["val_loss"] = validation_loss(model, "sdar", val, bs)
        row["d_val"] = row["val_loss"] - metrics["native"]["val_loss"] if metrics else 0.0
        metrics[path] = row
        progress.advance(f"{path}: SDAR {cfg.convert_steps} steps")

    native_out = {}
    for path, model in models.items():
        for name, kw in RULES.items():
            result = block_decode(model, prompt, cfg.new_tokens, block_size=bs, **kw)
            r = _row(name, result, 1.0, ar, prompt, reference)
            native_out.setdefault(name, result)
            metrics[path].update({
                f"{name}_tpf": r["tpf"], f"{name}_nll": r["judge_nll"],
                f"{name}_match": r["match"],
                f"{name}_same": _same(result, native_out[name], cfg.prompt_len),
            })  # fmt: skip
    progress.advance("decoding")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    names = list(summary)
    for ax, metric, label in (
        (axes[0], "d_val", "SDAR validation loss - native's (nats/char)"),
        (axes[1], "thr_tpf", "TPF, threshold 0.5"),
    ):
        per_seed = zip(*(summary[name][metric].values for name in names), strict=True)
        for seed, values in enumerate(per_seed):
            ax.plot(range(len(names)), values, "o-", alpha=0.7, label=f"seed {seed}")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylabel(label)
    axes[0].axhline(0.0, color="gray", lw=0.8, ls=":")
    axes[1].legend(fontsize=7)
    fig.suptitle("hf-convert: one AR model per seed, three conversion paths")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: HFConvertConfig) -> str:
    return (
        f"{cfg.model}, AR {cfg.ar_steps} steps, SDAR (B={cfg.block_size}) {cfg.convert_steps} "
        "steps from the same AR weights per seed. HF Δlogit: max |logits| difference, "
        "transformers model against the model converted from its folder (AR-causal, held-out "
        "windows); Δw before/after: max |weight| difference from the native AR model before "
        "conversion / from the native converted model after it; val: SDAR validation loss, Δval "
        f"its difference from native; thr: threshold 0.5, ent: entropy bound 1.0 (fused); "
        f"NLL: the AR model's per-char NLL of {cfg.num_prompts} continuations of "
        f"{cfg.new_tokens} chars; same: fraction of chars equal to the native path's."
    )


STUDY = Study(
    name="hf-convert",
    summary="an AR char model SDAR-converted natively and through a transformers checkpoint",
    config=HFConvertConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("hf_logit_diff", "HF Δlogit", "{:.1e}"),
        Column("w_before", "Δw before", "{:.2g}"),
        Column("w_after", "Δw after", "{:.2g}"),
        Column("val_loss", "val", "{:.4f}"),
        Column("d_val", "Δval", "{:.4f}"),
        Column("thr_tpf", "thr TPF", "{:.2f}"),
        Column("thr_nll", "thr NLL", "{:.3f}"),
        Column("thr_match", "thr match", "{:.1%}"),
        Column("thr_same", "thr same", "{:.1%}"),
        Column("ent_tpf", "ent TPF", "{:.2f}"),
        Column("ent_nll", "ent NLL", "{:.3f}"),
        Column("ent_same", "ent same", "{:.1%}"),
    ),
    plot=_plot,
    units=lambda cfg: 2 + len(PATHS),
    note=_note,
)
