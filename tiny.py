"""The offline world of `python ppo_rlhf.py --tiny`: a miniature of the real run, built in code.

    real run                                 --tiny (built here on first use, then cached)
    English                                  a small review language: the grammar below
    lvwerra/gpt2-imdb: GPT-2 fine-tuned on   a 2-layer GPT-2 pretrained on reviews of that
      IMDB reviews                             language (the starting policy and the reference)
    lvwerra/distilbert-imdb: POSITIVE logit  a 1-layer DistilBERT trained on the labelled reviews
    the imdb train split                     a CSV of reviews, whose first words are the prompts

The run then loads the three through the real run's own calls (`from_pretrained`,
`pipeline("text-classification")`, `load_dataset("csv")`): only the paths differ.

The language. A review is one to three sentences; a sentence is an optional opening ("i watched
this film last night ,"), then one or two clauses ("the acting was really good but the ending
was dull"), then "." Each clause carries a positive or a negative word, so reviews come positive,
negative or mixed. The grammar is regular, so `is_fluent` can tell whether a text reads as the
beginning of a review, cut anywhere: that is the fluency the KL penalty is there to keep. A
policy that games the classifier ("great great superb great") scores high and fails the check.

Cache: `$PPO_RLHF_TINY_WORLD`, or `~/.cache/ppo_rlhf/tiny-world-v<WORLD_VERSION>`; a folder is
used only if its `world.json` carries this WORLD_VERSION, and is rebuilt otherwise.

`--task sums` has a world of its own beside it (the same folder name + "-sums"), built by
`build_task_world`: its starting policy, a small GPT-2 pretrained on sums whose answers are
only sometimes right, and its problems (task.py). The sentiment world is not touched.
"""

import json
import math
import os
import random
import shutil
import socket

import torch

WORLD_VERSION = 1
# The task world's starting policy (build_task_world): its size and pretraining.
TASK_LAYERS, TASK_WIDTH, TASK_LR, TASK_BATCH, TASK_STEPS = 2, 64, 3e-3, 128, 1000
EOS, UNK, CLS = "<|endoftext|>", "[UNK]", "[CLS]"

POSITIVE = "good great wonderful brilliant superb excellent beautiful funny moving charming clever enjoyable".split()
NEGATIVE = "bad awful terrible boring dull weak silly poor predictable messy tedious bland".split()
LIKED, DISLIKED = "loved liked enjoyed".split(), "hated disliked".split()

# A right-linear grammar: (state, phrase, next state). "." ends a sentence and starts the next.
_OPENINGS = ["i watched this movie", "i saw this film", "we watched it on dvd", "my friends and i saw it",
             "i rented this movie", "my kids wanted to see it", "i went to see this film"]  # fmt: skip
_WHEN = ["last night", "at the cinema", "with my family", "on tv", "again"]
_SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the story", "the cast", "the music",
             "the ending", "the dialogue", "the director", "it", "the script", "the effects"]  # fmt: skip
_OBJECTS = ["it", "this movie", "the acting", "the story", "the music", "every minute"]
RULES = (
    [("S", o, "O") for o in _OPENINGS]
    + [("O", w, "O2") for w in _WHEN]
    + [(s, sep, "C") for s in ("O", "O2") for sep in (",", "and")]
    + [("S", "", "C"), ("S", "i", "I")]
    + [("C", s, "N") for s in _SUBJECTS]
    + [("N", v, "V") for v in ("is", "was")]
    + [("V", a, "A") for a in ("", "very", "really", "quite", "so")]
    + [("A", w, "J") for w in POSITIVE + NEGATIVE]
    + [("J", c, "C") for c in ("and", "but")]
    + [("I", a, "I2") for a in ("", "really")]
    + [("I2", w, "IV") for w in LIKED + DISLIKED]
    + [("IV", o, "J2") for o in _OBJECTS]
    + [(s, ".", "S") for s in ("J", "J2")]
)


def _compile(rules):
    """The grammar as a word-level NFA: {state: [(word, next state)]}, phrases split into chains."""
    arcs, epsilon = {}, {}
    for n, (state, phrase, nxt) in enumerate(rules):
        words = phrase.split()
        if not words:
            epsilon.setdefault(state, []).append(nxt)
            continue
        cur = state
        for i, w in enumerate(words):
            target = nxt if i == len(words) - 1 else f"{state}/{n}/{i}"
            arcs.setdefault(cur, []).append((w, target))
            cur = target
    return arcs, epsilon


