"""
SFT data selection: difficulty and quality scores, embedding clusters, semantic dedup, a map of the data.

    python -m data.sft_select --data ../shared/data/sft/en_alpaca_5000.jsonl.gz --model runs/sft \\
        --reward_model runs/reward --out_dir select_out --select_frac 0.5
    python -m data.sft_select --data 'a.jsonl:2' b.json --model hf_llama_dir/ --device cuda --k 200
    # out_dir/: scores.jsonl (one line per example: scores, cluster, what happened to it), selected.jsonl
    # (the subset, {"messages": [...]} lines any stage reads), report.md + report.json + plots/*.svg,
    # map.jsonl (2-D coordinates), embeddings.f32 (the N x dim float32 matrix, row i = example i)

One process, CPU or GPU (--device), no torchrun: scoring is inference and the rest is small next to it.
The pipeline, each step a function below that a test checks against a hand computation:
  1. score    (one streaming pass over the data, any format data/formats.py reads)
       IFD, instruction-following difficulty (Li et al. 2023, "From Quantity to Quality"): the loss of
           the answer given the instruction divided by the loss of the answer alone. Near 1 the
           instruction barely helps the model predict the answer (hard, or unrelated); IFD >= 1 means
           it does not help at all, and the paper drops those as noise (--max_ifd).
       quality: a reward.py model's score of the answer (--reward_model), and the model's own
           perplexity of the answer given the instruction (exp of the loss above).
       embedding: the mean over real tokens of one layer's hidden states (--layer), L2-normalised, of
           the conversation's canonical text (canonical(): whitespace and punctuation variants read
           the same), appended to embeddings.f32 on disk as it is computed, so RAM stays flat in N.
  2. cluster  k-means (Lloyd) in torch with k-means++ seeding, seeded; every pass streams the
              embedding file in --chunk rows, so 1M x 4096 never has to fit in memory at once.
  3. dedup    SemDeDup (Abbas et al. 2023): inside each cluster, rank members by quality and drop a
              member whose cosine similarity to a better-ranked member exceeds --dedup_threshold.
  4. select   drop IFD >= --max_ifd, then the top examples by a weighted sum of z-scored scores
              (--weights), with per-cluster quotas (--quota) so one dense topic cannot take the budget.
  5. map      PCA and t-SNE (van der Maaten & Hinton 2008), both written here in torch, on a seeded
              sample of --map_points examples; an SVG scatter coloured by cluster, before | after.
Every decision lands in the report: the flags, counts per reason and per cluster, the dedup pairs
with their texts, and each example's fate in scores.jsonl ("status").

Simplifications on purpose: IFD scores the LAST assistant turn (the instruction is everything
before it); a pair that does not fit the model keeps the first answer tokens (at most half the
context when the prompt is long) and the end of the prompt (counted as "truncated"); the reward
model reads what fits its context and an example too long for it gets no quality score (counted;
its quality term is 0 after z-scoring). k-means keeps a centroid that lost all its points where it
was (rare after k-means++). t-SNE is the exact O(n^2) algorithm: that is why the map is a sample.
Memory: what grows with N in RAM is a few numbers per example (scores, cluster) and its "file:line";
the embedding matrix (N x dim x 4 bytes) is a file on disk, memory-mapped.
"""
import argparse
import json
import math
import os
import re
import resource
import shlex
import sys
import time
import unicodedata
from array import array

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from data.formats import Report, iter_conversations  # noqa: E402

SCORE_KEYS = ("ifd", "quality", "ppl")   # what --weights may weigh


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True,
                   help="SFT files/globs/dirs, 'path:weight' mixes (data/formats.py)")
    g.add_argument("--out_dir", required=True)
    g.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    g = p.add_argument_group("scoring")
    g.add_argument("--model", required=True,
                   help="LM for IFD, perplexity and embeddings: our checkpoint/run dir or an HF LLaMA dir")
    g.add_argument("--tokenizer", default=None, help="override the tokenizer the checkpoint names")
    g.add_argument("--reward_model", default=None, help="a reward.py checkpoint or run dir (quality score)")
    g.add_argument("--layer", type=int, default=-1,
                   help="embedding layer: block index 0..n_layers-1, -1 = the final norm")
    g.add_argument("--embed_text", default="canonical", choices=["canonical", "raw"],
                   help="embed the text after canonical() (whitespace, full-width and CJK punctuation "
                        "normalised) or as is")
    g.add_argument("--max_len", type=int, default=0, help="tokens per scored sequence (0 = the model's max_seq_len)")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    g = p.add_argument_group("clusters and dedup")
    g.add_argument("--k", type=int, default=0, help="clusters (0 = about sqrt(N/2), at most 100)")
    g.add_argument("--kmeans_iters", type=int, default=30)
    g.add_argument("--init_sample", type=int, default=20000, help="k-means++ seeds from this many sampled rows")
    g.add_argument("--chunk", type=int, default=8192, help="rows per block in k-means and dedup (memory bound)")
    g.add_argument("--dedup_threshold", type=float, default=0.98,
                   help="cosine above which a worse member is a duplicate (re-tune per model with bench/sft_select.py)")
    g = p.add_argument_group("selection")
    g.add_argument("--weights", default="ifd=1,quality=1,ppl=0",
                   help="weighted z-scores: ifd (harder = higher), quality (reward), ppl (lower perplexity = higher)")
    g.add_argument("--max_ifd", type=float, default=1.0,
                   help="drop IFD >= this (the instruction does not help); 0 = keep all")
    g.add_argument("--select_frac", type=float, default=0.5)
    g.add_argument("--select_n", type=int, default=0, help="select this many instead of --select_frac")
    g.add_argument("--quota", default="proportional", choices=["proportional", "equal"],
                   help="per-cluster budget: proportional to the cluster's eligible size, or equal shares "
                        "(water-filled)")
    g = p.add_argument_group("map")
    g.add_argument("--map", default="both", choices=["both", "pca", "none"])
    g.add_argument("--map_points", type=int, default=2000)
    g.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    g.add_argument("--tsne_iters", type=int, default=500)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.weight_of = parse_weights(args.weights)
    except ValueError as e:
        common.fail(str(e))
    if not 0 < args.select_frac <= 1:
        common.fail(f"--select_frac must be in (0, 1], got {args.select_frac}")
    return args


