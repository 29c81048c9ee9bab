"""data/sft_select.py: IFD against a hand computation, k-means recovering separable clusters, SemDeDup
against a brute-force reference, quotas by hand, PCA against numpy, t-SNE's perplexity calibration and
cluster separation, and one small end-to-end run (determinism for a seed, malformed lines with file:line,
planted near-copies removed)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import reward
from data import sft_select as select
from model import Llama, LlamaConfig

CONVS = [
    [{"role": "user", "content": "Where does Alice live?"}, {"role": "assistant", "content": "Alice lives in Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "她养了什么宠物？"},
     {"role": "assistant", "content": "她养了一只鹦鹉。"}],
    [{"role": "user", "content": "Count: " + " ".join(str(i) for i in range(30))},
     {"role": "assistant", "content": "That is " + " and ".join(str(i) for i in range(25)) + "."}],
]


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    return model.eval()


def hand_answer_loss(model, seq, n):
    """Mean -log p of the last n tokens of seq, from one unpadded forward, written out."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq]))
    logp = torch.log_softmax(logits[0].double(), -1)
    T = len(seq)
    return -sum(float(logp[t - 1, seq[t]]) for t in range(T - n, T)) / n


def test_ifd_matches_a_hand_computation(tiny, tok, one_thread):
    scores, emb = select.ifd_scores(tiny, tok, CONVS, max_len=256, embed_text="raw")   # one padded batch
    for i, msgs in enumerate(CONVS):
        prompt = tok.render_prompt(msgs[:-1])
        full, _ = tok.render_conversation(msgs)
        answer = full[len(prompt):]                                        # content + <|end|>
        alone = [tok.bos_id] + tok.header_ids["assistant"] + answer
        cond_l, alone_l = hand_answer_loss(tiny, full, len(answer)), hand_answer_loss(tiny, alone, len(answer))
        assert scores["loss_cond"][i] == pytest.approx(cond_l, abs=1e-5)
        assert scores["loss_alone"][i] == pytest.approx(alone_l, abs=1e-5)
        assert scores["ifd"][i] == pytest.approx(cond_l / alone_l, abs=1e-5)
        with torch.no_grad():
            h = tiny.hidden_states(torch.tensor([full]))[0].mean(0)
        assert torch.allclose(emb[i], h / h.norm(), atol=1e-5)
    # A chosen block's output: the same model cut after that block, without the final norm.
    cut = copy.deepcopy(tiny)
    cut.layers, cut.norm = cut.layers[:1], nn.Identity()
    _, emb0 = select.ifd_scores(tiny, tok, CONVS, max_len=256, layer=0, embed_text="raw")
    with torch.no_grad():
        h = cut.hidden_states(torch.tensor([tok.render_conversation(CONVS[1])[0]]))[0].mean(0)
    assert torch.allclose(emb0[1], h / h.norm(), atol=1e-5)