_ARCS, _EPSILON = _compile(RULES)
VOCAB = [EOS, UNK, CLS] + sorted({w for _, p, _ in RULES for w in p.split()})


def _closure(states):
    todo, seen = list(states), set(states)
    while todo:
        for nxt in _EPSILON.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def is_fluent(text: str) -> bool:
    """Whether `text` reads as the beginning of a review of the language (cut anywhere)."""
    states = _closure({"S"})
    for word in text.split():
        states = _closure({nxt for s in states for w, nxt in _ARCS.get(s, []) if w == word})
        if not states:
            return False
    return True


def fluency(texts) -> float:
    """The share of texts that pass `is_fluent`."""
    return sum(map(is_fluent, texts)) / len(texts)


def sentiment(text: str) -> int:
    """Positive minus negative words, as the grammar defines them ("loved" and "liked" count too)."""
    words = text.split()
    return sum(w in POSITIVE or w in LIKED for w in words) - sum(w in NEGATIVE or w in DISLIKED for w in words)


def judge(texts) -> list:
    """The world's raters: a gold score g per text, g = 4·[fluent] + 2·tanh(sentiment / 2).

    Fluent text beats disfluent whatever its words (the 4 is more than the 2·tanh can make up),
    then more positive beats less, with less to gain from each further positive word. It reads
    the grammar itself, not the classifier, so it has none of the classifier's blind spots: a
    pile of positive words ("great great superb") is disfluent and scores low. Labels drawn with
    σ(g₁ − g₂) (reward_model.preference_probability) are noisy, as people's are: of two fluent,
    neutral texts, the one with a positive word more is chosen about 7 times in 10 (σ(0.92)).
    """
    return [4.0 * is_fluent(t) + 2.0 * math.tanh(sentiment(t) / 2) for t in texts]



# The judge's mean and standard deviation over the world's starting policy's own answers (2000 of
# them, 2 to each of 1000 prompts, seed 0); a test measures them again.
JUDGE_MEAN, JUDGE_STD = 3.80, 1.12


def judge_normalized(texts) -> list:
    """The judge as a reward for PPO: (g − mean) / std over the starting policy's answers.

    The same normalization step 2 gives its reward model (reward_model.normalize_head, plus the
    centering term), so that PPO against the judge (`--reward-fn tiny:judge_normalized`, the
    frontier's PPO-GT) gets the care PPO against a reward model gets. Raw, the judge gives every
    fluent text about 4: with a value head that starts at 0, GAE then hands each token an
    advantage of about 4·λ^(tokens to the end), which differs more between the first and the last
    token of a response than the sentiment part differs between responses. Measured: PPO on the
    raw judge lowered it (experiments/frontier.py, seed 0, β 0.3: 3.78 → 3.70 over 50 steps, fluent 96% → 83%).
    """
    return [(g - JUDGE_MEAN) / JUDGE_STD for g in judge(texts)]


def sample_review(rng: random.Random):
    """A random review of the language and its sentiment (#positive − #negative words).

    Each review draws its own leaning p; every sentiment word is positive with probability p, so
    the corpus holds positive, negative and mixed reviews.
    """
    p = rng.random()
    words = []
    for _ in range(rng.randint(1, 3)):
        state = "S"
        while True:
            state, phrase = _step(rng, state, p, len(words))
            words += phrase.split()
            if phrase == ".":
                break
    return " ".join(words), sentiment(" ".join(words))


def _step(rng, state, p, length):
    options = [(phrase, nxt) for s, phrase, nxt in RULES if s == state]
    if state == "J":  # end the sentence, or add a second clause (not in long reviews)
        options = [o for o in options if o[0] == "." or length < 25]
        options = options if rng.random() < 0.4 or len(options) == 1 else [o for o in options if o[0] == "."]
    if state in ("A", "I2"):  # the sentiment word: positive with probability p
        good, want_good = (POSITIVE if state == "A" else LIKED), rng.random() < p
        options = [o for o in options if (o[0] in good) == want_good]
    phrase, nxt = rng.choice(options)
    return nxt, phrase


