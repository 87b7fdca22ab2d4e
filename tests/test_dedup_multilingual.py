"""Near-duplicates across scripts: planted sets in English prose, Python code, Chinese and mixed
Chinese/English markdown, each with exact copies, ~5% character edits and distinct documents.

The builders here are also what `benchmarks/data_throughput.py --curve` sweeps to measure the
precision/recall curve in docs/data.md, so the defaults are tested on the sets they were
chosen on (and on other seeds).
"""

import functools
import importlib.util
import pathlib
import re

import numpy as np
import pytest

from lmx.data import dedup

# Everyday Chinese prose, one sentence a line (written for these tests). Documents are drawn
# from its ~170 clauses, so two distinct documents share a few clauses, as real text shares
# stock phrases.
ZH_TEXT = """
今天早上下了一场小雨，街道两旁的梧桐树显得格外干净。
我们在周末去了城郊的农场，孩子们第一次亲手摘到了草莓。
这家面馆开了三十多年，老板每天凌晨四点就开始熬骨头汤。
地铁二号线在晚高峰时非常拥挤，很多人宁愿多走一站路。
她把旧书捐给了社区图书馆，希望更多的孩子能读到这些故事。
秋天的北京天空很高，风里带着一点点桂花的香味。
爷爷年轻时在码头上做搬运工，后来自学成了一名会计。
新开的博物馆展出了上千件青铜器，参观需要提前在网上预约。
这座小城以竹编手艺闻名，街上到处都是卖篮子和扇子的摊位。
医生建议他每天散步半小时，少吃油炸食品，多喝温水。
学校的篮球队在省里的比赛中拿了第二名，全校都很高兴。
那条河在夏天会涨水，村民们提前把粮食搬到了高处。
他用了整整一个月的时间，终于把这本英文小说翻译完了。
春节前的火车站人山人海，大家都提着大包小包赶着回家。
我们公司的服务器昨晚出了故障，工程师们一直忙到天亮。
这种茶叶产自云南的高山上，泡出来的汤色金黄明亮。
妈妈做的红烧肉肥而不腻，每次过年都是桌上第一个被吃光的菜。
天气预报说明天会有大风降温，出门记得多穿一件外套。
图书馆里很安静，只听得见翻书的声音和窗外的鸟叫。
这部电影讲述了一个普通教师在山区坚持教书二十年的故事。
城市的夜景很美，江边的灯光倒映在水面上，像一条流动的彩带。
他们计划明年春天骑自行车环绕青海湖一周。
这个应用可以帮助老年人用语音给家人发送消息。
经过三年的修复，这座古桥终于重新向游客开放。
我小时候最喜欢在外婆家的院子里看蚂蚁搬家。
研究人员发现，充足的睡眠可以明显提高学生的记忆力。
那家书店每周六下午都会举办读书分享会，欢迎大家参加。
海边的渔民天不亮就出海，傍晚才带着满船的鱼虾回来。
这款手机的电池可以连续使用两天，拍照效果也很不错。
老师让我们写一篇关于家乡变化的作文，我写了村口那棵老槐树。
为了保护湿地里的候鸟，附近的工厂全部搬到了工业园区。
他每天早上六点起床跑步，已经坚持了整整五年。
这道数学题看起来很简单，其实需要用到好几个定理。
小镇上的邮局已经有一百年的历史，至今仍在营业。
我们在山顶等了两个小时，终于看到了云海中的日出。
政府今年投入大量资金改造老旧小区，加装了电梯和停车位。
她从小学习钢琴，现在是一家乐团的首席演奏员。
这条古街保留了明清时期的建筑风格，吸引了很多摄影爱好者。
饭后散步有助于消化，但不要立刻进行剧烈运动。
公司决定明年在南方再开设两个分公司，扩大市场份额。
孩子们在雪地里堆了一个大雪人，还给它戴上了红色的帽子。
这次考试的成绩不太理想，但他并没有灰心，而是认真分析了错题。
很多年轻人喜欢在周末去咖啡馆看书或者工作。
这个村子种植的葡萄特别甜，每年夏天都有人专程来采摘。
机场因为大雾关闭了四个小时，很多航班被迫延误。
我的邻居是一位退休的物理老师，经常给小区的孩子们讲科学故事。
这座寺庙建在悬崖边上，远远看去好像悬在半空中一样。
他把自己的创业经历写成了一本书，出版后很受欢迎。
在这个季节，草原上开满了各种颜色的野花。
科学家们正在研究如何利用海水淡化技术解决缺水问题。
这家医院新引进了一台先进的设备，可以更早地发现疾病。
晚饭后，一家人坐在一起聊天，是他一天中最开心的时刻。
网上购物越来越方便，但也要注意保护个人信息的安全。
运动会上，他在一百米短跑比赛中打破了学校的纪录。
这条高速公路通车以后，两座城市之间只需要一个小时车程。
工人们正在给老房子换上新的屋顶，以免雨季漏水。
她每天晚上睡前都会写日记，记录一天中发生的事情。
这座城市的公交系统全部换成了电动车，空气质量明显改善。
我们小组花了两周时间完成了这个项目的需求分析。
山里的空气很清新，偶尔能看到松鼠在树枝间跳来跳去。
爸爸退休以后开始学习书法，现在已经能写一手漂亮的楷书。
这家工厂生产的零件出口到二十多个国家和地区。
冬天的哈尔滨非常寒冷，但冰雕节吸引了大批游客。
她在实验室里做了几百次试验，终于找到了合适的配方。
这本词典收录了六万多个词条，是学习汉语的好帮手。
社区组织志愿者定期看望独居老人，帮他们打扫房间。
小明把零花钱存了起来，打算给妹妹买一个生日礼物。
这个软件的新版本修复了很多问题，运行速度也更快了。
河边的柳树发出了新芽，春天真的来了。
他是一名快递员，每天要送一百多个包裹。
这个古老的村庄至今仍保留着舞龙舞狮的传统习俗。
为了准备这次演讲，她反复练习了很多遍。
这片森林里生活着许多珍稀动物，已经被列为自然保护区。
如果明天不下雨，我们就去湖边野餐。
他发现代码里有一个隐藏很深的错误，导致程序偶尔崩溃。
奶奶种的西红柿又大又红，邻居们都来向她请教种植方法。
这次旅行让我认识了很多来自不同国家的朋友。
城市图书馆推出了夜间开放服务，方便上班族借书。
这位作家的小说大多以江南水乡为背景，语言清新自然。
由于连续干旱，今年的小麦产量比去年减少了不少。
我们在博物馆里看到了一块来自月球的岩石样本。
他每天坐两个小时的公交车上下班，路上常常听有声书。
这个小区的居民自发组织了一支合唱团，每周排练两次。
厨房里飘出了饺子的香味，大家都围到了餐桌旁。
这家银行推出了一款新的理财产品，年收益率比较稳定。
孩子们在老师的带领下参观了消防站，学习了火灾逃生知识。
这场音乐会的门票在开售十分钟内就全部卖完了。
考古队在这片遗址中发现了大量唐代的陶器碎片。
他们用无人机拍摄了整个峡谷的全景，画面十分壮观。
雨后的彩虹挂在天边，引得路人纷纷拿出手机拍照。
"""
JA_TEXT = ("今日は朝から雨が降っていたので、駅まで歩いて行くのをやめてバスに乗りました。"
           "図書館で借りた本を読みながら、窓の外の桜をしばらく眺めていました。")
