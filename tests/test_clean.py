"""Tests for clean.py. References: closed forms (checksums, Jaccard of Python sets), naive re-implementations
(repetition features, blacklist matching), a single-process or uninterrupted run, and real documents from
../shared/data (clean Chinese/English text, the noisy web sets with planted gambling spam)."""
import gzip
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import clean

REPO = Path(__file__).resolve().parents[1]
BLACKLIST = str(Path(__file__).parent / "fixtures_clean" / "blacklist.txt")


def args(*extra):
    return clean.get_args(["--input", "x", "--out", "y", *extra])


def jsonl(path, n=None):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for _, l in zip(range(n or 10**9), f)]


def fired(text, *extra, lang=None):
    """Normalise and route like the pipeline, then {rule: reason} for every rule that fires."""
    a = args(*extra)
    clean.setup(a)
    t, lg = clean.normalise(text, a, Counter())
    lg = lang or lg
    ids, lens, doc, _ = clean.shard_tokens([t])
    d = clean.Doc(t, lg, None, clean.repetition_batch(ids, lens, doc, 1)[0])
    rules = clean.COMMON_RULES + {"en": clean.EN_RULES, "zh": clean.ZH_RULES}.get(lg, [])
    return {r.__name__: why for r in rules for why in [r(d, a)] if why}