def test_ifd_under_bf16_autocast_stays_close_to_float32(tiny, tok, one_thread):
    """The mixed-precision path a GPU takes (--dtype auto -> bf16), run on the CPU."""
    ref, e_ref = select.ifd_scores(tiny, tok, CONVS, max_len=256)
    bf, e_bf = select.ifd_scores(tiny, tok, CONVS, max_len=256, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf["ifd"] == pytest.approx(ref["ifd"], abs=2e-2) and e_bf.dtype == torch.float32
    assert torch.allclose(e_bf, e_ref, atol=2e-2)


def test_ifd_pair_truncation_scores_the_same_answer_tokens(tok):
    msgs = CONVS[2]
    cond, alone, n, truncated = select.ifd_pair(tok, msgs, max_len=40)
    prompt = tok.render_prompt(msgs[:-1])
    answer = tok.render_conversation(msgs)[0][len(prompt):]
    assert truncated and len(cond) <= 40 and cond[0] == tok.bos_id
    assert cond[-n:] == alone[-n:] == answer[:n] and n >= 20   # the answer keeps at least half the context
    assert cond[1:-n] == prompt[len(prompt) - (len(cond) - n - 1):]  # the prompt's END is kept
    assert select.ifd_pair(tok, msgs, max_len=256)[3] is False


def test_canonical_text_makes_whitespace_and_punctuation_variants_one_text():
    assert select.canonical("  Alice  lives\tin Paris ,ok \n\n") == "Alice lives in Paris ,ok"
    assert select.canonical("她养了一只鹦鹉，对吗？。") == select.canonical("她养了一只鹦鹉,对吗?.")
    assert select.canonical("line one\nline two") == "line one\nline two"   # line structure kept


def test_canonical_embedding_reads_the_same_window_as_the_raw_canonical_text(tiny, tok, one_thread):
    """A variant with doubled spaces embeds exactly like its canonical text, also when both are cut (the
    long shared passage is cut from the left, so two questions about it do not look the same)."""
    passage = "The river flows past the old mill and the long bridge. " * 6
    messy = [{"role": "user", "content": passage + "Question:  what  flows past the mill?"},
             {"role": "assistant", "content": "The  river."}]
    clean = [{"role": m["role"], "content": select.canonical(m["content"])} for m in messy]
    other = [{"role": "user", "content": select.canonical(passage) + " Question: what is long?"},
             {"role": "assistant", "content": "The bridge."}]
    _, e_messy = select.ifd_scores(tiny, tok, [messy], max_len=40, embed_text="canonical")
    _, e_clean = select.ifd_scores(tiny, tok, [clean, other], max_len=40, embed_text="raw")
    assert torch.allclose(e_messy[0], e_clean[0], atol=1e-5)
    assert float(e_clean[0] @ e_clean[1]) < 0.999


def blobs(n_per, k, dim, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    X = centres[labels] + spread * torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(len(X), generator=g)
    return X[perm], labels[perm]


def same_partition(a, b):
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def test_kmeans_recovers_separable_clusters_exactly(tmp_path):
    X, labels = blobs(30, 6, 16, seed=1)
    C, assign, hist = select.kmeans(X, 6, seed=0, chunk=7)
    assert same_partition(assign, labels)
    # Lloyd's fixed point: each centroid is the mean of its points, and the inertia is what it says.
    for c in range(6):
        assert torch.allclose(C[c], X[assign == c].mean(0), atol=1e-5)
    assert hist[-1]["changed"] == 0
    assert hist[-1]["inertia"] == pytest.approx(float(((X - C[assign]) ** 2).sum()), rel=1e-5)
    # The same from a memory-mapped file in other chunk sizes, and the same again for the same seed.
    path = tmp_path / "x.f32"
    X.numpy().astype(np.float32).tofile(path)
    M = np.memmap(path, dtype=np.float32, mode="r", shape=tuple(X.shape))
    C2, assign2, _ = select.kmeans(M, 6, seed=0, chunk=64)
    assert torch.equal(assign, assign2) and torch.allclose(C, C2, atol=1e-5)
    assert torch.equal(select.kmeans(X, 6, seed=0, chunk=7)[1], assign)


def brute_semdedup(X, assign, key, thr):
    """The rule as a double loop: a member goes when a better-ranked member of its cluster is closer than thr."""
    dup = [-1] * len(X)
    for c in set(assign.tolist()):
        members = sorted((i for i in range(len(X)) if assign[i] == c), key=lambda i: (-key[i], i))
        for r, i in enumerate(members):
            sims = [(float(X[i] @ X[j]), j) for j in members[:r]]
            if sims and max(sims)[0] > thr:
                dup[i] = max(sims, key=lambda s: s[0])[1]
    return dup


def test_semdedup_removes_planted_near_copies_and_keeps_the_better_one():
    g = torch.Generator().manual_seed(0)
    base = nn.functional.normalize(torch.randn(40, 32, generator=g), dim=-1)   # nearly orthogonal
    copies = nn.functional.normalize(base[:10] + 0.01 * torch.randn(10, 32, generator=g), dim=-1)
    X = torch.cat([base, copies])
    quality = torch.rand(50, generator=g).numpy()
    assign = torch.tensor([i % 3 for i in range(40)] + [i % 3 for i in range(10)])   # a copy joins its original
    dup_of, cos = select.semdedup(X, assign, quality, threshold=0.95, chunk_elems=40)   # several row blocks
    for i in range(10):
        better, worse = (i, 40 + i) if quality[i] >= quality[40 + i] else (40 + i, i)
        assert dup_of[worse] == better and dup_of[better] == -1
        assert float(cos[worse]) == pytest.approx(float(X[worse] @ X[better]), abs=1e-5)
    assert int((dup_of >= 0).sum()) == 10
    # A random set with a loose threshold, against the double loop.
    Y = nn.functional.normalize(torch.randn(60, 4, generator=g), dim=-1)
    a = torch.randint(0, 3, (60,), generator=g)
    key = torch.rand(60, generator=g).numpy()
    assert select.semdedup(Y, a, key, 0.8, chunk_elems=50)[0].tolist() == brute_semdedup(Y, a, key, 0.8)


def test_quotas_and_selection_by_hand():
    # proportional: 12 * [1, 10, 10] / 21 = [0.57, 5.71, 5.71] -> floors [0, 5, 5], the 2 left to the largest remainders
    assert select.quotas([1, 10, 10], 12, "proportional") == [0, 6, 6]
    # equal: shares of 4 -> [1, 4, 4], 3 left over 2 open clusters -> [1, 5, 5], the last one to cluster 1
    assert select.quotas([1, 10, 10], 12, "equal") == [1, 6, 5]
    assert select.quotas([3, 2], 99, "equal") == [3, 2] and sum(select.quotas([7, 0, 5], 9, "proportional")) == 9
    score = np.array([5, 1, 4, 2, 3, 9, 0.5])
    assign = np.array([0, 0, 0, 1, 1, 1, 1])
    eligible = np.array([True, True, True, True, True, False, True])   # the 9 is a duplicate
    selected, table = select.select(score, assign, eligible, 4, "proportional")
    assert selected.tolist() == [True, False, True, True, True, False, False]
    assert [r["quota"] for r in table] == [2, 2]


def test_pca_matches_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1]) + 7
    Y, var = select.pca(torch.tensor(X), 2)
    w, V = np.linalg.eigh(np.cov(X, rowvar=False))
    top = V[:, ::-1][:, :2]
    assert np.allclose(var.numpy(), w[::-1][:2], rtol=1e-5)
    ref = (X - X.mean(0)) @ top
    assert np.allclose(np.abs(Y.numpy()), np.abs(ref), atol=1e-4)