KO_TEXT = ("오늘 아침에는 비가 와서 버스를 타고 회사에 갔습니다. 점심에는 동료들과 함께 "
           "근처 식당에서 김치찌개를 먹었습니다.")
EN_TERMS = ("Transformer", "attention", "GPU", "batch size", "learning rate", "Python", "JSON",
            "API", "Docker", "Linux", "dataset", "tokenizer", "checkpoint", "loss", "JAX")


def zh_clauses() -> list[str]:
  return [c for s in ZH_TEXT.split() for c in re.split(r"(?<=[，。])", s) if c]


def edit_chars(rng, text: str, frac: float = 0.05) -> str:
  """`frac` of the characters get one edit each: substituted, inserted before or deleted
  (equally likely); new characters come from the document's own alphabet (same script)."""
  chars = list(text)
  alphabet = sorted({c for c in text if not c.isspace()})
  for p in sorted(rng.choice(len(chars), int(round(frac * len(chars))), replace=False),
                  reverse=True):  # right to left: earlier positions stay valid
    op, c = rng.integers(3), alphabet[rng.integers(len(alphabet))]
    if op == 0:
      chars[p] = c
    elif op == 1:
      chars.insert(p, c)
    else:
      del chars[p]
  return "".join(chars)


def distinct(texts: list[str], n: int, max_jaccard: float = 0.3) -> list[str]:
  """The first `n` texts whose exact character 8-gram Jaccard with every earlier kept text is
  <= `max_jaccard`: source pools (stdlib, pydoc) contain real near-copies of their own."""
  kept, sets = [], []
  for t in texts:
    g = set(dedup.shingle_hashes(t, "char", 8).tolist())  # the exact set, no MinHash
    for h in sets:
      common = len(g & h)
      if common > max_jaccard * (len(g) + len(h) - common):
        break
    else:
      kept.append(t)
      sets.append(g)
      if len(kept) == n:
        break
  return kept