def run(tmp_path, name, rows, *extra, suffix=".jsonl"):
    src = tmp_path / f"{name}{suffix}"
    src.write_text("".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / f"{name}_out"
    return clean.main(["--input", str(src), "--out", str(out), "--workers", "1", *extra]), out


def rows_in(d):
    return [json.loads(l) for f in sorted(Path(d).glob("*.jsonl")) for l in f.read_text(encoding="utf-8").splitlines()]


EN_OK = ("The committee met on Tuesday to review the budget for the coming year. Members agreed that the new library "
         "should open in the spring, and that the old building will be kept as a museum for local history. The mayor said "
         "that the plan would cost less than expected, because the county has offered to share the cost of the roof. "
         "Several residents asked whether the parking lot would be expanded, and the committee promised to answer them "
         "at the next meeting, which will be held in March at the town hall.")
EN_OK2 = ("Heavy rain fell across the valley on Sunday night, and by morning the river had risen above the old stone bridge. "
          "Farmers moved their animals to higher ground while volunteers filled sandbags outside the school. The weather "
          "service expects the water to fall slowly over the next two days, but it warned drivers to avoid the low road "
          "near the mill until the council has checked that the bridge is safe to use again.")
ZH_OK = ("北京大学图书馆始建于一八九八年，是中国最早的现代新型图书馆之一。馆舍几经变迁，如今的总馆位于校园中心，"
         "藏书丰富，种类齐全。图书馆不仅为师生提供借阅服务，还承担着文献保存、学术交流和信息素养教育等多项任务。"
         "近年来，图书馆积极推进数字化建设，读者可以通过网络检索馆藏、预约座位和获取电子资源。")
LONG_WORDS = " ".join("".join(random.Random(i).choices("abcdefghijklmnop", k=14)) for i in range(80))
POSITIVE = {   # rule -> a document on which it must fire (lang forced where routing is not what is tested)
    "gopher_word_count": ("Short note about the plan, with the date.", "en"),
    "gopher_mean_word_length": ("the and of " + LONG_WORDS, "en"),
    "gopher_symbol_ratio": (EN_OK + " #news #town #budget #library #vote #mayor #roof #spring #museum #hall #march", "en"),
    "gopher_bullet_lines": ("\n".join(f"• the item number {w} is on the list" for w in "abcdefghijklmnopqrst"), "en"),
    "gopher_ellipsis_lines": (EN_OK + "\n" + "\n".join(f"read the full story about {w} ..." for w in "abcdefgh"), "en"),
    "gopher_alpha_words": (EN_OK + " " + " ".join(str(i * 7919) for i in range(60)), "en"),
    "gopher_stop_words": (" ".join(["Cats is a pet in a flat, it sleeps on a mat as it was warm."] * 8), "en"),
    "c4_lorem_ipsum": (EN_OK + " Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "en"),
    "fineweb_line_punct": ("\n".join(f"the {w} menu item for the page and the site" for w in "abcdefghijklmnop"), "en"),
    "fineweb_short_lines": (EN_OK + "\n" + "\n".join(["Home", "About us", "Contact", "News", "Shop", "Login", "Help", "Blog"]), "en"),
    "top_ngram": (EN_OK + " buy cheap shoes" * 40, "en"),
    "dup_ngram": (EN_OK + " " + EN_OK.replace(".", ";") + " " + EN_OK.replace(".", ","), "en"),
    "dup_lines": ("\n".join([EN_OK] + ["Click here to subscribe to the newsletter of the town."] * 6), "en"),
    "dup_paragraphs": ("\n\n".join([EN_OK] + ["Share this: the town of Millbrook, all rights reserved."] * 4), "en"),
    "lang_not_allowed": ("Retrouvez ici l'ensemble des actualités de l'association et les rendez-vous de la semaine.", None),
    "zh_length": ("短文本。", "zh"),
    "zh_han_share": (ZH_OK[:40] + "\nint main(void) { return printf(\"%d\\n\", 42); } // x86_64 gcc -O2", "zh"),
    "zh_short_lines": (ZH_OK + "\n" + "\n".join(["首页", "新闻", "产品", "关于我们", "联系", "登录", "注册", "帮助"]), "zh"),
    "zh_sentence_lines": ("\n".join(f"二零二三年度全国{w}行业发展报告发布会在北京隆重召开" for w in "金银铜铁锡铅锌镍钴"), "zh"),
    "zh_chapter_list": (ZH_OK + "\n" + "\n".join(f"第{n}章 风云再起" for n in "一二三四五六七八九十") + "\n第十一章 终局\n第十二章 后记", "zh"),
    "zh_table_page": ("销售数据\n" + "\n".join(f"{y}\t{y * 3}\t{y * 7}.5" for y in range(2010, 2022)), "zh"),
}
POSITIVE_ZH_REPEAT = {"top_ngram": "中国" * 60 + ZH_OK, "dup_ngram": ZH_OK * 3, "dup_lines": "\n".join([ZH_OK] + ["欢迎访问本站，点击这里订阅最新资讯。"] * 6)}


@pytest.mark.parametrize("rule", sorted(POSITIVE))
def test_rule_fires_on_its_positive_and_not_on_clean_text(rule):
    text, lang = POSITIVE[rule]
    assert rule in fired(text, lang=lang), fired(text, lang=lang)
    clean_doc = ZH_OK if rule.startswith("zh_") or lang == "zh" else EN_OK
    assert fired(clean_doc) == {}, "the clean reference documents pass every rule"


@pytest.mark.parametrize("rule", sorted(POSITIVE_ZH_REPEAT))
def test_repetition_rules_in_chinese(rule):
    assert rule in fired(POSITIVE_ZH_REPEAT[rule], lang="zh")


def test_blacklist_both_languages_threshold_and_word_boundaries():
    bl = ["--blacklist", BLACKLIST]
    assert "blacklist" in fired(ZH_OK + "澳门威尼斯人现金网，百家乐投注。", *bl)
    assert "blacklist" not in fired(ZH_OK + "百家乐投注。", *bl), "2 hits < the seed's threshold of 3"
    assert "blacklist" in fired(ZH_OK + "百家乐投注。", *bl, "--blacklist-threshold", "2")
    assert "blacklist" in fired(EN_OK + " Play casino poker online, casino bonus!", *bl)
    assert "blacklist" not in fired(EN_OK + " The casinos and pokers of xxxl size.", *bl), "whole words only"
    reason = fired(EN_OK + " casino poker porn", *bl)["blacklist"]
    assert "'gambling': 2" in reason and "'adult': 1" in reason


def test_trie_regex_matches_like_a_naive_longest_match_scan():
    rng = random.Random(0)
    words = sorted({"".join(rng.choices("abc赌场", k=rng.randint(1, 4))) for _ in range(40)})
    rx = re.compile(clean.trie_regex(words))
    for _ in range(200):
        s = "".join(rng.choices("abcd赌场", k=60))
        ref, i = [], 0
        while i < len(s):   # leftmost, then longest word at that position
            m = max((w for w in words if s.startswith(w, i)), key=len, default=None)
            ref, i = (ref + [(i, m)], i + len(m)) if m else (ref, i + 1)
        assert [(m.start(), m.group()) for m in rx.finditer(s)] == ref


def test_real_noisy_documents(shared_data):
    noisy = shared_data / "noisy"
    dirty = {r["text"][:12]: r["text"] for r in jsonl(noisy / "zh_quality_dirty_10.jsonl.gz")}
    code = next(t for t in dirty.values() if "chrdevbase" in t[:200])
    assert "zh_han_share" in fired(code, lang="zh")
    profile = next(t for t in dirty.values() if "刘进平" in t[:120])   # a profile page: name, title, counters
    assert "zh_short_lines" in fired(profile)
    assert sum(bool(fired(t)) for t in dirty.values()) == 5, "half of ChineseWebText's 'dirty' examples are rejected"
    cc = {r["id"]: r["text"] for r in jsonl(noisy / "en_multi_commoncrawl_2019_30_697.jsonl.gz")}
    assert "dup_ngram" in fired(cc["4jpmfv2mnbm5bunk6brkgnt2j66o7el3"])   # a wiki page diff: every line twice
    assert "gopher_alpha_words" in fired(cc["hkuwh2qpuu3i5tljsqtr7kfj5g56hml5"])   # a dokuwiki diff, mostly markup
    assert fired(cc["lftqpfbkupkeh2kojovfzm7y7s4dxglk"])["lang_not_allowed"] == "lang=latin"   # French
    assert fired(cc["blj5uzvcoa4iybpd5o6kom5nir6ngmoj"]) == {}, "an ordinary English page passes"
    clean10 = [r["text"] for r in jsonl(noisy / "zh_quality_clean_10.jsonl.gz")]
    assert sum(not fired(t) for t in clean10) >= 9, "ChineseWebText's 'clean' examples pass"


def test_clean_chinese_survives_and_planted_spam_is_caught(shared_data, tmp_path):
    wiki = jsonl(shared_data / "pretrain" / "zh_wiki_cmrc2018_wudao_format.jsonl.gz")
    spam = "澳门威尼斯人现金网，百家乐真人荷官在线投注，注册即送彩金。"
    rows = [{**r, "content": r["content"][:200] + spam + r["content"][200:]} if i % 10 == 0 else r for i, r in enumerate(wiki)]
    rep, out = run(tmp_path, "wiki", rows, "--text-fields", "title,content", "--blacklist", BLACKLIST)
    rejected = {r["id"]: r["rule"] for r in rows_in(out / "rejected") if "dup_of" not in r}
    planted = {r["id"] for i, r in enumerate(rows) if i % 10 == 0}
    assert all(rejected.get(i) == "blacklist" for i in planted), "every planted spam document is caught"
    others = {i for i, r in rejected.items() if r == "blacklist" and i not in planted}
    assert others == {"TRIAL_47", "DEV_1070"}, others   # the known false positives: articles about casinos (James Bond, One Piece)
    clean_ids = {r["id"] for r in wiki} - planted
    kept_share = len(clean_ids - set(rejected)) / len(clean_ids)
    print(f"Chinese Wikipedia passages kept by the Chinese rules: {kept_share:.1%}")   # measured: 98.8% (981 of 993)
    assert kept_share >= 0.97
    # gambling SEO pages in the Chinese Common Crawl sample (hand-labelled by their titles/brands)
    cc = jsonl(shared_data / "noisy" / "zh_commoncrawl_2021_43_100.jsonl.gz")
    gambling = {0, 16, 19, 23, 32, 34, 35, 64, 69, 70, 72, 99}
    rows = [{"id": str(i), "title": r["title"], "raw_content": r["raw_content"]} for i, r in enumerate(cc)]
    rep, out = run(tmp_path, "cc", rows, "--text-fields", "title,raw_content", "--blacklist", BLACKLIST)
    hit = {int(r["id"]) for r in rows_in(out / "rejected") if r.get("rule") == "blacklist"}
    assert hit <= gambling and len(hit) >= 8, hit   # measured: 8 of 12 at the seed's threshold of 3; no false positive


def check_id(d17):
    w = [2 ** (17 - i) % 11 for i in range(17)]   # ISO 7064 MOD 11-2 weights, computed instead of copied
    return d17 + "10X98765432"[sum(int(c) * k for c, k in zip(d17, w)) % 11]


def luhn_complete(prefix):
    for d in "0123456789":
        s = sum(int(c) if i % 2 == 0 else sum(divmod(2 * int(c), 10)) for i, c in enumerate(reversed(prefix + d)))
        if s % 10 == 0:
            return prefix + d


def test_pii_masks_pii_and_leaves_tables_of_numbers_alone():
    card, card2 = luhn_complete("622202020011223344"), luhn_complete("411111111111111")
    table = ("| 年份 | 人口 | 面积 | 编号 | 金额 | 比例 |\n"
             "| 2019 | 1,234,567 | 3.14159265358979 | 20190101 | 100,000.00 | 15.5% |\n"
             f"| 2020 | 13,812,345,678 | 0.13812345678 | 123456789012345678 | {card2} | 98 99 100 101 |\n"
             f"| 2021 | 138123456789012 | 2021-11-22 | {check_id('11010119900307451')}0 | 4000 5000 6000 7000 | 1.2.3 |\n"
             "2019 2020 2021 2022 2023 102 103 104 105 12345678901 0.1.2.3.4.5 10.5-12.5 SKU-13812345678")
    counts = Counter()
    assert clean.mask_pii(table, counts) == table and not counts
    pid = check_id("11010119900307451")
    text = (f"邮箱 zhang.san@example.com，电话13812345678或+86 138 1234 5678，座机010-12345678，身份证{pid}，"
            f"银行卡号：{card[:4]} {card[4:8]} {card[8:12]} {card[12:16]} {card[16:]}，IP 192.168.1.20，"
            f"官网 https://example.com/a?b=1。Call (661) 845-1234 or 213-484-0480, card {card2}.")
    masked = clean.mask_pii(text, counts)
    for secret in ("zhang.san", "13812345678", "138 1234", "12345678，", pid, card[:4] + " ", "192.168", "example.com/a", "845-1234", "484-0480", card2):
        assert secret not in masked, (secret, masked)
    assert counts == {"EMAIL": 1, "PHONE": 5, "ID_CN": 1, "CARD": 2, "IP": 1, "URL": 1}, counts
    assert "身份证<ID_CN>，" in masked and "银行卡号：<CARD>，" in masked and "电话<PHONE>或<PHONE>" in masked


def test_normalisation_rules():
    a, ch = args(), Counter()
    zh, lang = clean.normalise("<p>北京　欢迎你，ＡＢＣ１２３！！！！！好……</p>\u200b中 文&amp;字", a, ch)
    assert (zh, lang) == ("北京欢迎你，ABC123！好……中文&字", "zh"), zh   # Chinese punctuation and … stay full width; no space between Han
    en, lang = clean.normalise("The cat，the dog！and the bird．．．  \tare　here......\r\n\n\n\n    indented code", a, ch)
    assert (en, lang) == ("The cat,the dog!and the bird... are here...\n\n    indented code", "en"), en
    assert ch["html"] > 0 and ch["full_width"] >= 6 and ch["repeated_punct"] > 0 and ch["control_chars"] == 1
    assert clean.normalise("ﬁne ①", a, Counter())[0] == "fine 1", "NFKC"
    c4, _ = clean.normalise(EN_OK + "\nThis site uses cookies to improve the service.\nPlease enable JavaScript.", a, ch)
    assert c4 == EN_OK and ch["c4_lines"] > 0


def naive_repetition(toks, lens):
    out, total = {}, sum(lens)
    for n in range(2, 11):
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        c = Counter(grams)
        if n <= 4:
            chars = lambda g: sum(lens[grams.index(g): grams.index(g) + n])
            g, k = max(c.items(), key=lambda kv: (kv[1], chars(kv[0]))) if c else (None, 0)   # most frequent, then longest
            out[n] = k * chars(g) / total if k > 1 else 0.0
        else:
            cov = [False] * len(toks)
            for i, g in enumerate(grams):
                if c[g] > 1:
                    cov[i:i + n] = [True] * n
            out[n] = sum(l for l, v in zip(lens, cov) if v) / total
    return out


def test_repetition_batch_matches_a_naive_implementation():
    rng = random.Random(1)
    texts = [" ".join(rng.choices(["to", "be", "or", "not", "word", "x", "chart"], k=rng.randint(1, 80))) for _ in range(30)]
    texts += ["中国人民中国人民" * 5 + "你好", "", "一"]
    ids, lens, doc, offs = clean.shard_tokens(texts)
    got = clean.repetition_batch(ids, lens, doc, len(texts))
    for k, t in enumerate(texts):
        toks = clean.TOKEN_RE.findall(t.lower())
        if toks:
            ref = naive_repetition(toks, [len(x) for x in toks])
            assert np.allclose([got[k, n] for n in range(2, 11)], [ref[n] for n in range(2, 11)]), (t, got[k], ref)


def tokens(t):
    return re.findall(r"[\u4e00-\u9fff]|[^\W_\u4e00-\u9fff]+", t.lower())


def jaccard(x, y):
    a, b = ({tuple(tk[i:i + 5]) for i in range(len(tk) - 4)} for tk in (tokens(x), tokens(y)))
    return len(a & b) / len(a | b)


def test_minhash_estimates_jaccard():
    a = args()
    A, B = clean.minhash_params(a)
    base = ZH_OK * 2 + EN_OK
    for frac in (0.02, 0.1, 0.3):
        rng = random.Random(frac)
        var = "".join(c if rng.random() > frac / 5 else "字" for c in base)
        ids, _, _, offs = clean.shard_tokens([base, var])
        sig = clean.minhash_batch(ids, offs, [0, 1], 5, A, B)
        assert abs((sig[0] == sig[1]).mean() - jaccard(base, var)) < 0.12


def mutate(text, rate, rng, zh):
    if zh:
        return "".join(rng.choice("天地玄黄宇宙洪荒日月盈昃") if "\u4e00" <= c <= "\u9fff" and rng.random() < rate else c for c in text)
    return " ".join(rng.choice(["river", "stone", "apple", "green"]) if rng.random() < rate else w for w in text.split(" "))


def test_dedup_exact_and_near_duplicates_with_known_jaccard(shared_data, tmp_path):
    en = [r["text"] for r in jsonl(shared_data / "pretrain" / "en_c4_300.jsonl.gz") if 120 < len(r["text"].split()) < 700][:60]
    zh = [r["title"] + "\n" + r["content"] for r in jsonl(shared_data / "pretrain" / "zh_wiki_cmrc2018_wudao_format.jsonl.gz") if len(r["content"]) > 300][:60]
    rng, rows, pairs, copies = random.Random(0), [], [], []
    for i, t in enumerate(en + zh):
        rows.append({"id": f"b{i}", "text": t})
        if i % 6 == 5:   # an exact copy up to case and whitespace
            rows.append({"id": f"c{i}", "text": t.upper().replace(" ", "  ").replace("\n", " \n")})
            copies.append((f"c{i}", f"b{i}"))
        else:
            var = mutate(t, [0.002, 0.006, 0.012, 0.02, 0.05, 0.1, 0.0035][i % 7], rng, i >= len(en))
            rows.append({"id": f"v{i}", "text": var})
            pairs.append((f"v{i}", f"b{i}", jaccard(var, t)))
    rng.shuffle(rows[len(rows) // 2:])   # variants may come before or after their base in the second half
    rep, out = run(tmp_path, "dd", rows, "--chunk-docs", "50")
    filtered = {r["id"] for r in rows_in(out / "rejected") if "dup_of" not in r}
    dups = {r["id"]: (r["rule"], r["dup_of"]) for r in rows_in(out / "rejected") if "dup_of" in r}
    text = {r["id"]: r["text"] for r in rows}
    assert all(dups.get(c) == ("exact_dup", b) or dups.get(b) == ("exact_dup", c) for c, b in copies if b not in filtered)
    high = [(v, b) for v, b, j in pairs if j >= 0.85 and v not in filtered and b not in filtered]
    found = sum(dups.get(v, (0, 0))[1] == b or dups.get(b, (0, 0))[1] == v for v, b in high)
    assert len(high) >= 40 and found / len(high) >= 0.95, (found, len(high))
    merged = [(i, d) for i, (rule, d) in dups.items() if rule == "near_dup"]
    assert merged and all(jaccard(text[i], text[d]) >= 0.7 for i, d in merged), "no merged pair below Jaccard 0.7"
    assert not [v for v, b, j in pairs if j < 0.7 and dups.get(v, (0, 0))[1] == b]
    assert rep["dedup"]["merged_examples"][0]["jaccard"] >= 0.8 and rep["dedup"]["near_cluster_sizes"][2] >= 1
    assert len(rows_in(out / "kept")) == rep["total"]["docs_kept"] == len(rows) - len(filtered) - len(dups)


def test_inputs_directory_gzip_txt_json_array_pile_and_wudao(tmp_path):
    d = tmp_path / "raw"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "pile.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": EN_OK, "meta": {"pile_set_name": "Wikipedia (en)"}}) + "\n")
    (d / "sub" / "book.txt").write_text(f"{EN_OK2}\n\n\n{EN_OK}\n", encoding="utf-8")
    (d / "wudao.json").write_text(json.dumps([{"id": "w1", "title": "图书馆", "content": ZH_OK, "dataType": "百科"}], ensure_ascii=False), encoding="utf-8")
    (d / "notes.md").write_text("ignored: not a known extension")
    out = tmp_path / "out"
    rep = clean.main(["--input", str(d), "--out", str(out), "--workers", "1", "--text-fields", "title,content,text",
                      "--source-field", "meta.pile_set_name", "--keep-meta", "--dedup"])
    rows = {r["id"]: r for r in rows_in(out / "kept")} | {r["id"]: r for r in rows_in(out / "rejected")}
    assert rows["w1"]["text"] == "图书馆\n" + ZH_OK and rows["w1"]["meta"]["dataType"] == "百科" and rows["w1"]["source"] == "wudao.json"
    pile = next(r for r in rows.values() if r["source"] == "Wikipedia (en)")
    assert pile["text"] == EN_OK and pile["meta"]["meta"]["pile_set_name"] == "Wikipedia (en)"
    book = f"{d / 'sub' / 'book.txt'}"
    assert rows[f"{book}:1"]["text"] == EN_OK2 and rows[f"{book}:4"]["text"] == EN_OK, "paragraphs, with their first line"
    assert rows[f"{book}:4"].get("rule") == "exact_dup" and rows[f"{book}:4"]["dup_of"] == pile["id"]
    assert rep["total"]["docs_in"] == 4 and set(rep["funnel"]) == {"Wikipedia (en)\ten", "book.txt\ten", "wudao.json\tzh"}


def test_malformed_lines_are_counted_with_file_and_line(tmp_path):
    lines = [json.dumps({"text": EN_OK}) + "\n", "{not json\n", json.dumps({"text": ZH_OK}) + "\n", "[1, 2]\n", "\n", json.dumps({"id": "z", "text": EN_OK2}) + "\n"]
    rep, out = run(tmp_path, "bad", lines)
    src = tmp_path / "bad.jsonl"
    assert rep["malformed"]["count"] == 2 and [m.split(": ")[0] for m in rep["malformed"]["first"]] == [f"{src}:2", f"{src}:4"]
    assert sorted(r["id"] for r in rows_in(out / "kept")) == [f"{src}:1", f"{src}:3", "z"]


def test_ccnet_line_dedup_removes_shared_boilerplate(tmp_path):
    footer, menu = "Copyright 2019 Millbrook Gazette. All rights reserved.", "首页 | 新闻中心 | 联系我们 | 网站地图"
    rows = [{"id": "a", "text": EN_OK + "\n" + footer}, {"id": "b", "text": EN_OK2 + "\n" + footer},
            {"id": "c", "text": menu + "\n" + ZH_OK}, {"id": "d", "text": menu + "\n" + ZH_OK[::-1] + "。"}]
    rep, out = run(tmp_path, "ld", rows, "--line-dedup", "10")
    kept = {r["id"]: r["text"] for r in rows_in(out / "kept")}
    assert kept["a"] == EN_OK and kept["b"] == EN_OK2 and kept["c"] == ZH_OK
    assert rep["edits_chars_changed"]["line_dedup"] == 2 * (len(footer) + 1) + 2 * (len(menu) + 1)   # lines and their newlines


def test_sft_mode(tmp_path):
    ok = [{"messages": [{"role": "user", "content": "写一首关于春天的短诗。"}, {"role": "assistant", "content": "春风拂面，花开满园。"}]},
          {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
          {"conversations": [{"from": "human", "value": "Hi, mail me at a.b@example.com"}, {"from": "gpt", "value": "Hello! How can I help?"}]},
          {"data": ["1+1=?", "2", "And 2+2?", "4"]}]
    bad = {"empty": {"prompt": "Say something.", "response": "  "}, "trunc": {"prompt": "Explain loops.", "response": "A loop repeats code, for example:"},
           "fence": {"prompt": "Show code.", "response": "```python\nprint(1)"}, "roles": {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]},
           "long": {"prompt": "Write a lot.", "response": "word " * 5000}, "none": {"foo": "bar"}}
    rows = [{"id": f"ok{i}", **r} for i, r in enumerate(ok)] + [{"id": k, **r} for k, r in bad.items()]
    rows += [{"id": "copy", **ok[1]}, {"id": "sameprompt", "instruction": "Name a primary colour.", "output": "Blue."}]
    rep, out = run(tmp_path, "sft", rows, "--mode", "sft")
    rules = {r["id"]: r["rule"] for r in rows_in(out / "rejected")}
    assert rules == {"empty": "sft_empty_answer", "trunc": "sft_truncated", "fence": "sft_truncated", "roles": "sft_format",
                     "long": "sft_length", "none": "sft_format", "copy": "exact_dup", "sameprompt": "prompt_dup"}
    kept = {r["id"]: r["messages"] for r in rows_in(out / "kept")}
    assert set(kept) == {"ok0", "ok1", "ok2", "ok3"} and kept["ok2"][0] == {"role": "user", "content": "Hi, mail me at <EMAIL>"}
    assert [m["role"] for m in kept["ok3"]] == ["user", "assistant", "user", "assistant"]


def test_contamination_check(shared_data, tmp_path):
    wiki = jsonl(shared_data / "pretrain" / "zh_wiki_cmrc2018_wudao_format.jsonl.gz", 40)
    leak = wiki[7]["content"][50:90]
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [
        {"question": f"阅读：{leak}。问题：文中说了什么？"}, {"question": "What is the capital of a country that does not exist at all today?"},
        {"question": "太短"}]), encoding="utf-8")
    rep, out = run(tmp_path, "cont", wiki, "--text-fields", "title,content", "--eval-files", str(evals))
    c = rep["contamination"]
    assert (c["eval_items"], c["too_short"], c["contaminated"]) == (3, 1, 1) and c["items"][0]["item"] == "eval.jsonl:1"
    assert c["items"][0]["example_doc"] == wiki[7]["id"] and 0 < c["items"][0]["overlap"] < 1
    alone = clean.main(["--contam-only", "--input", str(out / "kept"), "--eval-files", str(evals), "--out", str(tmp_path / "c2"), "--workers", "1"])
    assert alone == c