def build_tokenizer(with_cls: bool = False, vocab=None):
    """A word-level tokenizer over `vocab` (default VOCAB, the reviews' words; the task's words for
    --task); `<|endoftext|>` is BOS, EOS and pad, as in GPT-2.

    `with_cls` puts [CLS] before every text, for the classifier, which reads its first position.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab or VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if with_cls:
        backend.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
        cls_token=CLS if with_cls else None, model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def _batches(texts, tokenizer, batch_size, steps, rng, **kw):
    for _ in range(steps):
        chunk = rng.sample(texts, batch_size)
        yield chunk, tokenizer(chunk, return_tensors="pt", padding=True, **kw)


def pretrain_policy(tokenizer, reviews, steps: int, seed: int, progress):
    """A 2-layer, 64-wide GPT-2 trained as a language model on the reviews (each ends in EOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0))  # fmt: skip
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    texts = [r + " " + EOS for r in reviews]
    for _, batch in _batches(texts, tokenizer, 64, steps, random.Random(seed), truncation=True, max_length=64):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        loss = lm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(1)
    return lm


def train_classifier(tokenizer, reviews, sentiments, steps: int, seed: int, progress):
    """A 1-layer DistilBERT (labels NEGATIVE/POSITIVE) trained on the reviews' sentiment."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(tokenizer), max_position_embeddings=128, dim=64, n_layers=1, n_heads=4,
                              hidden_dim=128, pad_token_id=0, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                              label2id={"NEGATIVE": 0, "POSITIVE": 1})  # fmt: skip
    model = DistilBertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    # Soft targets p(POSITIVE) = σ(2·net): the more sentiment, the surer; so the logit keeps
    # growing with the count of positive words, as a learned reward that can be gamed does.
    target = dict(zip(reviews, sentiments))
    for chunk, batch in _batches(reviews, tokenizer, 64, steps, random.Random(seed + 1)):
        p = torch.sigmoid(torch.tensor([2.0 * target[t] for t in chunk]))  # (b,)
        logits = model(**batch).logits  # (b, 2)
        loss = torch.nn.functional.cross_entropy(logits, torch.stack([1 - p, p], 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(1)
    return model


def build_world(directory: str, seed: int = 0, n_reviews: int = 6000, lm_steps: int = 300, cls_steps: int = 200):
    """Write DIR/policy, DIR/reward, DIR/reviews.csv and DIR/world.json (with WORLD_VERSION)."""
    import csv

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rng = random.Random(seed)
    corpus = [sample_review(rng) for _ in range(n_reviews)]
    reviews, sentiments = [r for r, _ in corpus], [s for _, s in corpus]
    scratch = f"{directory.rstrip('/')}.building-{socket.gethostname()}-{os.getpid()}"  # two builders never share one
    shutil.rmtree(scratch, ignore_errors=True)
    # fork_rng: the build seeds torch itself, and must leave the run's random stream as it found it;
    # devices=[]: it runs on the CPU, so no GPU's stream is saved (nor a CUDA context started on each)
    with torch.random.fork_rng(devices=[]), tqdm(total=lm_steps + cls_steps, dynamic_ncols=True,
                                                 desc="building the --tiny world (once)") as bar:  # fmt: skip
        lm_tokenizer, cls_tokenizer = build_tokenizer(), build_tokenizer(with_cls=True)
        lm = pretrain_policy(lm_tokenizer, reviews, lm_steps, seed, bar)
        classifier = train_classifier(cls_tokenizer, reviews, sentiments, cls_steps, seed, bar)
    lm.save_pretrained(os.path.join(scratch, "policy"))
    lm_tokenizer.save_pretrained(os.path.join(scratch, "policy"))
    classifier.save_pretrained(os.path.join(scratch, "reward"))
    cls_tokenizer.save_pretrained(os.path.join(scratch, "reward"))
    with open(os.path.join(scratch, "reviews.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([r, int(s > 0)] for r, s in corpus[:1000])
    with open(os.path.join(scratch, "world.json"), "w") as f:
        json.dump(dict(version=WORLD_VERSION, seed=seed, lm_steps=lm_steps, cls_steps=cls_steps), f)
    _move_into_place(scratch, directory)
    return world_paths(directory)


def _move_into_place(scratch: str, directory: str) -> None:
    """The finished build in `scratch` becomes `directory`, unless another process on this disk
    finished first: then its copy, the same bytes, is kept."""
    if is_current(directory):
        shutil.rmtree(scratch)
    else:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(scratch, directory)


def pretrain_task_policy(tokenizer, texts, steps: int, seed: int, progress):
    """A small GPT-2 trained on "prompt completion EOS" texts, the loss on the completion only
    (the operands are random digits: predicting them teaches nothing and drowns the sum)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=TASK_WIDTH, n_layer=TASK_LAYERS,
                                    n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0))  # fmt: skip
    opt = torch.optim.AdamW(lm.parameters(), lr=TASK_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, TASK_LR, total_steps=steps, pct_start=0.05)
    every = tokenizer(texts, return_tensors="pt", padding=True)  # (N, L): the texts differ by a token at most
    after = (every["input_ids"] == tokenizer.convert_tokens_to_ids("=")).cumsum(1) > 0  # (N, L): from "=" on
    labels = every["input_ids"].masked_fill((every["attention_mask"] == 0) | ~after, -100)  # (N, L)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(texts), (TASK_BATCH,), generator=gen)  # (b,)
        loss = lm(input_ids=every["input_ids"][rows], attention_mask=every["attention_mask"][rows],
                  labels=labels[rows]).loss  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        progress.update(1)
    return lm


