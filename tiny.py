"""The offline world for `python ppo_rlhf.py --tiny`: everything built in code, nothing downloaded.

It stands in for the three things the real run downloads:

    real run                              --tiny
    lvwerra/gpt2-imdb (GPT-2, BPE)        a 2-layer GPT-2, random init, on a word-level
                                          vocabulary of the ~300 words below
    lvwerra/distilbert-imdb POSITIVE      `lexicon_score`: a word-counting sentiment score,
      logit                               bounded like a classifier logit
    imdb train split                      `REVIEW_OPENINGS`, a few dozen review openings

The tokenizer and the policy are real Hugging Face objects (`PreTrainedTokenizerFast`,
`GPT2LMHeadModel`), so the training loop runs exactly the code the real run does; only the
score function differs. `save_tiny_world` writes the same stand-ins as folders and a CSV (plus a
tiny DistilBERT classifier with NEGATIVE/POSITIVE labels), so the real loading path
(`from_pretrained`, `pipeline`, `load_dataset`) can be run and tested offline too.

The score. Each word of the text counts +1 if it is in `POSITIVE_WORDS`, −1 if it is in
`NEGATIVE_WORDS`, 0 otherwise; with n the sum,

    score = 4 · tanh(n / 4)

which is near n for a few sentiment words and saturates at ±4, the range of the real POSITIVE
logit. A random policy writes about as many positive as negative words (score near 0); a policy
that has learnt the task writes mostly positive ones (score near 4). No negation handling: "not
good" counts as positive, which is exactly the kind of shortcut a learned reward can teach too.
"""

import math
import os

import torch

EOS = "<|endoftext|>"
UNK = "[UNK]"

POSITIVE_WORDS = (
    "good great excellent wonderful superb brilliant amazing beautiful best lovely fantastic "
    "perfect enjoyable fun funny charming delightful moving touching masterpiece gem classic "
    "favorite favourite loved love enjoyed liked fine fresh clever smart stunning powerful "
    "memorable hilarious gripping solid strong warm sweet heartfelt recommend impressive "
    "outstanding terrific marvelous engaging entertaining inspired tender rich"
).split()

NEGATIVE_WORDS = (
    "bad awful terrible horrible worst boring dull poor weak stupid silly waste wasted "
    "disappointing disappointed mess lame annoying painful pointless ugly cheap tedious slow "
    "hated hate bland forgettable predictable awkward clumsy flat confusing unfunny sloppy "
    "mediocre laughable ridiculous dreadful lousy bored messy shallow nonsense garbage trash "
    "unwatchable overlong pretentious cringe dumb"
).split()

NEUTRAL_WORDS = (
    "the a an and or but so of to in on at for with from by about as into than then that this "
    "these those there here it its it's is was were be been being are am has have had do does "
    "did i me my we our you your he him his she her they them their who what which when where "
    "why how not no never very really quite just too also only even still more most much many "
    "some any all every one two three first second last again once ever while after before "
    "because if though although movie movies film films story plot script scene scenes ending "
    "beginning end acting actor actors actress cast director direction music score camera "
    "character characters dialogue effects screen time minutes hour hours year years people "
    "man woman kid kids family friend friends life world night day war comedy drama "
    "horror thriller western musical documentary series episode sequel remake book version "
    "role roles performance performances lead hero villain audience theater cinema dvd tv "
    "watch watched watching see saw seen seeing think thought feel felt know knew make made "
    "makes making take took go went come came get got give gave look looked seem seemed "
    "want wanted tell told show shows showed play played plays try tried find found start "
    "started say said watchable whole part bit lot kind sort way thing things something "
    "nothing everything anything would could should will can might must may like stories heard "
    "includes shown begins rented since work tries seems ."
    " , ! ? ' -"
).split()

VOCAB = [EOS, UNK] + sorted(set(NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS))