def test_tsne_affinities_reach_the_perplexity():
    X = torch.randn(60, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 1, 1, 0.1, 0.1])
    P, H = select.tsne_affinities(torch.cdist(X, X).pow(2), perplexity=10)
    assert torch.allclose(H, torch.full_like(H, math.log(10)), atol=1e-4)
    assert torch.allclose(P.sum(1), torch.ones(60, dtype=P.dtype)) and float(P.diagonal().abs().max()) == 0


def test_maps_keep_separated_clusters_separated():
    X, labels = blobs(25, 4, 20, seed=2, spread=0.3)
    # The preservation score itself: 1 for an exact 2-D embedding, about k/(n-1) for a random picture.
    flat = torch.cat([torch.randn(100, 2), torch.zeros(100, 18)], 1)
    assert select.neighbourhood_preservation(flat, flat[:, :2], 10) == 1.0
    assert select.neighbourhood_preservation(X, torch.randn(100, 2), 10) < 0.25
    Y_tsne, kl = select.tsne(X, perplexity=15, iters=300, seed=0)
    Y_pca, _ = select.pca(X, 2)
    for Y in (Y_tsne, Y_pca):
        D = torch.cdist(Y, Y)
        D.fill_diagonal_(math.inf)
        nearest = D.topk(5, largest=False).indices
        assert bool((labels[nearest] == labels[:, None]).all())          # every 5-NN on the map is from its cluster
    assert select.neighbourhood_preservation(X, Y_tsne, 10) > 0.4   # random: about 10/99
    assert kl < 1.0 and torch.equal(select.tsne(X, perplexity=15, iters=300, seed=0)[0], Y_tsne)


def test_reward_quality_equals_reward_scorer(tiny, tok, one_thread):
    rm = reward.RewardModel.from_llama(copy.deepcopy(tiny)).eval()
    nn.init.normal_(rm.head.weight, std=0.5)
    ours = select.reward_quality(rm, tok, CONVS, batch_size=2, ctx=torch.autocast("cpu", enabled=False))
    ref = reward.reward_scorer(rm, tok, "cpu", torch.autocast("cpu", enabled=False))([c[:-1] for c in CONVS],
                                                                                     [c[-1]["content"] for c in CONVS])
    assert ours == pytest.approx(ref, abs=1e-5)