def test_report_is_consistent_and_counts_tokens(shared_data, tmp_path):
    rows = jsonl(shared_data / "noisy" / "zh_commoncrawl_2021_43_100.jsonl.gz") + jsonl(shared_data / "pretrain" / "en_c4_300.jsonl.gz", 100)
    rep, out = run(tmp_path, "rep", rows, "--text-fields", "title,raw_content,text", "--tokenizer",
                   str(shared_data / "tokenizers" / "llama2_tokenizer.model"), "--chunk-docs", "60")
    t, rules = rep["total"], rep["rules"].values()
    assert sum(r["rejected_first"] for r in rules) == t["docs_in"] - t["docs_after_filters"]
    assert all(r["would_reject_alone"] >= r["rejected_first"] >= r["only_rule"] and len(r["examples"]) <= 5 for r in rules)
    kept = rows_in(out / "kept")
    assert t["docs_kept"] == len(kept) and t["chars_kept"] == sum(len(r["text"]) for r in kept)
    clean.setup(args("--tokenizer", str(shared_data / "tokenizers" / "llama2_tokenizer.model")))
    assert t["tokens_kept"] == sum(map(clean.ntok, (r["text"] for r in kept))) > 0 and t["tokens_in"] > t["tokens_kept"]
    assert {"normalise", "pii", "tokenize", "repetition", "filters", "minhash"} <= set(rep["time_per_step"])
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Funnel per source and language" in md and "## Examples" in md and "gopher_word_count" in md
    clean.setup(args())