REVIEW_OPENINGS = [
    "I watched this movie last night with my family",
    "This film is one of those stories that",
    "The plot of this movie is about a man who",
    "I saw this film at the theater when it",
    "When I first heard about this movie I thought",
    "The director of this film has made many movies",
    "This is the kind of movie that you watch",
    "My friends told me to see this film and",
    "The cast of this movie includes some actors who",
    "I have seen many films in my life but",
    "This movie was shown on tv one night and",
    "The story begins with a woman who has a",
    "After watching the first episode of this series I",
    "The acting in this film is something that",
    "I rented this dvd because the book was",
    "It has been many years since I saw a",
    "The music and the camera work in this movie",
    "This sequel to the first film tries to",
    "Every scene in this movie seems to have",
    "I went to the cinema to see this western",
    "The characters in this drama are people who",
    "If you like horror movies then this one",
    "The ending of this film made me think about",
    "My kids wanted to watch this comedy so we",
    "The first hour of this movie is about",
    "This documentary shows the life of a man",
    "I thought the remake would be like the",
    "The lead actress plays a role that",
    "From the beginning to the end this thriller",
    "I can say that this musical is",
    "The dialogue in this script is the kind",
    "We watched this film on dvd and it",
    "The villain of the story is a man who",
    "I know many people who saw this movie and",
    "This is the second time I have seen this",
    "The performances of the cast make this film",
]

_SENTIMENT = {**{w: 1 for w in POSITIVE_WORDS}, **{w: -1 for w in NEGATIVE_WORDS}}


def lexicon_score(texts) -> torch.Tensor:
    """Sentiment of each text: 4 · tanh(n / 4), n = #positive words − #negative words.

    Args:
        texts: a list of B strings.

    Returns:
        scores: (B,) fp32, in (−4, 4).
    """
    counts = [sum(_SENTIMENT.get(w, 0) for w in text.lower().split()) for text in texts]
    return torch.tensor([4.0 * math.tanh(n / 4.0) for n in counts], dtype=torch.float32)


def build_tokenizer():
    """A word-level tokenizer over `VOCAB`; `<|endoftext|>` is BOS, EOS and pad, as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_policy(tokenizer, seed: int = 0):
    """A 2-layer, 64-wide GPT-2 on the tiny vocabulary, randomly initialised (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def build_classifier(tokenizer, seed: int = 0):
    """A 1-layer DistilBERT with labels NEGATIVE/POSITIVE, randomly initialised (seeded).

    Only its interface matters (the real run's `pipeline` call must load and run it); its scores
    are noise.
    """
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(config)


def make_reviews(n: int, seed: int = 0):
    """n review texts of more than 200 characters: an opening followed by random vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    words = VOCAB[2:]
    reviews = []
    for i in range(n):
        text = REVIEW_OPENINGS[i % len(REVIEW_OPENINGS)]
        while len(text) <= 220:
            text += " " + words[int(torch.randint(len(words), (1,), generator=gen))]
        reviews.append(text)
    return reviews


def save_tiny_world(directory: str, n_reviews: int = 48, seed: int = 0):
    """Write a tiny GPT-2 folder, a tiny DistilBERT folder and a CSV of reviews under `directory`.

    They load through the real run's calls: `--model DIR/policy --reward-model DIR/reward
    --dataset DIR/reviews.csv`.

    Returns:
        (policy_dir, reward_dir, csv_path).
    """
    import csv

    tokenizer = build_tokenizer()
    policy_dir = os.path.join(directory, "policy")
    reward_dir = os.path.join(directory, "reward")
    csv_path = os.path.join(directory, "reviews.csv")
    build_policy(tokenizer, seed).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    build_classifier(tokenizer, seed).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for review in make_reviews(n_reviews, seed):
            writer.writerow([review, 1])
    return policy_dir, reward_dir, csv_path


if __name__ == "__main__":
    import sys

    from transformers.utils import logging as hf_logging

    if len(sys.argv) != 2:
        sys.exit("usage: python tiny.py DIR   (writes DIR/policy, DIR/reward, DIR/reviews.csv)")
    hf_logging.disable_progress_bar()
    for path in save_tiny_world(sys.argv[1]):
        print(path)