def english_texts(rng) -> list[str]:
  """~1,000-1,300-character chunks of the prose paragraphs of the pydoc topics (the Python
  language reference, shipped with CPython); indented code examples left out."""
  out = list(_english_chunks())
  return [out[i] for i in rng.permutation(len(out))]


@functools.cache
def _english_chunks() -> tuple[str, ...]:
  topics = pytest.importorskip("pydoc_data.topics").topics
  out = []
  for name in sorted(topics):
    cur = ""
    for p in topics[name].split("\n\n"):
      if len(p) > 80 and not p.startswith(" ") and "***" not in p:
        cur += re.sub(r"\s*\n\s*", " ", p) + "\n\n"
        if len(cur) > 1000:
          out.append(cur.strip())
          cur = ""
  return tuple(out)


def code_texts(rng) -> list[str]:
  """1,500-character windows from the middle of stdlib modules (past license headers)."""
  files = _stdlib_modules()
  out = []
  for i in rng.permutation(len(files))[:400]:
    t = files[i]
    start = t.index("\n", len(t) // 2) + 1  # start on a line boundary
    out.append(t[start:start + 1500])
  return out


@functools.cache
def _stdlib_modules() -> tuple[str, ...]:
  from lmx.data.corpus import stdlib_documents
  return tuple(d.text for d in stdlib_documents()
               if d.id.endswith(".py") and "/test" not in d.id and len(d.text) > 4000)


def chinese_texts(rng, n: int = 150) -> list[str]:
  clauses = zh_clauses()
  return ["".join(clauses[i] for i in rng.choice(len(clauses), int(rng.integers(20, 40)),
                                                  replace=False)) for _ in range(n)]


def mixed_texts(rng, n: int = 150) -> list[str]:
  """Markdown with a Chinese majority: a heading, Chinese clauses, English terms and
  sentences, LaTeX display math and inline code."""
  clauses, english = zh_clauses(), english_texts(np.random.default_rng(0))
  out = []
  for d in range(n):
    parts = [f"## 第{d}节 {EN_TERMS[rng.integers(len(EN_TERMS))]} 简介\n\n"]
    for _ in range(int(rng.integers(16, 30))):
      r = rng.random()
      if r < 0.55:
        parts.append(clauses[rng.integers(len(clauses))])
      elif r < 0.75:
        parts.append(f" {EN_TERMS[rng.integers(len(EN_TERMS))]} ")
      elif r < 0.83:
        a, b = rng.integers(1, 9, 2)
        parts.append(f"\n\n$$\\frac{{{a}}}{{{b}}} \\sum_{{i=1}}^{{n}} x_i^{{{a + b}}}$$\n\n")
      elif r < 0.9:
        parts.append(f"`{EN_TERMS[rng.integers(len(EN_TERMS))].lower()}.load({d})`")
      else:
        s = english[rng.integers(len(english))].split(". ")
        parts.append(" " + s[rng.integers(len(s))].strip() + ". ")
    out.append("".join(parts))
  return out


# Low-entropy English: sentences from 40 words, so distinct documents share most of their
# character n-grams (the hard case for precision; real templated text looks like this).
TEMPLATE_WORDS = ("river mountain village teacher garden window morning story music letter "
                  "bridge forest market winter summer doctor kitchen harbor island lantern "
                  "meadow candle journey silver orchard valley thunder painter sailor stone "
                  "quiet early golden narrow ancient bright distant gentle heavy simple").split()


def templated_texts(rng, n: int = 150) -> list[str]:
  out = []
  for _ in range(n):
    sents = [" ".join(rng.choice(TEMPLATE_WORDS, int(rng.integers(6, 12)))).capitalize() + "."
             for _ in range(int(rng.integers(10, 30)))]
    out.append("\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3)))
  return out


BUILDERS = {"english": english_texts, "code": code_texts, "chinese": chinese_texts,
            "mixed": mixed_texts, "templated": templated_texts}


def planted_set(lang: str, seed: int = 0, n_distinct: int = 80, n_exact: int = 10,
                n_near: int = 30, edit_frac: float = 0.05):
  """(docs, groups): docs = [(id, text)], groups = sets of ids that are copies of one source
  (size >= 2). Sources are distinct documents; each gets one exact or one ~5%-edited copy."""
  rng = np.random.default_rng(seed)
  pool = distinct(BUILDERS[lang](rng), n_distinct)
  assert len(pool) == n_distinct, (lang, len(pool))
  docs = [(f"{lang}-{i:03d}", t) for i, t in enumerate(pool)]
  sources = rng.choice(n_distinct, n_exact + n_near, replace=False)
  groups = []
  for k, s in enumerate(sources):
    if k < n_exact:
      copy = (f"{lang}-exact{k:03d}", pool[s])
    else:
      copy = (f"{lang}-near{k:03d}", edit_chars(rng, pool[s], edit_frac))
    docs.append(copy)
    groups.append({docs[s][0], copy[0]})
  order = rng.permutation(len(docs))  # copies are not always after their source
  return [docs[i] for i in order], groups


def pair_scores(res: dedup.DedupResult, groups: list[set[str]]) -> tuple[float, float]:
  """(precision, recall) over document pairs: a pair is predicted when both land in one
  cluster, true when both come from one source."""
  pairs = lambda sets: {(a, b) for g in sets for a in g for b in g if a < b}
  pred, true = pairs(map(set, res.clusters)), pairs(groups)
  return len(pred & true) / max(1, len(pred)), len(pred & true) / max(1, len(true))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("lang", list(BUILDERS))
def test_shipped_defaults_on_planted_sets(lang):
  """80 distinct documents + 10 exact copies + 30 copies with ~5% character edits: pair
  precision and recall >= 0.95 and no distinct document dropped, with DedupConfig()."""
  docs, groups = planted_set(lang, seed=7)  # the curve in docs/data.md used seeds 0..4
  res = dedup.deduplicate(docs, dedup.DedupConfig())
  precision, recall = pair_scores(res, groups)
  assert precision >= 0.95 and recall >= 0.95, (lang, precision, recall)
  copies = {i for g in groups for i in g if "exact" in i or "near" in i}
  assert set(res.drop) <= copies  # every original survives (its copy sorts after it)
  assert all(res.drop[i] == "exact_duplicate" for i in copies if "exact" in i)


@pytest.mark.parametrize("lang", ["english", "chinese"])
def test_old_word_defaults_miss_character_edits(lang):
  """Why `auto` is character n-grams: the 0.1 defaults (5-word shingles, Jaccard 0.7) find
  only the exact copies -- a Chinese "word" is a clause, and 5% character edits touch ~25% of
  English words."""
  docs, groups = planted_set(lang, seed=7)
  res = dedup.deduplicate(docs, dedup.DedupConfig(threshold=0.7, num_perm=128, shingle="word",
                                                  shingle_size=5))
  _, recall = pair_scores(res, groups)
  assert recall <= 0.3  # 10 exact of 40 pairs


def test_char_shingles_are_unicode_characters():
  for text in (ZH_TEXT, JA_TEXT, KO_TEXT, "Ünïcödé naïve café " * 3):
    t = re.sub(r"\s+", " ", text.lower()).strip()
    ref = {t[i:i + 6] for i in range(len(t) - 5)}
    assert len(dedup.shingle_hashes(text, "char", 6)) == len(ref)
    np.testing.assert_array_equal(dedup.shingle_hashes(text, "auto", 6),
                                  dedup.shingle_hashes(text, "char", 6))
    b = t.encode()
    assert len(dedup.shingle_hashes(text, "byte", 6)) == len({b[i:i + 6]
                                                              for i in range(len(b) - 5)})
  # A Chinese sentence is one "word": word shingles see one shingle, characters 25.
  s = "今天早上下了一场小雨街道两旁的梧桐树显得格外干净"
  assert len(dedup.shingle_hashes(s, "word", 5)) == 1
  assert len(dedup.shingle_hashes(s, "char", 6)) == len(s) - 5


def test_reformatted_cjk_copy_is_exact():
  docs = [("a", "第一段。\n\n第二段，  还有一些字。"), ("b", "第一段。 第二段， 还有一些字。")]
  assert dedup.deduplicate(docs, dedup.DedupConfig()).drop == {"b": "exact_duplicate"}


def _benchmark():
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"
  spec = importlib.util.spec_from_file_location("data_throughput", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_datasketch_finds_the_same_near_duplicates():
  """The benchmark's baseline: datasketch's MinHash + MinHashLSH on the same shingles and
  bands x rows verify the same pairs as lmx on a planted set, and the candidates proposed by
  only one library are as many as independent hash functions predict."""
  pytest.importorskip("datasketch")
  docs, groups = planted_set("chinese", seed=7)
  cfg = dedup.DedupConfig()
  out = _benchmark()._vs_datasketch([t for _, t in docs], cfg)
  v = out["verified"]
  assert v["lmx"] == v["datasketch"] == v["both"] == len(groups)  # the planted pairs only
  # Exact copies agree exactly; on the edited ones the estimates differ by noise only.
  assert abs(v["estimate_diff_mean"]) <= 4 * v["estimate_diff_se"] + 0.005
  c = out["candidates"]
  assert c["in_one_only"] <= 2 * c["in_one_only_expected"] + 10
  assert out["lmx"]["docs_per_s"] > 0 and out["datasketch"]["docs_per_s"] > 0