def test_two_workers_give_the_single_process_result(shared_data, tmp_path):
    rows = jsonl(shared_data / "noisy" / "zh_commoncrawl_2021_43_100.jsonl.gz") + jsonl(shared_data / "pretrain" / "en_c4_300.jsonl.gz", 120)
    rows += rows[:30]   # exact duplicates across shards
    one, out1 = run(tmp_path, "w", rows, "--text-fields", "title,raw_content,text", "--chunk-docs", "40")
    out2 = tmp_path / "w2_out"
    two = clean.main(["--input", str(tmp_path / "w.jsonl"), "--out", str(out2), "--text-fields", "title,raw_content,text", "--chunk-docs", "40", "--workers", "2"])
    assert rows_in(out1 / "kept") == rows_in(out2 / "kept") and rows_in(out1 / "rejected") == rows_in(out2 / "rejected")
    assert one["funnel"] == two["funnel"] and one["rules"] == two["rules"] and one["dedup"] == two["dedup"]


def test_killed_run_resumes_without_redoing_or_duplicating(shared_data, tmp_path):
    src = str(shared_data / "pretrain" / "zh_wiki_cmrc2018_wudao_format.jsonl.gz")
    common = ["--input", src, "--text-fields", "title,content", "--chunk-docs", "30", "--workers", "1"]
    ref = clean.main(common + ["--out", str(tmp_path / "ref")])
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "clean.py"), *common, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((out / "work").glob("*.stats.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "work").glob("*.stats.json")}
    assert 3 <= len(done) < ref["shards"] and not (out / "report.json").exists(), "killed mid-run"
    rep = clean.main(common + ["--out", str(out)])
    assert rep["shards_resumed"] == len(done)
    assert all((out / "work" / n).stat().st_mtime_ns == m for n, m in done.items()), "finished shards were not redone"
    assert rows_in(out / "kept") == rows_in(tmp_path / "ref" / "kept") and rep["total"] == ref["total"]
    ids = [r["id"] for r in rows_in(out / "kept")]
    assert len(ids) == len(set(ids)) and not list(out.glob("*/*.tmp*"))
    with pytest.raises(SystemExit, match="other settings"):
        clean.main(common + ["--out", str(out), "--words", "10,1000"])