def parse_weights(spec):
    """'ifd=1,quality=0.5' -> {"ifd": 1.0, "quality": 0.5, "ppl": 0.0}."""
    out = {k: 0.0 for k in SCORE_KEYS}
    for part in filter(None, spec.split(",")):
        key, sep, val = part.partition("=")
        if not sep or key.strip() not in out:
            raise ValueError(f"--weights: {part!r} is not KEY=NUMBER with KEY in {SCORE_KEYS}")
        out[key.strip()] = float(val)
    return out


# -----------------------------------------------------------------------------
# 1. Scores: IFD, perplexity, embeddings (one forward), reward


def ifd_pair(tok, messages, max_len):
    """One conversation -> (conditioned ids, alone ids, n_answer, truncated).

    conditioned = render_prompt(everything before the last assistant turn) + answer + end marker;
    alone       = BOS + assistant header + answer + end marker (the answer with no instruction).
    The last n_answer tokens of both are the SAME target tokens, so the two losses compare how well
    the answer is predicted with and without the instruction, and nothing else."""
    prompt = tok.render_prompt(messages[:-1])
    ids, _ = tok.render_conversation(messages)
    if ids[:len(prompt)] != prompt:   # the template's contract (common.encode_group relies on it too)
        raise RuntimeError("render_conversation(prompt + answer) does not start with render_prompt(prompt)")
    answer = ids[len(prompt):]                        # answer content + end marker
    head = [tok.bos_id] + tok.header_ids["assistant"]
    truncated = len(prompt) + len(answer) > max_len
    if truncated:   # keep the answer's start (at most half the context if the prompt needs it) and the prompt's end
        keep = min(len(answer), max_len - min(len(prompt), max_len // 2))
        answer = answer[:keep]
        room = max_len - keep
        if len(prompt) > room:
            prompt = [tok.bos_id] + prompt[len(prompt) - room + 1:]
    return prompt + answer, head + answer, len(answer), truncated


def pad_batch(seqs, pad_id):
    """Right-padded (B, T) ids and attention mask (1 = real token)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return idx, mask


@torch.no_grad()
def answer_losses(model, seqs, n_answer, pad_id, layer=-1, ctx=None):
    """Mean next-token loss over the last n_answer[i] tokens of each sequence, and the mean-pooled,
    L2-normalised hidden states of `layer` over each sequence's real tokens.
    -> (losses (B,) float64 tensor, embeddings (B, dim) float32 tensor)."""
    device = next(model.parameters()).device
    idx, mask = pad_batch(seqs, pad_id)
    idx, mask = idx.to(device), mask.to(device)
    captured = {}
    hook = None
    if layer >= 0:   # a hook, so the model's own forward runs (no copy of its block loop here)
        hook = model.layers[layer].register_forward_hook(lambda m, inp, out: captured.setdefault("h", out))
    try:
        with ctx or torch.autocast(device.type, enabled=False):
            h = model.hidden_states(idx, mask)                                     # (B, T, dim)
    finally:
        if hook is not None:
            hook.remove()
    lengths = mask.sum(1)
    # Targets: position t predicts token t+1; the answer's tokens are the last n of each row.
    pos = torch.arange(idx.size(1), device=device)[None, :]
    n = torch.tensor(n_answer, device=device)[:, None]
    target = (pos + 1 >= lengths[:, None] - n) & (pos + 1 < lengths[:, None])   # (B, T) bool
    b, t = target.nonzero(as_tuple=True)
    # The head only where a target is read: the full (B, T, vocab) logits of a 32k vocabulary would
    # dominate memory. _head is the model's own LM head (tied/untied, adapters), kept in float32.
    logits = model._head(h[b, t]).float()
    tok_loss = F.cross_entropy(logits, idx[b, t + 1], reduction="none").double()
    losses = torch.zeros(idx.size(0), dtype=torch.float64, device=device).index_add_(0, b, tok_loss)
    losses = losses / torch.tensor(n_answer, dtype=torch.float64, device=device)
    hs = captured.get("h", h).float() * mask[..., None]
    emb = F.normalize(hs.sum(1) / lengths[:, None], dim=-1)
    return losses.cpu(), emb.cpu()


# CJK punctuation that NFKC leaves alone, mapped to its ASCII counterpart.
CJK_PUNCT = str.maketrans({"。": ".", "、": ",", "「": '"', "」": '"', "『": '"', "』": '"',
                           "《": "<", "》": ">"})


def canonical(text):
    """What an embedding reads with --embed_text canonical: NFKC (full-width forms -> ASCII), CJK
    punctuation -> ASCII, runs of spaces/tabs -> one space, each line stripped, blank lines dropped.
    The near-copies that merging SFT sets produces differ in exactly these, and a small model's
    tokenizer turns a doubled space into other tokens: normalising first makes them one text again.
    IFD and perplexity are still computed on the raw text (what SFT trains on)."""
    text = unicodedata.normalize("NFKC", text).translate(CJK_PUNCT)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line) or text


def ifd_scores(model, tok, convs, max_len, layer=-1, ctx=None, embed_text="canonical"):
    """IFD of a batch of conversations in one padded forward: B conditioned rows, B answer-alone rows,
    and, with embed_text="canonical", one more row per conversation whose canonical text differs.
    -> dict of lists (loss_cond, loss_alone, ifd, n_tokens, truncated), and the (B, dim) embeddings of
    the conversation, instruction and answer together (what SemDeDup embeds), cut to max_len as IFD is."""
    B = len(convs)
    pairs = [ifd_pair(tok, m, max_len) for m in convs]
    canon = convs if embed_text == "raw" else [[{**m, "content": canonical(m["content"])} for m in c] for c in convs]
    extra = [i for i in range(B) if canon[i] != convs[i]]
    # The extra rows are cut like the conditioned ones (the instruction's end, the answer's start): a
    # plain prefix would make every long passage (exam questions, multi-turn branches) look the same.
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs] + [ifd_pair(tok, canon[i], max_len)[0] for i in extra]
    n = [p[2] for p in pairs] * 2 + [1] * len(extra)   # (the extra rows' loss is not used)
    losses, emb = answer_losses(model, seqs, n, tok.pad_id, layer, ctx)
    cond, alone = losses[:B], losses[B:2 * B]
    emb_out = emb[:B].clone()
    emb_out[extra] = emb[2 * B:]
    return {"loss_cond": cond.tolist(), "loss_alone": alone.tolist(), "ifd": (cond / alone).tolist(),
            "n_tokens": [len(p[0]) for p in pairs], "truncated": [p[3] for p in pairs]}, emb_out


def reward_quality(rm, rm_tok, convs, batch_size, ctx):
    """Raw reward-model scores of each conversation's last answer; NaN where it does not fit the RM."""
    import reward
    groups = [common.encode_group(rm_tok, {"messages": m[:-1], "responses": [m[-1]["content"]]}, rm.config.max_seq_len)
              for m in convs]
    ok = [i for i, g in enumerate(groups) if g is not None]
    out = [float("nan")] * len(convs)
    if ok:
        local = common.DistInfo(device=next(rm.parameters()).device)
        scores = reward.score_groups(rm, [groups[i] for i in ok], batch_size, rm_tok.pad_id, local, ctx)
        for i, s in zip(ok, scores):
            out[i] = s[0]
    return out


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


# -----------------------------------------------------------------------------
# 2. k-means, chunked over rows


def rows(X, a, b, device):
    """Rows a..b of an array (numpy memmap or tensor) as a float32 tensor on `device`."""
    # np.array: a copy, because memmap pages are read-only and torch wants writable memory
    t = X[a:b] if isinstance(X, torch.Tensor) else torch.from_numpy(np.array(X[a:b]))
    return t.to(device=device, dtype=torch.float32)


def take(X, index, device):
    """Rows at the (sorted: a memmap reads fastest in order) integer array `index`, as rows() does."""
    t = X[torch.from_numpy(index)] if isinstance(X, torch.Tensor) else torch.from_numpy(np.array(X[index]))
    return t.to(device=device, dtype=torch.float32)


def sq_dists(x, c):
    """Squared Euclidean distances (n, k) between rows of x and rows of c, clamped at 0."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min_(0)


def kmeans_pp(S, k, gen):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on the rows of S: the first centre uniformly,
    then each next one with probability proportional to its squared distance to the nearest centre
    so far. O(k n) distance updates, which is why it runs on a sample (--init_sample)."""
    n = S.size(0)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [first]
    d2 = sq_dists(S, S[first:first + 1])[:, 0]
    for _ in range(1, k):
        if float(d2.sum()) <= 0:   # fewer distinct points than k: any point will do
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial((d2 / d2.sum()).double().cpu(), 1, generator=gen))
        centers.append(nxt)
        d2 = torch.minimum(d2, sq_dists(S, S[nxt:nxt + 1])[:, 0])
    return S[centers].clone()


def kmeans(X, k, iters=30, seed=0, chunk=8192, init_sample=20000, device="cpu"):
    """Lloyd's k-means on the rows of X (N, d) -> (centroids (k, d), assignment (N,) int64, history).

    Memory: one chunk of rows at a time plus the k x d centroid sums (float64, so the sums do not
    depend on how the rows were chunked). Stops when no assignment changes. history: per iteration
    {"iter", "inertia" (sum of squared distances), "changed"}."""
    N = X.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} clusters need 1 <= k <= number of examples ({N})")
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(N, generator=gen)[:min(N, init_sample)].sort().values.numpy()
    S = take(X, sample, device)
    C = kmeans_pp(S, k, gen)
    assign = torch.full((N,), -1, dtype=torch.long)
    history = []
    for it in range(iters):
        sums = torch.zeros(k, X.shape[1], dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        inertia, changed = 0.0, 0
        for a in range(0, N, chunk):
            x = rows(X, a, min(N, a + chunk), device)
            d2 = sq_dists(x, C)
            best = d2.argmin(1)
            # The distance to the chosen centre directly: the expansion in sq_dists loses digits to
            # cancellation when points sit close to their centre (fine for the argmin, not for the sum).
            inertia += float((x - C[best]).pow(2).sum())
            changed += int((assign[a:a + len(x)] != best.cpu()).sum())
            assign[a:a + len(x)] = best.cpu()
            sums.index_add_(0, best, x.double())
            counts.index_add_(0, best, torch.ones_like(best, dtype=torch.float64))
        history.append({"iter": it, "inertia": inertia, "changed": changed})
        if changed == 0:
            break
        live = counts > 0   # an emptied cluster keeps its old centroid (see the module docstring)
        C[live] = (sums[live] / counts[live, None]).float()
    return C.cpu(), assign, history


# -----------------------------------------------------------------------------
# 3. SemDeDup


def semdedup(X, assign, keep_key, threshold, chunk_elems=1 << 24, device="cpu"):
    """Inside each cluster, rank members by keep_key (higher first; ties: lower index first) and drop a
    member whose cosine similarity to ANY better-ranked member is > threshold (the rows of X are
    L2-normalised, so cosine = dot product). That is SemDeDup's rule (max over the upper triangle
    of the similarity matrix); the best member of every near-duplicate group always survives.
    -> (dup_of (N,) int64: -1 kept, else the better-ranked member it is most similar to,
        cos (N,) float32: that similarity). Memory: one cluster's embeddings and a block of
        similarities (chunk_elems floats) at a time."""
    N = X.shape[0]
    dup_of = torch.full((N,), -1, dtype=torch.long)
    cos = torch.zeros(N)
    key = torch.as_tensor(np.asarray(keep_key, dtype=np.float64))
    key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
    for c in torch.unique(assign).tolist():
        members = (assign == c).nonzero(as_tuple=True)[0]
        # Rank: members come in index order, and a stable sort by -key keeps that order among ties.
        members = members[torch.sort(-key[members], stable=True).indices]
        m = len(members)
        if m < 2:
            continue
        order = members.sort().values.numpy()
        E = take(X, order, device)[torch.searchsorted(torch.from_numpy(order), members).to(device)]   # in rank order
        block = max(1, chunk_elems // m)
        for a in range(1, m, block):
            b = min(m, a + block)
            sims = E[a:b] @ E[:b].T                          # (rows, b): row r is member a+r
            ranks = torch.arange(b, device=sims.device)[None, :]
            sims = sims.masked_fill(ranks >= torch.arange(a, b, device=sims.device)[:, None], -2.0)
            best, j = sims.max(1)
            hit = (best > threshold).cpu()
            dup_of[members[a:b][hit]] = members[j.cpu()[hit]]
            cos[members[a:b]] = best.cpu().clamp_min(-1)
    return dup_of, cos


# -----------------------------------------------------------------------------
# 4. Selection


def zscore(x):
    """(x - mean) / std over the finite values; NaN (no score) -> 0, i.e. the average."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    out = np.zeros_like(x)
    if ok.sum() > 1 and x[ok].std() > 0:
        out[ok] = (x[ok] - x[ok].mean()) / x[ok].std()
    return out


def weighted_score(scores, weights):
    """sum_k w_k z(s_k): ifd as is (harder = higher), quality as is, ppl as -log(ppl) (more fluent = higher)."""
    signed = {"ifd": np.asarray(scores["ifd"]), "quality": np.asarray(scores["quality"]),
              "ppl": -np.asarray(scores["loss_cond"])}
    total = np.zeros(len(signed["ifd"]))
    for key, w in weights.items():
        if w:
            total += w * zscore(signed[key])
    return total


def quotas(sizes, budget, how):
    """Per-cluster budget -> list of ints, each <= its cluster size, summing to min(budget, sum(sizes)).
    proportional: budget * n_c / n by largest remainder (Hamilton), ties to the lower cluster id;
    equal: water-filling, every cluster the same share, a small cluster's unused share spread over the rest."""
    sizes = [int(s) for s in sizes]
    budget = min(int(budget), sum(sizes))
    if budget == 0:
        return [0] * len(sizes)
    if how == "proportional":
        exact = [budget * s / sum(sizes) for s in sizes]
        q = [math.floor(e) for e in exact]
        for c in sorted(range(len(sizes)), key=lambda c: (-(exact[c] - q[c]), c))[:budget - sum(q)]:
            q[c] += 1
        return q
    q, left = [0] * len(sizes), budget
    open_ = [c for c in range(len(sizes)) if sizes[c] > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for c in list(open_):
            take = min(share, sizes[c] - q[c], left)
            q[c] += take
            left -= take
            if q[c] == sizes[c]:
                open_.remove(c)
            if left == 0:
                break
    return q


def select(score, assign, eligible, budget, how):
    """Top examples by score within each cluster's quota -> (selected bool array, per-cluster rows)."""
    score, assign, eligible = np.asarray(score), np.asarray(assign), np.asarray(eligible)
    clusters = sorted(set(assign.tolist()))
    sizes = [int((eligible & (assign == c)).sum()) for c in clusters]
    q = quotas(sizes, budget, how)
    selected = np.zeros(len(score), dtype=bool)
    table = []
    for c, n, take in zip(clusters, sizes, q):
        idx = np.nonzero(eligible & (assign == c))[0]
        best = idx[np.lexsort((idx, -score[idx]))][:take]   # score descending, ties by index
        selected[best] = True
        table.append({"cluster": c, "eligible": n, "quota": take,
                      "min_score": float(score[best].min()) if take else None})
    return selected, table


# -----------------------------------------------------------------------------
# 5. The map: PCA, t-SNE, and how well a 2-D picture keeps neighbours


def pca(X, dims=2):
    """Project centred rows onto the top `dims` principal directions (SVD of the centred matrix).
    Signs fixed so each direction's largest |loading| is positive (SVD's sign is arbitrary).
    -> (Y (n, dims), explained variance per direction)."""
    X = torch.as_tensor(X, dtype=torch.float64)
    Xc = X - X.mean(0)
    _, s, Vh = torch.linalg.svd(Xc, full_matrices=False)
    V = Vh[:dims]
    V = V * torch.sign(V.gather(1, V.abs().argmax(1, keepdim=True)))
    return (Xc @ V.T).float(), (s[:dims] ** 2 / max(1, X.size(0) - 1)).float()


def tsne_affinities(D2, perplexity, tol=1e-5, steps=64):
    """Conditional affinities p_{j|i} = exp(-beta_i d_ij^2) / sum, beta_i found by bisection (all rows
    at once) so that each row's entropy equals log(perplexity). -> (P (n, n), entropies (n,))."""
    n = D2.size(0)
    target = math.log(perplexity)
    D2 = D2.double().clone()
    D2.fill_diagonal_(math.inf)   # a point is not its own neighbour
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    beta = torch.ones(n, dtype=torch.float64)
    # Work with distances relative to each row's nearest neighbour: exp stays finite for any scale.
    D2 = D2 - D2.min(1, keepdim=True).values
    for _ in range(steps):
        P = torch.exp(-D2 * beta[:, None])
        sumP = P.sum(1)
        H = torch.log(sumP) + beta * (torch.nan_to_num(D2, posinf=0) * P).sum(1) / sumP
        too_flat = H > target   # entropy too high -> sharpen (beta up)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
        if float((H - target).abs().max()) < tol:
            break
    P = torch.exp(-D2 * beta[:, None])
    P = P / P.sum(1, keepdim=True)
    return P, -(P * torch.log(P.clamp_min(1e-300))).sum(1)


def tsne(X, perplexity=30.0, iters=500, seed=0, exaggeration=12.0, exaggeration_iters=None):
    """Exact t-SNE -> (Y (n, 2), final KL(P || Q)).

    The recipe of the paper with two later, well-tested defaults: the start is the PCA projection
    scaled to std 1e-4 (Kobak & Berens 2019: deterministic, and it keeps the global layout), and the
    learning rate is n / exaggeration (Belkina et al. 2019) instead of a fixed 200. Early exaggeration
    (P x 12) for the first quarter, momentum 0.5 then 0.8, per-coordinate gains (Jacobs 1988).
    `seed` only breaks exact ties in the PCA start; the run is deterministic."""
    X = torch.as_tensor(X, dtype=torch.float64)
    n = X.size(0)
    perplexity = min(perplexity, (n - 1) / 3)   # the usual limit: a perplexity above that has no meaning
    P, _ = tsne_affinities(torch.cdist(X, X).pow(2), perplexity)
    # The optimisation runs in float32: twice as fast as float64 on a CPU, and t-SNE's answer is a
    # picture, not a number that later steps depend on (the affinities above are float64).
    P = ((P + P.T) / (2 * n)).clamp_min(1e-12).float()   # symmetric joint probabilities
    Y = pca(X, 2)[0]
    Y = Y / Y[:, 0].std().clamp_min(1e-12) * 1e-4
    Y = Y + 1e-8 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(seed))
    lr = max(n / exaggeration, 50.0)
    exaggeration_iters = iters // 4 if exaggeration_iters is None else exaggeration_iters
    update, gains = torch.zeros_like(Y), torch.ones_like(Y)
    for it in range(iters):
        ex = exaggeration if it < exaggeration_iters else 1.0
        num = 1.0 / (1.0 + torch.cdist(Y, Y).pow(2))     # Student-t kernel, one degree of freedom
        num.fill_diagonal_(0.0)
        Q = (num / num.sum()).clamp_min(1e-12)
        W = (ex * P - Q) * num                              # dC/dy_i = 4 sum_j W_ij (y_i - y_j)
        grad = 4 * (W.sum(1, keepdim=True) * Y - W @ Y)
        gains = torch.where(torch.sign(grad) != torch.sign(update), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if it < exaggeration_iters else 0.8) * update - lr * gains * grad
        Y = Y + update
        Y = Y - Y.mean(0)
    kl = float((P * torch.log(P / Q)).sum())
    return Y.float(), kl


def neighbourhood_preservation(X, Y, k=10):
    """Mean fraction of each point's k nearest neighbours in X that are also among its k nearest in
    Y (1 = every neighbourhood kept; about k/(n-1) for a random picture)."""
    X, Y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(Y, dtype=torch.float64)
    k = min(k, X.size(0) - 1)

    def knn(Z):
        D = torch.cdist(Z, Z)
        D.fill_diagonal_(math.inf)
        return D.topk(k, largest=False).indices

    a, b = knn(X), knn(Y)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(hits.double().mean() / k)


# -----------------------------------------------------------------------------
# The run: score (streaming) -> cluster -> dedup -> select -> map -> write


def load_models(args):
    """(model, tok, rm, rm_tok, ctx): the scoring LM in eval mode, and the reward model if asked for."""
    from chat import load_chat_model
    device = torch.device(args.device)
    try:
        model, tok = load_chat_model(args.model, device, args.tokenizer)
    except ValueError as e:
        common.fail(str(e))
    if args.layer >= model.config.n_layers or args.layer < -1:
        common.fail(f"--layer {args.layer}: the model has blocks 0..{model.config.n_layers - 1} (-1 = final norm)")
    rm = rm_tok = None
    if args.reward_model:
        import reward
        rm, meta = reward.load_reward_model(args.reward_model, device)
        rm_tok = reward.tokenizer_for(meta, argparse.Namespace(tokenizer=args.tokenizer))   # sha256-checked
    ctx = common.autocast(device, common.resolve_dtype(args.dtype, device))
    return model, tok, rm, rm_tok, ctx


def score_pass(args, model, tok, rm, rm_tok, ctx, emb_path):
    """Stream the data once: scores into lists, embeddings appended to emb_path. Conversations are
    scored in buffers of 16 batches, sorted by length inside a buffer (less padding), order kept."""
    max_len = args.max_len or model.config.max_seq_len
    report = Report()
    # Numbers in typed arrays (8 bytes a value, not a Python float object each): at 1M examples the
    # columns and the "file:line" strings are ~150 MB, the only other state that grows with N.
    cols = {k: array("d") for k in ("loss_cond", "loss_alone", "ifd", "n_tokens", "truncated", "quality")}
    cols["where"] = []
    t0, buf = time.time(), []

    def flush(f):
        order = sorted(range(len(buf)), key=lambda i: sum(len(m["content"]) for m in buf[i][1]))
        res, embs = [None] * len(buf), [None] * len(buf)
        for a in range(0, len(order), args.batch_size):
            part = order[a:a + args.batch_size]
            convs = [buf[i][1] for i in part]
            s, emb = ifd_scores(model, tok, convs, max_len, args.layer, ctx, args.embed_text)
            q = reward_quality(rm, rm_tok, convs, args.batch_size, ctx) if rm is not None else [math.nan] * len(part)
            for j, i in enumerate(part):
                res[i] = {k: v[j] for k, v in s.items()} | {"quality": q[j]}
                embs[i] = emb[j]
        for (where, _), r in zip(buf, res):
            cols["where"].append(where)
            for k, v in r.items():
                cols[k].append(v)
        f.write(torch.stack(embs).numpy().astype(np.float32).tobytes())
        buf.clear()
        n = len(cols["where"])
        print(f"scored {n} examples, {n / (time.time() - t0):.1f} examples/s", file=sys.stderr)

    with open(emb_path + ".tmp", "wb") as f:
        try:
            for item in iter_conversations(args.data, report, args.seed, with_where=True):
                buf.append(item)
                if len(buf) == 16 * args.batch_size:
                    flush(f)
                if args.limit and len(cols["where"]) + len(buf) >= args.limit:
                    break
        except (OSError, ValueError) as e:
            common.fail(f"--data: {e}")
        if buf:
            flush(f)
    os.replace(emb_path + ".tmp", emb_path)
    return cols, report, max_len


def run(args):
    t_start = time.time()
    os.makedirs(os.path.join(args.out_dir, "plots"), exist_ok=True)
    common.seed_everything(args.seed)
    model, tok, rm, rm_tok, ctx = load_models(args)
    timing = {}

    t = time.time()
    emb_path = os.path.join(args.out_dir, "embeddings.f32")
    cols, read_report, max_len = score_pass(args, model, tok, rm, rm_tok, ctx, emb_path)
    N = len(cols["where"])
    if N == 0:
        common.fail(f"--data: no valid conversations ({read_report.summary()})")
    dim = os.path.getsize(emb_path) // (4 * N)
    X = np.memmap(emb_path, dtype=np.float32, mode="r", shape=(N, dim))
    timing["score"] = (time.time() - t, peak_rss_mb())
    cols["ppl"] = np.exp(np.asarray(cols["loss_cond"]))

    t = time.time()
    k = min(N, args.k or min(100, max(1, round(math.sqrt(N / 2)))))
    _, assign, km_hist = kmeans(X, k, args.kmeans_iters, args.seed, args.chunk, args.init_sample, args.device)
    timing["cluster"] = (time.time() - t, peak_rss_mb())

    t = time.time()
    score = weighted_score(cols, args.weight_of)
    have_quality = np.isfinite(np.asarray(cols["quality"])).any()
    keep_key = np.asarray(cols["quality"]) if have_quality else score
    dup_of, dup_cos = semdedup(X, assign, keep_key, args.dedup_threshold, device=args.device)
    timing["dedup"] = (time.time() - t, peak_rss_mb())

    ifd = np.asarray(cols["ifd"])
    is_dup = dup_of.numpy() >= 0
    no_help = (ifd >= args.max_ifd) if args.max_ifd > 0 else np.zeros(N, dtype=bool)
    eligible = ~is_dup & ~no_help
    budget = args.select_n or round(args.select_frac * N)
    selected, table = select(score, assign.numpy(), eligible, budget, args.quota)

    t = time.time()
    mapped = make_map(args, X, assign.numpy(), selected) if args.map != "none" else None
    timing["map"] = (time.time() - t, peak_rss_mb())

    status = np.where(selected, "selected", np.where(is_dup, "duplicate", np.where(no_help, "ifd_filtered",
                                                                                        "below_quota")))
    t = time.time()
    texts = write_outputs(args, N, cols, assign.numpy(), score, status, dup_of.numpy(), dup_cos.numpy(),
                          want=example_indices(dup_of.numpy(), ifd, selected))
    timing["write"] = (time.time() - t, peak_rss_mb())
    summary = {"n": N, "dim": dim, "k": k, "max_len": max_len, "budget": budget, "selected": int(selected.sum()),
               "duplicates": int(is_dup.sum()), "ifd_filtered": int((no_help & ~is_dup).sum()),
               "truncated": int(sum(cols["truncated"])), "embedding_bytes": N * dim * 4,
               "kmeans": km_hist, "clusters": table, "timing": timing, "total_s": time.time() - t_start,
               "quality_missing": int(np.isnan(np.asarray(cols["quality"])).sum()) if rm is not None else None,
               "keep_by": "quality" if have_quality else "weighted score", "map": mapped and mapped["stats"],
               "read": read_report.to_dict(), "read_summary": read_report.summary(),
               "args": {k: v for k, v in vars(args).items() if k != "weight_of"}}
    write_report(args, summary, cols, assign.numpy(), status, dup_of.numpy(), dup_cos.numpy(), texts, mapped)
    print(f"{N} examples -> {summary['selected']} selected ({summary['duplicates']} duplicates, "
          f"{summary['ifd_filtered']} IFD >= {args.max_ifd}); report: {os.path.join(args.out_dir, 'report.md')}",
          file=sys.stderr)
    return summary


def make_map(args, X, assign, selected):
    """PCA (and t-SNE) of a seeded sample of the embeddings -> coordinates, plots and quality numbers."""
    import run_lab
    N = X.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(N, generator=gen)[:min(N, args.map_points)].sort().values.numpy()
    S = take(X, idx, "cpu").double()
    out = {"index": idx, "pca": pca(S)[0].numpy(), "stats": {"points": len(idx)}}
    stats = out["stats"]
    stats["pca_explained"] = pca(S)[1].tolist()
    stats["pca_knn_preservation"] = neighbourhood_preservation(S, out["pca"])
    projections = [("PCA", "pca")]
    if args.map == "both" and len(idx) >= 5:
        out["tsne"], stats["tsne_kl"] = tsne(S, args.perplexity, args.tsne_iters, args.seed)
        out["tsne"] = out["tsne"].numpy()
        stats["tsne_knn_preservation"] = neighbourhood_preservation(S, out["tsne"])
        projections.append(("t-SNE", "tsne"))
    sel = selected[idx]
    with open(os.path.join(args.out_dir, "map.jsonl.tmp"), "w", encoding="utf-8") as f:
        for r, i in enumerate(idx):
            row = {"i": int(i), "cluster": int(assign[i]), "selected": bool(selected[i])}
            row.update({key: [round(float(v), 5) for v in out[key][r]] for _, key in projections})
            f.write(json.dumps(row) + "\n")
    os.replace(os.path.join(args.out_dir, "map.jsonl.tmp"), os.path.join(args.out_dir, "map.jsonl"))
    for name, key in projections:
        Y, g = out[key], assign[idx]
        run_lab.svg_scatter(os.path.join(args.out_dir, "plots", f"map_{key}.svg"),
                            f"{name} of the embeddings, coloured by cluster",
                            [("before: all", Y[:, 0], Y[:, 1], g), ("after: selected", Y[sel, 0], Y[sel, 1], g[sel])])
    return out


def example_indices(dup_of, ifd, selected, n=8):
    """Which examples' texts the report shows: dedup pairs, and the highest/lowest-IFD selected ones."""
    dups = np.nonzero(dup_of >= 0)[0][:n]
    sel = np.nonzero(selected)[0]
    by_ifd = sel[np.argsort(ifd[sel], kind="stable")]
    return (set(dups.tolist()) | set(dup_of[dups].tolist()) | set(by_ifd[:n // 2].tolist())
            | set(by_ifd[-n // 2:].tolist()))


def write_outputs(args, N, cols, assign, score, status, dup_of, dup_cos, want):
    """Second pass over the data (the conversations were not kept in memory): selected.jsonl and
    scores.jsonl, each written to a temporary file and renamed when complete. -> {index: messages}."""
    sel_path, score_path = (os.path.join(args.out_dir, n) for n in ("selected.jsonl", "scores.jsonl"))
    texts = {}
    with open(sel_path + ".tmp", "w", encoding="utf-8") as fs, open(score_path + ".tmp", "w", encoding="utf-8") as fo:
        for i, (where, msgs) in enumerate(iter_conversations(args.data, Report(), args.seed, with_where=True)):
            if i == N:
                break
            if where != cols["where"][i]:
                common.fail(f"--data changed while it was being read ({where} != {cols['where'][i]})")
            if i in want:
                texts[i] = msgs
            if status[i] == "selected":
                fs.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
            row = {"i": i, "where": where, "status": str(status[i]), "cluster": int(assign[i]),
                   "score": float(score[i])}
            row.update({k: float(cols[k][i]) for k in ("ifd", "loss_cond", "loss_alone", "ppl", "quality")})
            row.update(n_tokens=int(cols["n_tokens"][i]), truncated=bool(cols["truncated"][i]))
            if dup_of[i] >= 0:
                row.update(dup_of=int(dup_of[i]), dup_cos=float(dup_cos[i]))
            fo.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in row.items()}, ensure_ascii=False) + "\n")
    os.replace(sel_path + ".tmp", sel_path)
    os.replace(score_path + ".tmp", score_path)
    return texts


def last_question(messages):
    return messages[-2]["content"]   # the user turn the scored answer replies to


def write_report(args, summary, cols, assign, status, dup_of, dup_cos, texts, mapped):
    """report.md (every choice and count, the dedup pairs with texts, plots) + report.json."""
    import run_lab
    cell, N = run_lab.cell, summary["n"]
    cut = lambda text, n=120: cell(text if len(text) <= n else text[:n] + "…")   # noqa: E731
    L = [f"# SFT data selection: {N} examples -> {summary['selected']} selected", "",
         "Command: `python -m data.sft_select " + shlex.join(args.argv) + "`", "",
         "## Input", "", "```", summary["read_summary"], "```", "",
         "## Choices", "",
         f"- scoring model `{args.model}`, sequences cut to {summary['max_len']} tokens "
         f"({summary['truncated']} of {N} pairs truncated); embeddings: layer {args.layer} "
         f"({'final norm' if args.layer < 0 else 'block output'}) of the {args.embed_text} text, "
         f"mean over real tokens, "
         f"L2-normalised, "
         f"dim {summary['dim']}, {summary['embedding_bytes'] / 2**20:.1f} MiB on disk",
         (f"- quality: reward model `{args.reward_model}`, {summary['quality_missing']} example(s) too long for it "
          "(no quality score)" if args.reward_model else "- quality: no reward model (quality not scored)"),
         f"- k-means: k = {summary['k']}, k-means++ seeded on <= {args.init_sample} rows, seed {args.seed}, "
         f"{len(summary['kmeans'])} iteration(s), final inertia {summary['kmeans'][-1]['inertia']:.4g}, "
         f"last change {summary['kmeans'][-1]['changed']} assignment(s)",
         f"- SemDeDup: cosine > {args.dedup_threshold} to a better member of the same cluster, better = higher "
         f"{summary['keep_by']}: {summary['duplicates']} removed",
         f"- IFD filter: IFD >= {args.max_ifd} dropped: {summary['ifd_filtered']} (0 = filter off)" if args.max_ifd > 0
         else "- IFD filter: off",
         "- score = " + " + ".join(f"{w:g} x z({k})" for k, w in args.weight_of.items() if w)
         + " (z over the set; ppl enters as -log ppl, so lower perplexity scores higher)",
         f"- budget {summary['budget']} ({'--select_n' if args.select_n else f'{args.select_frac:g} of {N}'}), "
         f"{args.quota} per-cluster quotas, top score within each quota: {summary['selected']} selected", "",
         "## Time and memory", "", "| phase | seconds | examples/s | peak RSS MiB |", "|---|---:|---:|---:|"]
    for phase, (sec, rss) in summary["timing"].items():
        L.append(f"| {phase} | {sec:.1f} | {N / max(sec, 1e-9):.1f} | {rss:.0f} |")
    L += ["", "## Scores", "", "| score | mean | p10 | median | p90 | missing |", "|---|---:|---:|---:|---:|---:|"]
    series = []
    for key in ("ifd", "loss_cond", "loss_alone", "ppl", "quality"):
        v = np.asarray(cols[key], dtype=np.float64)
        ok = v[np.isfinite(v)]
        if len(ok):
            L.append(f"| {key} | {ok.mean():.4g} | " + " | ".join(f"{np.quantile(ok, q):.4g}" for q in (0.1, 0.5, 0.9))
                     + f" | {N - len(ok)} |")
        if key == "ifd" and len(ok):
            for name, mask in (("all", np.ones(N, bool)), ("selected", status == "selected")):
                counts, edges = np.histogram(v[mask & np.isfinite(v)], bins=30, range=(ok.min(), ok.max() + 1e-9))
                series.append((f"IFD, {name}", ((edges[:-1] + edges[1:]) / 2).tolist(), counts.tolist()))
    run_lab.svg_plot(os.path.join(args.out_dir, "plots", "ifd_hist.svg"), "IFD histogram", series, xlabel="IFD",
                     ylabel="examples")
    L += ["", "![IFD histogram](plots/ifd_hist.svg)", "", "## Clusters", "",
          "| cluster | size | duplicates | IFD-filtered | eligible | quota | selected | mean IFD | min selected score "
          "| e.g. |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ifd = np.asarray(cols["ifd"])
    for row in summary["clusters"]:
        c = row["cluster"]
        m = assign == c
        first = int(np.nonzero(m)[0][0])
        L.append(f"| {c} | {int(m.sum())} | {int((m & (status == 'duplicate')).sum())} | "
                 f"{int((m & (status == 'ifd_filtered')).sum())} | {row['eligible']} | {row['quota']} | "
                 f"{int((m & (status == 'selected')).sum())} | {ifd[m].mean():.3f} | "
                 f"{'-' if row['min_score'] is None else format(row['min_score'], '.3f')} | "
                 f"{cut(cols['where'][first], 60)} |")
    L += ["", f"## Semantic duplicates removed ({summary['duplicates']}; at most 8 shown)", "",
          "| removed | kept instead | cosine | removed text | kept text |", "|---|---|---:|---|---|"]
    for i in np.nonzero(dup_of >= 0)[0][:8]:
        j = int(dup_of[i])
        show = lambda m: cut(last_question(m) + " → " + m[-1]["content"])   # noqa: E731
        L.append(f"| {cut(cols['where'][i], 50)} | {cut(cols['where'][j], 50)} | {dup_cos[i]:.4f} | "
                 f"{show(texts[i]) if i in texts else ''} | {show(texts[j]) if j in texts else ''} |")
    sel = np.nonzero(status == "selected")[0]
    by_ifd = sel[np.argsort(ifd[sel], kind="stable")]
    L += ["", "## Selected examples at both ends of IFD", "", "| IFD | where | instruction → answer |",
          "|---:|---|---|"]
    for i in list(by_ifd[:4]) + list(by_ifd[-4:]):
        if i in texts:
            L.append(f"| {ifd[i]:.3f} | {cut(cols['where'][i], 50)} | "
                     f"{cut(last_question(texts[i]) + ' → ' + texts[i][-1]['content'])} |")
    if mapped:
        st = mapped["stats"]
        L += ["", "## Map", "", f"{st['points']} sampled examples (seed {args.seed}); a point keeps its place in both "
              "panels. Neighbourhood preservation = mean share of each point's 10 nearest neighbours in embedding "
              "space that stay among its 10 nearest on the map.", "",
              f"- PCA: explained variance {', '.join(f'{v:.4g}' for v in st['pca_explained'])}; "
              f"neighbourhood preservation {st['pca_knn_preservation']:.3f}", "", "![PCA map](plots/map_pca.svg)"]
        if "tsne_kl" in st:
            L += ["", f"- t-SNE: perplexity {args.perplexity:g}, {args.tsne_iters} iterations, KL(P||Q) "
                  f"{st['tsne_kl']:.3f}; neighbourhood preservation {st['tsne_knn_preservation']:.3f}", "",
                  "![t-SNE map](plots/map_tsne.svg)"]
    L += ["", "Each example's scores, cluster and status (selected, duplicate, ifd_filtered, below_quota) are in "
          "scores.jsonl; the subset in selected.jsonl.", ""]
    run_lab.atomic_write(os.path.join(args.out_dir, "report.md"), "\n".join(L))
    common.atomic_write_json(os.path.join(args.out_dir, "report.json"), summary)


def main(argv=None):
    args = get_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for the report
    return run(args)


if __name__ == "__main__":
    main()