def build_task_world(directory: str, seed: int = 0, n_texts: int = 20000, n_problems: int = 4000, steps: int = 0):
    """Write DIR/policy (the task's starting policy), DIR/problems.csv (prompt, solution), the
    pretraining texts DIR/pretraining.txt and DIR/world.json. The policy is pretrained on
    `n_texts` sums whose answers are only sometimes right (task.noisy_completion); none of them is
    a held-out problem (loading.is_held_out). `steps`: 0 = TASK_STEPS."""
    import csv

    import task
    from loading import is_held_out
    from tqdm import tqdm

    steps = steps or TASK_STEPS
    rng = random.Random(seed)
    texts = []
    while len(texts) < n_texts:
        prompt, solution = task.make_problem(rng)
        if not is_held_out(prompt):
            texts.append(f"{prompt} {task.noisy_completion(rng, solution)} {EOS}")
    problems = [task.make_problem(rng) for _ in range(n_problems)]  # the RL prompts, held-out ones among them
    scratch = f"{directory.rstrip('/')}.building-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, dynamic_ncols=True,
                                                 desc="building the --task world (once)") as bar:  # fmt: skip
        tokenizer = build_tokenizer(vocab=[EOS, UNK] + task.VOCAB)
        lm = pretrain_task_policy(tokenizer, texts, steps, seed, bar)
    lm.save_pretrained(os.path.join(scratch, "policy"))
    tokenizer.save_pretrained(os.path.join(scratch, "policy"))
    with open(os.path.join(scratch, "pretraining.txt"), "w") as f:  # kept, so that a test can read what it saw
        f.writelines(t + "\n" for t in texts)
    with open(os.path.join(scratch, "problems.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "solution"])
        writer.writerows(problems)
    with open(os.path.join(scratch, "world.json"), "w") as f:
        json.dump(dict(version=WORLD_VERSION, task="sums", seed=seed, steps=steps), f)
    _move_into_place(scratch, directory)
    return task_world_paths(directory)


def task_world_paths(directory: str):
    """(policy folder, problems CSV) of a task world folder."""
    return os.path.join(directory, "policy"), os.path.join(directory, "problems.csv")


def ensure_task_world(directory: str = "") -> tuple:
    """The paths of the cached task world (beside the sentiment world), built first if missing."""
    directory = directory or default_world_dir().rstrip("/") + "-sums"
    return task_world_paths(directory) if is_current(directory) else build_task_world(directory)


def world_paths(directory: str):
    """(policy folder, reward-model folder, reviews CSV) of a world folder."""
    return (os.path.join(directory, "policy"), os.path.join(directory, "reward"), os.path.join(directory, "reviews.csv"))


def default_world_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PPO_RLHF_TINY_WORLD") or os.path.join(cache, "ppo_rlhf", f"tiny-world-v{WORLD_VERSION}")


def ensure_world(directory: str = "") -> tuple:
    """The paths of the cached world, built first if missing or of another WORLD_VERSION."""
    directory = directory or default_world_dir()
    return world_paths(directory) if is_current(directory) else build_world(directory)


def ensure(task: str = "") -> tuple:
    """(policy folder, reward-model folder or "", prompts file) of --tiny's world, or of --task's."""
    if task:
        policy, problems = ensure_task_world()
        return policy, "", problems
    return ensure_world()


def is_current(directory: str) -> bool:
    """Whether `directory` holds a world of this WORLD_VERSION."""
    try:
        with open(os.path.join(directory, "world.json")) as f:
            return json.load(f).get("version") == WORLD_VERSION
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tiny.py DIR   (writes DIR/policy, DIR/reward, DIR/reviews.csv)")
    for path in build_world(sys.argv[1]):
        print(path)