def write_set(path, with_bad_lines=True):
    rows = []
    for i in range(24):
        q = f"Question {i}: what is {i} plus {i * 3}?" if i % 2 else f"第{i}题：{i}加{i * 2}等于多少？"
        rows.append(json.dumps({"instruction": q, "input": "", "output": f"It is {i + i * (3 if i % 2 else 2)}."},
                               ensure_ascii=False))
    near_copy = {"instruction": "  Question 3:  what is 3 plus 9? ", "output": "It is  12.\n"}
    rows.insert(5, json.dumps(near_copy))
    if with_bad_lines:
        rows.insert(9, "{not json")
        rows.insert(12, json.dumps({"instruction": "no output field"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_end_to_end_is_deterministic_reports_bad_lines_and_drops_the_near_copy(tiny, tok, tmp_path, one_thread):
    common.save_checkpoint(str(tmp_path / "m"), "final", tiny, step=0, config={}, tokenizer=tok)
    data = tmp_path / "set.jsonl"
    write_set(data)
    outs = []
    for run in ("a", "b"):
        argv = ["--data", str(data), "--model", str(tmp_path / "m"), "--out_dir", str(tmp_path / run), "--k", "3",
                "--map_points", "20", "--tsne_iters", "50", "--seed", "1", "--max_ifd", "0"]
        summary = select.main(argv)
        outs.append([(tmp_path / run / name).read_text(encoding="utf-8")
                     for name in ("scores.jsonl", "selected.jsonl")])
    assert outs[0] == outs[1]                                       # same seed, same bytes
    rows = [json.loads(line) for line in outs[0][0].splitlines()]
    assert summary["n"] == 25 and summary["selected"] == 12 == len(outs[0][1].splitlines())
    assert summary["read"]["malformed"] == 1 and summary["read"]["invalid"] == 1
    report = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert f"{data}:10: malformed JSON" in report and f"{data}:13:" in report
    copy_row = next(r for r in rows if r["where"] == f"{data}:6")
    orig_row = next(r for r in rows if r["where"] == f"{data}:4")   # "Question 3", the original
    pair = {copy_row["status"], orig_row["status"]}
    assert "duplicate" in pair and pair != {"duplicate"}
    dup, kept = (copy_row, orig_row) if copy_row["status"] == "duplicate" else (orig_row, copy_row)
    assert dup["dup_of"] == kept["i"] and kept["score"] >= dup["score"]   # the better-scored one stays
    assert (tmp_path / "a" / "report.json").is_file() and (tmp_path / "a" / "plots" / "ifd_hist.svg").is_file()
    # The maps: every sampled point once in "before", the selected ones again in "after".
    mapped = [json.loads(line) for line in (tmp_path / "a" / "map.jsonl").read_text().splitlines()]
    assert len(mapped) == 20 and all(len(m["tsne"]) == len(m["pca"]) == 2 for m in mapped)
    for name in ("map_tsne.svg", "map_pca.svg"):
        svg = (tmp_path / "a" / "plots" / name).read_text()
        assert svg.count("<circle") == 20 + sum(m["selected"] for m in mapped)


def test_a_huggingface_directory_scores_like_our_checkpoint(tiny, tok, tmp_path, one_thread):
    common.save_checkpoint(str(tmp_path / "m"), "final", tiny, step=0, config={}, tokenizer=tok)
    tiny.save_hf(str(tmp_path / "hf"), bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save_hf(str(tmp_path / "hf"))
    data = tmp_path / "set.jsonl"
    write_set(data, with_bad_lines=False)
    rows = {}
    for name in ("m", "hf"):
        select.main(["--data", str(data), "--model", str(tmp_path / name), "--out_dir", str(tmp_path / f"out_{name}"),
                     "--k", "2", "--map", "none"])
        rows[name] = [json.loads(line) for line in (tmp_path / f"out_{name}" / "scores.jsonl").read_text().splitlines()]
    for a, b in zip(rows["m"], rows["hf"]):
        assert a["ifd"] == pytest.approx(b["ifd"], abs=1e-5)
        assert a["loss_cond"] == pytest.approx(b["loss_cond"], abs=1e-5)


def test_bad_flags_and_files_fail_with_one_line(tmp_path, tiny, tok):
    with pytest.raises(SystemExit, match="--weights"):
        select.get_args(["--data", "x", "--model", "m", "--out_dir", "o", "--weights", "ifd=1,speed=2"])
    (tmp_path / "bad.jsonl").write_text("{oops\n[1]\n", encoding="utf-8")
    common.save_checkpoint(str(tmp_path / "m"), "final", tiny, step=0, config={}, tokenizer=tok)
    with pytest.raises(SystemExit, match="every one of its 2 lines failed"):
        select.main(["--data", str(tmp_path / "bad.jsonl"), "--model", str(tmp_path / "m"),
                     "--out_dir", str(tmp_path / "o")])
